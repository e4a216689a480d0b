"""Execute chapter notebooks with papermill, time each one, and write the run-time table.

  python scripts/run_notebooks.py --out _build/executed          # executed copies elsewhere
  python scripts/run_notebooks.py --refresh                      # store ci outputs in notebooks/
  python scripts/run_notebooks.py --out DIR --runtimes book/runtimes.md   # the benchmark

The sources in notebooks/ are only written with --refresh, and only by a run that succeeded: each
notebook executes into a temporary file beside it that replaces the source at the end (os.replace),
so a failing chapter leaves its source as it was. Offline by default: the runs set
HF_HUB_OFFLINE=1 and EFFNB_BLOCK_NETWORK=1 unless --allow-network is given.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import nbformat
import papermill
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_BUDGET_S = 120.0
BOOK_BUDGET_S = 15 * 60.0


def toc_files(root: Path = ROOT) -> list[str]:
    """Every ``file:`` entry of _toc.yml (without extension), in order."""
    files: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return files


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """Chapter notebooks in the order _toc.yml lists them."""
    return [root / f"{f}.ipynb" for f in toc_files(root) if (root / f"{f}.ipynb").exists()]


def gpu_name() -> str | None:
    """The name of the first CUDA GPU, or None when there is none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def strip_run_metadata(path: Path) -> None:
    """Drop papermill's per-cell timing metadata so refreshed notebooks diff cleanly."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def execute(notebook: Path, output: Path, profile: str) -> float:
    """Run one notebook with papermill into ``output``; return its wall time in seconds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = {} if profile == "ci" else {"PROFILE": profile}
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name="python3",
        cwd=str(output.parent), progress_bar=False, log_output=False,
    )
    return time.perf_counter() - start


def refresh(notebook: Path) -> float:
    """Run ``notebook`` on the ci profile and store its outputs in it, only if every cell succeeds.

    It executes into a temporary file in the same folder (same working directory for the run);
    the source is replaced with ``os.replace`` at the end, and on any error the temporary file is
    deleted and the source is left untouched. Returns the wall time in seconds.
    """
    from effnb.data import atomic_path

    with atomic_path(notebook) as tmp:
        seconds = execute(notebook, tmp, "ci")
        strip_run_metadata(tmp)
    return seconds


def runtime_table(times: dict[str, float], profile: str) -> str:
    """The Markdown page of measured run times, with the machine they ran on."""
    from effnb.measure import cpu_name

    total = sum(times.values())
    lines = [
        "# Run times",
        "",
        f"Measured by `scripts/run_notebooks.py` on {dt.date.today().isoformat()}: profile `{profile}`, "
        f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
        f"Each time includes starting the kernel. Budget on the ci profile: ≤ {NOTEBOOK_BUDGET_S:.0f} s a chapter, "
        f"≤ {BOOK_BUDGET_S / 60:.0f} min for the book.",
        "",
        "| chapter | wall time (s) | within budget |",
        "| --- | ---: | --- |",
    ]
    for name, seconds in times.items():
        lines.append(f"| {name} | {seconds:.1f} | {'yes' if seconds <= NOTEBOOK_BUDGET_S else '**no**'} |")
    lines.append(f"| **whole book** | {total:.1f} | {'yes' if total <= BOOK_BUDGET_S else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies")
    where.add_argument("--refresh", action="store_true", help="write the outputs back into notebooks/")
    parser.add_argument("--profile", default="ci", choices=["ci", "full"])
    parser.add_argument("--runtimes", type=Path, help="write the run-time table (Markdown) here")
    parser.add_argument("--allow-network", action="store_true", help="let the notebooks reach the internet")
    args = parser.parse_args(argv)

    notebooks = [p.resolve() for p in args.notebooks] or toc_notebooks()
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.refresh and args.profile != "ci":
        parser.error("--refresh stores ci-profile outputs only; use --out for the full profile.")
    os.environ.setdefault("EFFNB_PROGRESS", "0" if args.refresh else "1")
    if not args.allow_network:
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EFFNB_BLOCK_NETWORK="1")

    times: dict[str, float] = {}
    for notebook in notebooks:
        print(f"running {notebook.name} ({args.profile}) ...", flush=True)
        try:
            times[notebook.stem] = refresh(notebook) if args.refresh else execute(
                notebook, args.out / notebook.name, args.profile)
        except papermill.PapermillExecutionError as err:
            print(f"FAILED {notebook.name}: {err.ename}: {err.evalue}", file=sys.stderr)
            return 1
        print(f"  {times[notebook.stem]:.1f} s", flush=True)
    if args.runtimes:
        args.runtimes.parent.mkdir(parents=True, exist_ok=True)
        args.runtimes.write_text(runtime_table(times, args.profile))
        print(f"wrote {args.runtimes}")
    print(f"total {sum(times.values()):.1f} s for {len(times)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
