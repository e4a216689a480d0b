"""`make lab`: JupyterLab on copies of the chapters, with the book's virtual environment as the kernel.

The tracked notebooks hold the ci outputs the book renders and nbval compares, and saving in Lab
would rewrite them. So Lab opens ``workspace/`` (git ignores it), where every chapter is copied the
first time. A copy that is already there is your work and is never overwritten: delete it, or pass
``--fresh`` (which first moves the old copies to ``workspace/old-<time>/``), to start a chapter again.

The copies run on a kernel named ``effnb``, registered in this environment (``.venv/share/jupyter``),
whose Python is the one that runs this script: the pinned stack, whatever other kernels the machine has.
Widgets are on in that kernel (``EFFNB_WIDGETS=1``): tqdm draws widget progress bars and Chapter 1's
what-if controls redraw live. Every other argument goes to ``jupyter lab`` (e.g. ``--no-browser --port 8899``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
WORKSPACE = ROOT / "workspace"
KERNEL = {"name": "effnb", "display_name": "Python (effnb .venv)", "language": "python"}


class LabError(RuntimeError):
    """A problem `make lab` explains in one sentence."""


def register_kernel(prefix: Path | None = None) -> Path:
    """Register this Python as the Jupyter kernel ``effnb`` under ``prefix`` (default: this environment)."""
    prefix = Path(prefix or sys.prefix)
    from ipykernel.kernelspec import install

    return Path(install(kernel_name=KERNEL["name"], display_name=KERNEL["display_name"], prefix=str(prefix)))


def prepare_workspace(workspace: Path = WORKSPACE, fresh: bool = False, source: Path = ROOT / "notebooks") -> list[Path]:
    """Copy the chapters that are missing from ``workspace`` and point them at the ``effnb`` kernel.

    Existing copies are kept as they are (the reader's work), unless ``fresh``, which moves them to
    ``workspace/old-<time>/`` first. Returns the copies made.
    """
    chapters = sorted(source.glob("[0-9][0-9]_*.ipynb"))
    if not chapters:
        raise LabError(f"no chapters found in {source}; run `make lab` from a clone of the repository.")
    workspace.mkdir(parents=True, exist_ok=True)
    if fresh:
        old = [workspace / c.name for c in chapters if (workspace / c.name).exists()]
        if old:
            backup = workspace / time.strftime("old-%Y%m%d-%H%M%S")
            backup.mkdir()
            for path in old:
                path.rename(backup / path.name)
    made = []
    for chapter in chapters:
        copy = workspace / chapter.name
        if copy.exists():
            continue
        nb = nbformat.read(chapter, as_version=4)
        nb.metadata["kernelspec"] = dict(KERNEL)
        nbformat.write(nb, copy)
        made.append(copy)
    return made


def lab_command(workspace: Path, lab_args: list[str]) -> list[str]:
    """The ``jupyter lab`` command line that serves ``workspace`` with this environment's Jupyter."""
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # containers, CI
    return [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={workspace}", *root, *lab_args]


def lab_environment() -> dict[str, str]:
    """The environment of Lab and its kernels: widgets on, offline Hugging Face, progress bars on, and
    matplotlib's inline backend (a ``MPLBACKEND`` such as the tests' ``Agg`` would hide every figure)."""
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    env.update(EFFNB_WIDGETS="1", EFFNB_PROGRESS=env.get("EFFNB_PROGRESS", "1"), HF_HUB_OFFLINE="1")
    return env


def main(argv: list[str] | None = None) -> int:
    """Register the kernel, fill the workspace, run JupyterLab there until it exits; return its exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=WORKSPACE, help="folder Lab opens (default workspace/)")
    parser.add_argument("--fresh", action="store_true", help="move existing copies to workspace/old-<time>/ and copy again")
    parser.add_argument("--prepare-only", action="store_true", help="register the kernel and copy, do not start Lab")
    args, lab_args = parser.parse_known_args(argv)
    if shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is None:
        try:
            import jupyterlab  # noqa: F401
        except ImportError:
            raise SystemExit("JupyterLab is not installed in this environment; run `make lab` (it installs "
                             "the pinned `lab` extra) or `pip install -c constraints.txt -e '.[lab]'`.") from None
    try:
        made = prepare_workspace(args.workspace.resolve(), fresh=args.fresh)
    except LabError as error:
        raise SystemExit(str(error)) from None
    register_kernel()
    print(f"workspace: {args.workspace} ({len(made)} chapter(s) copied; existing copies kept). "
          "The tracked notebooks in notebooks/ are not touched.")
    if args.prepare_only:
        return 0
    return subprocess.call(lab_command(args.workspace.resolve(), lab_args), env=lab_environment())


if __name__ == "__main__":
    sys.exit(main())
