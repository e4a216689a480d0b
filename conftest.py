"""Test-wide settings: no network, quiet progress bars, the ci profile, a small thread count,
and :func:`skip_or_fail` for tests that need something this machine may lack.

The environment variables are inherited by the Jupyter kernels that nbval starts, and
``effnb/__init__.py`` installs the same socket guard in them when ``EFFNB_BLOCK_NETWORK=1``.
"""
import functools
import os
import shutil
import sys
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


# ----------------------------------------------------------------------------- the chapters under nbval
# nbval runs every chapter in notebooks/ with the student's view of its exercises inserted before the
# exercises (scripts/make_assignments.py: with_student_view): one kernel checks the chapter's outputs and
# that its student notebook runs and stops only at the exercises, so the chapter's first part, most of
# its cost, is executed once for both.
NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"


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
    """nbval's collector, reading a chapter as its student-view composite (built on first use: nbval is
    imported only when notebooks are collected)."""
    from unittest import mock

    import nbformat
    import nbval.plugin

    sys.path.insert(0, str(NOTEBOOKS.parent / "scripts"))
    from make_assignments import with_student_view

    class ChapterNotebook(nbval.plugin.IPyNbFile):
        """A chapter for nbval, with the student's view of its exercises run before the exercises."""

        def collect(self):
            composite = with_student_view(nbformat.read(self.path, as_version=4), self.path.name)
            with mock.patch.object(nbval.plugin.nbformat, "read", return_value=composite):
                return list(super().collect())

    return ChapterNotebook
