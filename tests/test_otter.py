"""The otter-grader export (`make assignments FORMAT=otter`, scripts/make_assignments.py --format otter).

`otter assign` must accept every chapter's master notebook, and `otter run` (otter's own grader, offline, in a
network namespace where the machine allows one) must give chapter 0's solutions full marks, its student notebook
zero, and a submission that types in the printed answers zero too (its hidden tests fail). Cost: about 45 s
(chapter 0 runs twice, by `otter run`; `otter assign` is not asked to run the solutions as well, since the
first `otter run` grades them).
Needs the `otter` extra, which `make test` installs; without it these tests skip, or fail under CI=true.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import make_assignments as ma  # noqa: E402
from conftest import skip_or_fail  # noqa: E402
from run_notebooks import toc_notebooks  # noqa: E402

CHAPTERS = toc_notebooks()
CHAPTER_0 = ROOT / "notebooks" / "00_measuring_efficiency.ipynb"


@pytest.fixture(scope="module", autouse=True)
def otter_installed():
    try:
        import otter  # noqa: F401
    except ImportError:
        skip_or_fail("otter-grader is not installed (the book's `otter` extra; `make env` installs it)")


def offline() -> list[str]:
    """A command prefix that runs its command in a new network namespace with only loopback up (otter talks to
    its kernel over TCP on 127.0.0.1), or [] where none can be made."""
    lo_up = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    for prefix in (["unshare", "--net", "--", *lo_up], ["unshare", "-rn", "--", *lo_up]):
        if ma._works(prefix + ["true"]):
            return prefix
    return []


def otter_run(dist: Path, submission: Path, out: Path) -> dict[str, float]:
    """Grade ``submission`` with ``otter run`` and chapter ``dist``'s autograder.zip; {question: score}."""
    out.mkdir(parents=True, exist_ok=True)
    (autograder,) = (dist / "autograder").glob("*-autograder_*.zip")
    done = subprocess.run([*offline(), sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(autograder),
                           "-o", str(out), str(submission)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tests = json.loads((out / "results.json").read_text())["tests"]
    return {t["name"]: t["score"] for t in tests if t.get("max_score")}


@pytest.fixture(scope="module")
def chapter_0(tmp_path_factory) -> Path:
    """Chapter 0 exported (its solutions are graded by `otter run` in the tests below)."""
    return ma.make_otter(CHAPTER_0, tmp_path_factory.mktemp("otter"))


def test_otter_assign_accepts_every_chapter(tmp_path):
    for chapter in CHAPTERS:
        dist = ma.make_otter(chapter, tmp_path)
        source = nbformat.read(chapter, as_version=4)
        exercises = ma.parse_exercises(source, chapter.name)
        blocks = sum(len(ma.SOLUTION.findall(source.cells[i].source)) for ex in exercises for i in ex.solution_cells)
        student = nbformat.read(dist / "student" / chapter.name, as_version=4)
        sources = "\n".join(c.source for c in student.cells if c.cell_type == "code")
        assert all(f'grader.check("exercise_{ex.number}")' in sources for ex in exercises), chapter.name
        assert sources.count("raise NotImplementedError(") == blocks, chapter.name
        assert "# BEGIN SOLUTION" not in sources and "# HIDDEN TESTS" not in sources, chapter.name
        solution_lines = [line.strip() for cell in source.cells if cell.cell_type == "code"
                          for match in ma.SOLUTION.finditer(cell.source) for line in match.group(2).splitlines()
                          if len(line.strip()) > 12]
        assert solution_lines and not [line for line in solution_lines if line in sources], chapter.name
        assert list((dist / "autograder").glob("*-autograder_*.zip")), f"{chapter.name}: no autograder.zip"


def test_otter_run_gives_solutions_full_marks_and_stubs_and_typed_in_answers_zero(chapter_0, tmp_path):
    """The solutions score full marks; the student notebook with exercise 1 answered by the printed number (its
    visible test passes, its hidden tests on random shapes fail) and exercises 2 and 3 left as stubs scores zero."""
    solutions = otter_run(chapter_0, chapter_0 / "autograder" / CHAPTER_0.name, tmp_path / "solutions")
    assert solutions == {"exercise_1": 1.0, "exercise_2": 1.0, "exercise_3": 1.0}
    student = nbformat.read(chapter_0 / "student" / CHAPTER_0.name, as_version=4)
    (stub,) = [c for c in student.cells if "Exercise 1 (" in c.source and "NotImplementedError" in c.source]
    stub.source = "conv_flops = 1228800\n\ndef conv2d_flops(*args):\n    return 1228800"
    submission = tmp_path / CHAPTER_0.name
    nbformat.write(student, submission)
    assert otter_run(chapter_0, submission, tmp_path / "typed") == {"exercise_1": 0.0, "exercise_2": 0.0, "exercise_3": 0.0}


def test_otter_export_refuses_an_exercise_split_over_two_solution_cells():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("### Exercise 1: two cells"),
        nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 1\n# END SOLUTION"),
        nbformat.v4.new_code_cell("# BEGIN SOLUTION\ny = 2\n# END SOLUTION"),
        nbformat.v4.new_code_cell("# CHECK exercise 1\nassert x + y == 3")])
    with pytest.raises(ValueError, match="exactly one"):
        ma.otter_master(nb, ma.parse_exercises(nb), "two")
