"""Colab readiness: the package as a wheel, in a fresh virtual environment, runs the chapters.

What Colab does with a chapter: install ``effnb`` (the first cell does it when it is missing), then run
every cell from a folder that is not the repository. ``conftest.wheel_venv`` builds the wheel of this
working tree once per session and installs it, alone, into a new venv whose dependencies are the book's
pinned ones (``pip check`` confirms the wheel's declared requirements are met by them).

The wheel carries the reference checkpoints (data/checkpoints as the package data effnb/checkpoints):
every one of them loads, sha256-checked, in the fresh venv, and a missing one tells a wheel user to
reinstall. The chapters that load one (2, 5, 6 and 9: every chapter whose code calls a reference loader)
run whole under nbval in that venv's kernel (conftest.py), and a last cell there checks that effnb and its
checkpoints came from the wheel and that the chapter loaded its reference models instead of training its
own; this file checks that the selection finds those chapters. Chapter 0, the cheapest, runs here with
papermill from a temporary folder with the network blocked, and its executed copy is graded with
chapter 0's answer key: the book's solutions pass the autograder on a fresh execution.
"""
from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

import conftest
from conftest import clean_env, run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_assignments as ma  # noqa: E402

CHAPTER = ROOT / "notebooks" / "00_measuring_efficiency.ipynb"
PROBE = "import sys, effnb\nprint('KERNEL', sys.executable)\nprint('EFFNB', effnb.__file__)"


@pytest.fixture(scope="module")
def fresh_venv() -> Path:
    """The venv holding the effnb wheel (``conftest.wheel_venv``, shared with the nbval runs of the chapters)."""
    return conftest.wheel_venv()


LOAD_ALL = """\
from effnb import diffusion as D, tokens as T
for name in D.REFERENCE_NAMES:
    D.load_reference(name)                 # sha256-checked against the SHA256SUMS the wheel carries
T.load_vision_tower()
print(D.CHECKPOINT_DIR, len(D.REFERENCE_NAMES) + 1)
"""


