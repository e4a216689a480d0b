"""Colab readiness: the package as a wheel, in a fresh virtual environment, runs a chapter.

What Colab does with a chapter: install ``effnb`` (the first cell does it when it is missing), then
run every cell from a folder that is not the repository. Here the wheel is built with
``pip wheel --no-deps`` and installed, alone, into a new venv whose dependencies are the book's pinned
ones, seen through a ``.pth`` line naming this venv's site-packages (re-installing torch and the rest
cost two minutes of every ``make test``; resolving them against ``constraints.txt`` is what ``make env``
already does). ``pip check`` then confirms that the wheel's declared requirements are met by those
pins, and chapter 0, the cheapest, runs there with papermill on the ci profile from a temporary
folder, so the source tree is not on sys.path (a ``.pth`` line adds a folder, and the editable
install's own ``.pth`` file in that folder is not processed).
The install cell finds effnb and does nothing; the network stays blocked (EFFNB_BLOCK_NETWORK=1).
Its executed copy is then graded with chapter 0's answer key: the book's solutions pass the
autograder on a fresh execution.

The wheel carries the reference checkpoints (data/checkpoints as the package data
effnb/checkpoints): every one of them loads, sha256-checked, in the fresh venv; a missing one tells
a wheel user to reinstall; and chapter 2 (about two minutes) runs there and loads its classifier
instead of training one. Chapters 5, 6 and 9 run there up to the cell that loads their reference models
and show that those came from the wheel (run whole, they would push `make test` past its 30 minutes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_assignments as ma  # noqa: E402

CHAPTER = ROOT / "notebooks" / "00_measuring_efficiency.ipynb"
PROBE = "import sys, effnb\nprint('KERNEL', sys.executable)\nprint('EFFNB', effnb.__file__)"


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    """Run ``cmd``; fail the test with its output when it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"$ {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def clean_env() -> dict:
    """The environment without this venv's traces, so the fresh venv resolves everything itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding the effnb wheel, its dependencies (and papermill + ipykernel) taken from the book's venv."""
    base = tmp_path_factory.mktemp("colab")
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


def test_chapter_2_loads_the_reference_classifier_from_the_wheel(fresh_venv, tmp_path):
    """Chapter 2 (about two minutes) loads its feature classifier from the checkpoints in the wheel rather than
    training one (its fallback when the file is missing)."""
    executed = run_chapter_from_the_wheel(fresh_venv, ROOT / "notebooks" / "02_speed.ipynb", tmp_path / "colab-home")
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "feature classifier: test accuracy" in printed and "Training it here instead" not in printed


LOADERS = ("load_reference(", "load_vision_tower(")
CHECKPOINT_PROBE = "import effnb.train\nprint('CHECKPOINTS', effnb.train.CHECKPOINT_DIR)"


@pytest.mark.parametrize("chapter", ["05_ptq4dit", "06_quest", "09_prumerge"])
def test_chapters_5_6_9_load_their_reference_models_from_the_wheel(fresh_venv, tmp_path, chapter):
    """Chapters 5, 6 and 9 run from the wheel up to and including the cell that loads their reference models
    (the ci profile loads them or stops with an error; it never retrains them), then say where the
    checkpoints came from: the wheel's effnb/checkpoints, not the repository. Cut there to keep `make test`
    within its 30 minutes; the whole chapters run in nbval from the repository."""
    nb = nbformat.read(ROOT / "notebooks" / f"{chapter}.ipynb", as_version=4)
    load = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(f in c.source for f in LOADERS))
    nb.cells = nb.cells[:load + 1] + [nbformat.v4.new_code_cell(CHECKPOINT_PROBE)]
    short = tmp_path / f"{chapter}.ipynb"
    nbformat.write(nb, short)
    executed = run_chapter_from_the_wheel(fresh_venv, short, tmp_path / "colab-home")
    printed = "".join(o.get("text", "") for o in executed.cells[-2].outputs)
    assert "site-packages/effnb/checkpoints" in printed and str(ROOT) not in printed, printed


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
