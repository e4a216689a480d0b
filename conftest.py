"""Test-wide settings: no network, quiet progress bars, the ci profile, a small thread count,
and :func:`skip_or_fail` for tests that need something this machine may lack.

The environment variables are inherited by the Jupyter kernels that nbval starts, and
``effnb/__init__.py`` installs the same socket guard in them when ``EFFNB_BLOCK_NETWORK=1``.
"""
import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

os.environ["EFFNB_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["EFFNB_PROGRESS"] = "0"
os.environ["EFFNB_WIDGETS"] = "0"  # no widget state in outputs nbval compares (tests/test_lab.py sets 1)
os.environ.setdefault("MPLBACKEND", "Agg")

from effnb.config import block_network  # noqa: E402

block_network()


def skip_or_fail(reason: str) -> None:
    """Skip the calling test with ``reason`` locally, but fail it when ``CI`` is set (``true``/``1``/``yes``).

    On a CI machine a missing browser or checkpoint means the setup is broken, and a skip would
    hide it behind a green run; on a reader's machine it is a choice, so it stays a skip.
    """
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{reason}; CI is set, so this fails instead of skipping", pytrace=False)
    pytest.skip(reason)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def require_chromium() -> None:
    """Skip (locally) or fail (under CI=true) when Debian's chromium or chromedriver is missing."""
    if not (CHROMIUM and CHROMEDRIVER):
        skip_or_fail("browser test: Debian's chromium and chromium-driver are not installed "
                     "(`apt-get install -y chromium chromium-driver`, which `make test` tries when run as root)")


def start_chromium(profile_dir: Path, window: str = "1280,900"):
    """Headless Chromium for the browser, Lab and PDF tests: ``scripts/build_pdf.py``'s, which ``make pdf`` uses."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from build_pdf import start_chromium as start

    return start(profile_dir, window)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module's tiny tensors on one thread (use with ``pytestmark``); on two shared cores
    a second thread only waits for the other one. The previous count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the wheel, as Colab gets it
ROOT = Path(__file__).resolve().parent


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    """Run ``cmd``; fail the calling test with its output when it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"$ {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def clean_env() -> dict:
    """The environment without this venv's traces, so the fresh venv resolves everything itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


@functools.cache
def wheel_venv() -> Path:
    """A new venv holding the effnb wheel of this working tree, built once per test session (in a temporary
    folder removed at exit); its dependencies are this venv's pinned ones.

    What Colab does with a chapter is install ``effnb`` and run every cell outside the repository. Here the
    wheel is built with ``pip wheel --no-deps`` and installed, alone, into a venv whose dependencies are the
    book's, seen through a ``.pth`` line naming this venv's site-packages (re-installing torch and the rest
    would cost two minutes of every ``make test``; resolving them against ``constraints.txt`` is what
    ``make env`` already does). A ``.pth`` line adds a folder, and the editable install's own ``.pth`` file in
    that folder is not processed, so ``import effnb`` finds the wheel's copy and never the source tree.
    ``pip check`` confirms the wheel's declared requirements are met by those pins.
    """
    base = Path(tempfile.mkdtemp(prefix="effnb-wheel-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(base / "dist"), str(ROOT)], ROOT)
    wheels = list((base / "dist").glob("effnb-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, clean_env())  # its own pip would bring an old setuptools
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, clean_env()).strip())
    run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
        base, clean_env())  # before the .pth line, so pip does not take the book's editable effnb for this wheel
    (site / "effnb_book_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "check"], base, clean_env())
    return venv


# ----------------------------------------------------------------------------- the chapters under nbval
# nbval runs every chapter in notebooks/ with the student's view of its exercises inserted before the
# exercises (scripts/make_assignments.py: with_student_view): one kernel checks the chapter's outputs and
# that its student notebook runs and stops only at the exercises, so the chapter's first part, most of
# its cost, is executed once for both.
#
# A chapter that loads a reference checkpoint (loads_a_checkpoint) runs in a kernel of wheel_venv(), as on
# Colab: effnb and the checkpoints come from the installed wheel, and a last cell checks that they did and
# that the chapter loaded its reference models from there rather than training its own (an earlier
# tests/test_colab_wheel.py ran chapter 2 a second time for this; now each chapter runs once).
NOTEBOOKS = ROOT / "notebooks"
LOADERS = re.compile(r"\b(load_reference|load_vision_tower)\(")  # effnb's loaders of the listed checkpoints


def loads_a_checkpoint(nb) -> bool:
    """Whether a chapter's code calls one of effnb's reference-checkpoint loaders."""
    return any(c.cell_type == "code" and LOADERS.search(c.source) for c in nb.cells)


WHEEL_CHECK = """\
# Run from the wheel (conftest.py): effnb and its checkpoints came from the installed wheel, and this chapter
# loaded its reference models from there (effnb.train.LOADED_LISTED) rather than training its own.
import sys
from pathlib import Path
import effnb, effnb.train
_package = Path(effnb.__file__).resolve().parent
assert _package.is_relative_to(sys.prefix) and not Path(sys.prefix).is_relative_to({root!r}), (sys.prefix, _package)
assert effnb.train.CHECKPOINT_DIR == _package / "checkpoints", effnb.train.CHECKPOINT_DIR
_loaded = sorted({{p.name for p in effnb.train.LOADED_LISTED}})
assert _loaded and all(p.parent == effnb.train.CHECKPOINT_DIR for p in effnb.train.LOADED_LISTED), \\
    f"no reference checkpoint was loaded from the wheel: {{effnb.train.LOADED_LISTED}}"
print("loaded from the wheel:", ", ".join(_loaded))
"""


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path, parent):
    """Collect each chapter in notebooks/ with :func:`chapter_collector` instead of nbval's plain collector."""
    collected = yield
    if file_path.suffix != ".ipynb" or file_path.parent != NOTEBOOKS or not collected:
        return collected
    from nbval.plugin import IPyNbFile

    return [chapter_collector().from_parent(parent, path=file_path) if type(item) is IPyNbFile else item
            for item in collected]


@functools.cache
def chapter_collector() -> type:
    """nbval's collector, reading a chapter as its student-view composite, and running a chapter that loads a
    reference checkpoint from the wheel (built on first use: nbval is imported only when notebooks are collected)."""
    from unittest import mock

    import ipykernel.kernelspec
    import nbformat
    import nbval.plugin

    sys.path.insert(0, str(NOTEBOOKS.parent / "scripts"))
    from make_assignments import with_student_view

    class ChapterNotebook(nbval.plugin.IPyNbFile):
        """A chapter for nbval, with the student's view of its exercises run before the exercises."""

        def collect(self):
            nb = nbformat.read(self.path, as_version=4)
            composite = with_student_view(nb, self.path.name)
            self.from_wheel = loads_a_checkpoint(nb)
            if self.from_wheel:
                composite.cells.append(nbformat.v4.new_code_cell(WHEEL_CHECK.format(root=str(ROOT))))
            with mock.patch.object(nbval.plugin.nbformat, "read", return_value=composite):
                return list(super().collect())

        def setup(self):
            """Start the kernel: the book's venv, or wheel_venv()'s for a chapter that loads a checkpoint."""
            if not self.from_wheel:
                return super().setup()
            spec = {**ipykernel.kernelspec.get_kernel_dict(),
                    "argv": [str(wheel_venv() / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "env": {"PATH": clean_env()["PATH"]}}
            with mock.patch.object(ipykernel.kernelspec, "get_kernel_dict", return_value=spec):
                return super().setup()

    return ChapterNotebook