def test_wheel_carries_the_package_and_the_reference_checkpoints(fresh_venv):
    out = run([str(fresh_venv / "bin" / "python"), "-c", "import effnb, torch; print(effnb.__file__); print(torch.__version__)"],
              fresh_venv.parent, clean_env())
    location, torch_version = out.split()
    assert "site-packages" in location and str(ROOT) not in location
    assert torch_version.startswith("2.13.0") and "cu" not in torch_version.split("+")[-1]
    (wheel,) = (fresh_venv.parent / "dist").glob("effnb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = [line.split()[1] for line in (ROOT / "data" / "checkpoints" / "SHA256SUMS").read_text().splitlines()]
    assert {f"effnb/checkpoints/{n}" for n in [*listed, "SHA256SUMS"]} <= names
    sweeps = sorted(p.name for p in (ROOT / "data" / "results").glob("[0-9][0-9]_*.json"))
    assert sweeps and {f"effnb/results/{n}" for n in sweeps} <= names, "the stored sweeps the chapters read"
    assert not [n for n in names if not n.startswith(("effnb/", "effnb-"))], "only the package and its metadata"
    folder, loaded = run([str(fresh_venv / "bin" / "python"), "-c", LOAD_ALL], fresh_venv.parent, clean_env()).split()
    assert folder.endswith("site-packages/effnb/checkpoints") and int(loaded) == len(listed)


def test_a_missing_checkpoint_tells_a_wheel_user_to_reinstall(fresh_venv, tmp_path):
    from effnb import train

    assert train.checkpoint_fix("python scripts/x.py") == "re-create it with `python scripts/x.py`"   # in the clone
    probe = ("from effnb import diffusion as D\ntry:\n    D.load_reference('dit_digits8', directory=%r)\n"
             "except FileNotFoundError as err:\n    print(err)\n" % str(tmp_path))
    printed = run([str(fresh_venv / "bin" / "python"), "-c", probe], fresh_venv.parent, clean_env())
    assert "or its sha256 entry is missing; reinstall effnb, whose wheel carries it (`pip uninstall -y effnb`" in printed


def run_chapter_from_the_wheel(venv: Path, chapter: Path, workdir: Path) -> nbformat.NotebookNode:
    """``chapter`` executed by papermill with ``venv``'s kernel from ``workdir`` (outside the repository,
    network blocked), with a last cell that prints the kernel's interpreter and where effnb came from."""
    workdir.mkdir()
    nb = nbformat.read(chapter, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    nbformat.write(nb, workdir / chapter.name)
    env = clean_env() | {"EFFNB_BLOCK_NETWORK": "1", "HF_HUB_OFFLINE": "1", "EFFNB_PROGRESS": "0", "EFFNB_WIDGETS": "0", "MPLBACKEND": "Agg"}
    run([str(venv / "bin" / "python"), "-m", "papermill", chapter.name, "executed.ipynb", "-k", "python3",
         "--no-progress-bar"], workdir, env)
    executed = nbformat.read(workdir / "executed.ipynb", as_version=4)
    probe = "".join(o.get("text", "") for o in executed.cells[-1].outputs)
    assert f"KERNEL {venv}" in probe, f"the kernel did not run in the fresh venv: {probe}"
    assert "site-packages" in probe and str(ROOT) not in probe, f"effnb came from the source tree: {probe}"
    return executed


def test_the_chapters_that_load_a_checkpoint_are_the_ones_run_from_the_wheel():
    """conftest.py runs a chapter in the wheel's kernel when its code calls a reference loader; the scan
    must find the four chapters that do (a renamed loader would otherwise drop them back to the source tree)."""
    chapters = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    from_wheel = [p.stem for p in chapters if conftest.loads_a_checkpoint(nbformat.read(p, as_version=4))]
    assert from_wheel == ["02_speed", "05_ptq4dit", "06_quest", "09_prumerge"]
    readers = set()                   # effnb's public functions that read a SHA256SUMS-listed checkpoint
    for module in (ROOT / "effnb").glob("*.py"):
        for fn in ast.walk(ast.parse(module.read_text())):
            if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_") and fn.name != "read_listed_checkpoint" \
                    and "read_listed_checkpoint(" in ast.unparse(fn):
                readers.add(fn.name)
    assert readers == {"load_reference", "load_vision_tower"}
    assert all(conftest.LOADERS.search(f"{name}(") for name in readers), "conftest.LOADERS must name every loader"


def test_chapter_0_runs_from_the_wheel_outside_the_repository(fresh_venv, tmp_path):
    workdir = tmp_path / "colab-home"
    executed = run_chapter_from_the_wheel(fresh_venv, CHAPTER, workdir)
    key = ma.answer_key(CHAPTER.stem, ma.parse_exercises(nbformat.read(CHAPTER, as_version=4)))
    results, _ = ma.grade_notebook(executed, json.loads(json.dumps(key)), workdir, run=False)
    assert all(r.earned == r.points for r in results), ma.summary(CHAPTER.name, results)


# --- the third way to run the book: the full edition on one's own GPU ---------------------------

def test_full_edition_refuses_without_a_gpu_and_reuses_the_book_build(tmp_path, monkeypatch, capsys):
    import build_book
    import build_full_edition

    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path / "claims"))  # build() sets it; restored afterwards
    monkeypatch.setattr(build_full_edition, "gpu_name", lambda: None)
    assert build_full_edition.main([]) == 2
    assert "No CUDA GPU found" in capsys.readouterr().err
    calls = {}
    monkeypatch.setattr(build_book.run_notebooks, "main", lambda args: calls.setdefault("run", args) and 0)
    monkeypatch.setattr(build_book, "render", lambda stage, html: calls.setdefault("render", (stage, html)) and 0)
    assert build_full_edition.main(["--allow-cpu", "--out", str(tmp_path / "full")]) == 0
    run_args = calls["run"]
    assert run_args[run_args.index("--profile") + 1] == "full"
    assert run_args[run_args.index("--out") + 1] == str(tmp_path / "full" / "executed")
    assert calls["render"] == (tmp_path / "full" / "src", tmp_path / "full" / "html")
