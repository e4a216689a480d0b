"""The assignments: student notebooks, answer keys and the grader (scripts/make_assignments.py).

Cost: every chapter runs once in the suite. nbval executes it with the student's view of its exercises
inserted before the exercises (`with_student_view`, wired in conftest.py): the stubs and the reference
checks run as the grader runs them on a student notebook, then the solutions, in one kernel, so the
chapter's first part is not executed twice. The solutions are graded from the outputs stored in
notebooks/, which that nbval run re-executes (a failing check there fails nbval); the grader's own
execution of a whole student notebook is tested on chapter 0, the cheapest, and
tests/test_colab_wheel.py grades a fresh execution of chapter 0 with the same key.
"""
from __future__ import annotations

import copy
import csv
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_assignments as ma  # noqa: E402
from run_notebooks import toc_notebooks  # noqa: E402

CHAPTERS = toc_notebooks()


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """Assignments of every chapter, made once for this module."""
    folder = tmp_path_factory.mktemp("assignments")
    assert ma.main(["--out", str(folder)]) == 0
    return folder


def source_lines_of_solutions(nb: nbformat.NotebookNode) -> list[str]:
    """Non-trivial lines between the solution markers of ``nb``."""
    lines = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for match in ma.SOLUTION.finditer(cell.source):
                lines += [line.strip() for line in match.group(2).splitlines() if len(line.strip()) > 12]
    return lines


def test_every_chapter_gets_a_student_notebook_a_key_and_the_grader(out):
    assert CHAPTERS, "no chapters in _toc.yml"
    for chapter in CHAPTERS:
        assert (out / "student" / chapter.name).exists()
        key = json.loads((out / "autograder" / f"{chapter.stem}.json").read_text())
        assert len(key["exercises"]) >= 3 and all(ex["check"].startswith("# CHECK exercise") for ex in key["exercises"])
    assert (out / "autograder" / "grade.py").read_text() == (ROOT / "scripts" / "make_assignments.py").read_text()


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_student_notebook_has_stubs_instead_of_solutions(out, chapter):
    source = nbformat.read(chapter, as_version=4)
    student = nbformat.read(out / "student" / chapter.name, as_version=4)
    assert len(student.cells) == len(source.cells)
    text = "\n".join(c.source for c in student.cells if c.cell_type == "code")
    assert "# BEGIN SOLUTION" not in text and "raise NotImplementedError(" in text
    leaked = [line for line in source_lines_of_solutions(source) if line in text]
    assert not leaked, f"solution lines left in the student notebook: {leaked[:3]}"
    assert all(not c.outputs and c.execution_count is None for c in student.cells if c.cell_type == "code")
    checks = [c.source for c in student.cells if c.metadata.get("effnb", {}).get("role") == "check"]
    key = json.loads((out / "autograder" / f"{chapter.stem}.json").read_text())
    assert checks == [ma.student_check(ex["check"]) for ex in key["exercises"]], "student check cells differ from the key"
    assert not any("# HIDDEN TESTS" in c for c in checks), "a hidden test reached the student notebook"


def test_stub_keeps_indentation_and_names_what_the_check_reads():
    ex = ma.Exercise(1, "squares", check="# CHECK exercise 1\nassert total == 14")
    source = "def f():\n    # BEGIN SOLUTION\n    total = 14\n    # END SOLUTION\n    return total\n"
    stubbed = ma.stub_solution(source, ex)
    assert "    raise NotImplementedError('Exercise 1 (squares): define `total` here" in stubbed
    assert "total = 14" not in stubbed and stubbed.endswith("    return total\n")
    compile(stubbed, "<stub>", "exec")


def test_incomplete_exercises_are_refused_with_the_fix():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("### Exercise 1: add"),
        nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 2\n# END SOLUTION"),
    ])
    with pytest.raises(ValueError, match="exercise 1 \\(add\\) lacks a '# CHECK exercise 1' cell"):
        ma.parse_exercises(nb)
    orphan = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("# BEGIN SOLUTION\nx = 2\n# END SOLUTION")])
    with pytest.raises(ValueError, match="no '### Exercise N: title' heading"):
        ma.parse_exercises(orphan)


def test_output_over_the_sources_is_refused(capsys):
    with pytest.raises(SystemExit):
        ma.main(["--out", str(ROOT / "notebooks")])
    assert "sources are never overwritten" in capsys.readouterr().err


def exercise_chapter(path: Path, exercises: list[tuple[str, str, str, str]]) -> Path:
    """A notebook in the book's exercise format that runs in a second: ``base = 1``, then per exercise
    (title, task, solution, check) its heading, solution cell and check cell (cells 1-3, 4-6, ...)."""
    cells = [nbformat.v4.new_code_cell("base = 1")]
    for number, (title, task, solution, check) in enumerate(exercises, 1):
        heading = ("## Exercises\n\n" if number == 1 else "") + f"### Exercise {number}: {title}\n\n{task}"
        cells += [nbformat.v4.new_markdown_cell(heading),
                  nbformat.v4.new_code_cell(f"# BEGIN SOLUTION\n{solution}\n# END SOLUTION"),
                  nbformat.v4.new_code_cell(f"# CHECK exercise {number}\n{check}")]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def tiny_chapter(path: Path) -> Path:
    """Two exercises: store base + 1, store base + 2."""
    return exercise_chapter(path, [("add one", "Store `base + 1` in `two`.", "two = base + 1", "assert two == 2, f'two={two}'"),
                                   ("add two", "Store `base + 2` in `three`.", "three = base + 2", "assert three == 3")])


def test_grader_uses_the_reference_checks_and_writes_a_csv(tmp_path, capsys):
    chapter = tiny_chapter(tmp_path / "99_tiny.ipynb")
    assert ma.main([str(chapter), "--out", str(tmp_path / "a")]) == 0
    submission = nbformat.read(tmp_path / "a" / "student" / "99_tiny.ipynb", as_version=4)
    submission.cells[2].source = "two = base + 1"          # exercise 1 solved
    submission.cells[6].source = "# CHECK exercise 2\nassert True"  # exercise 2 unsolved, its check tampered with
    nbformat.write(submission, tmp_path / "alice.ipynb")
    grades = tmp_path / "grades.csv"
    key = tmp_path / "a" / "autograder" / "99_tiny.json"
    assert ma.main(["grade", "--key", str(key), str(tmp_path / "alice.ipynb"), "--out", str(grades)]) == 0
    assert "alice.ipynb  1/2  exercise 1 ok, exercise 2 NameError" in capsys.readouterr().out
    rows = list(csv.DictReader(grades.open()))
    assert [(r["exercise"], r["earned"]) for r in rows] == [("1", "1"), ("2", "0")]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_solutions_pass_every_check_of_the_key(out, chapter):
    key = json.loads((out / "autograder" / f"{chapter.stem}.json").read_text())
    results, _ = ma.grade_notebook(nbformat.read(chapter, as_version=4), key, chapter.parent, run=False)
    assert all(r.earned == r.points for r in results), ma.summary(chapter.name, results)


def test_student_notebook_runs_and_fails_only_at_its_exercises(out):
    """The grader's own run of a whole student notebook, on chapter 0 (every chapter's student view runs under
    nbval, see the module's docstring)."""
    chapter = CHAPTERS[0]
    student = out / "student" / chapter.name
    key = json.loads((out / "autograder" / f"{chapter.stem}.json").read_text())
    results, executed = ma.grade_notebook(nbformat.read(student, as_version=4), key, student.parent)
    first = min(i for i, c in enumerate(executed.cells) if "effnb" in c.metadata)
    for index, cell in enumerate(executed.cells):
        error = ma.cell_error(cell)
        if not error:
            continue
        role = cell.metadata.get("effnb", {}).get("role")
        assert index >= first and role, f"cell {index} (not an exercise cell) failed: {error}"
        assert error.split(":")[0] in ma.STUDENT_ERRORS[role], f"{role} cell {index} failed with {error}"
    assert [r.earned for r in results] == [0] * len(results), f"a check passes with no solution: {ma.summary(chapter.name, results)}"


def test_stub_hint_also_names_what_the_rest_of_the_cell_reads():
    ex = ma.Exercise(1, "ridge", check="# CHECK exercise 1\nassert batch > 0")
    source = "# BEGIN SOLUTION\nridge = 3.0\nbatch = 4\n# END SOLUTION\nprint(ridge, batch)\n"
    assert "define `ridge`, `batch` here" in ma.stub_solution(source, ex)


def test_a_batch_survives_dead_kernels_timeouts_and_malformed_files(tmp_path, capsys):
    """One submission kills its kernel, one hangs, one is not a notebook: each scores 0 with its reason, and the
    others are graded; the summary names each exercise's mean and most common error."""
    chapter = tiny_chapter(tmp_path / "99_tiny.ipynb")
    assert ma.main([str(chapter), "--out", str(tmp_path / "a")]) == 0
    student = tmp_path / "a" / "student" / "99_tiny.ipynb"

    def submit(name, first, second):
        nb = nbformat.read(student, as_version=4)
        nb.cells[2].source, nb.cells[5].source = first, second
        nbformat.write(nb, tmp_path / name)
        return tmp_path / name

    good = submit("good.ipynb", "two = base + 1", "three = base + 2")
    dead = submit("dead.ipynb", "two = base + 1", "import os\nos._exit(1)")
    hang = submit("hang.ipynb", "two = base + 1", "import time\ntime.sleep(60)")
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{ this is not json")
    grades = tmp_path / "grades.csv"
    key = tmp_path / "a" / "autograder" / "99_tiny.json"
    args = ["grade", "--key", str(key), str(good), str(dead), str(hang), str(broken), "--out", str(grades), "--timeout", "5",
            "--jobs", "2"]
    assert ma.main(args) == 0
    out = capsys.readouterr().out
    rows = {(r["submission"], r["exercise"]): r for r in csv.DictReader(grades.open())}
    assert rows["good.ipynb", "1"]["earned"] == rows["good.ipynb", "2"]["earned"] == "1"
    assert rows["dead.ipynb", "1"]["earned"] == "1" and rows["dead.ipynb", "2"]["earned"] == "0"
    assert "kernel died" in rows["dead.ipynb", "2"]["error"]
    assert rows["hang.ipynb", "1"]["earned"] == "1" and rows["hang.ipynb", "2"]["earned"] == "0"
    assert "longer than 5 s" in rows["hang.ipynb", "2"]["error"]
    assert all(rows["broken.ipynb", n]["earned"] == "0" and "malformed notebook" in rows["broken.ipynb", n]["error"]
               for n in ("1", "2"))
    assert "exercise 1 (add one): mean 0.75/1; most common error (1x): malformed notebook" in out
    assert "exercise 2 (add two): mean 0.25/1" in out


def test_grade_refuses_nonsense_jobs():
    with pytest.raises(SystemExit, match="--jobs=0"):
        ma.main(["grade", "--key", "k.json", "x.ipynb", "--jobs", "0"])


def test_grade_by_chapter_number_and_folder(tmp_path, monkeypatch, capsys):
    chapter = tiny_chapter(tmp_path / "99_tiny.ipynb")
    assert ma.main([str(chapter), "--out", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(ma, "OUT", tmp_path / "a")
    folder = tmp_path / "submissions"
    folder.mkdir()
    nb = nbformat.read(tmp_path / "a" / "student" / "99_tiny.ipynb", as_version=4)
    nb.cells[2].source = "two = base + 1"
    nbformat.write(nb, folder / "carol.ipynb")
    assert ma.main(["grade", "--chapter", "99", str(folder), "--out", str(folder / "grades.csv"), "--jobs", "1"]) == 0
    assert "carol.ipynb  1/2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--chapter=77 matches 0 answer keys"):
        ma.main(["grade", "--chapter", "77", str(folder)])
    with pytest.raises(SystemExit, match="no submissions found"):
        ma.main(["grade", "--chapter", "99", str(tmp_path / "a" / "autograder")])


@pytest.mark.parametrize("cheat", [
    # swallow every error: the stub's NotImplementedError and the failing check leave no error output
    "get_ipython().set_custom_exc((BaseException,), lambda shell, etype, value, tb, tb_offset=None: None)",
    # rewrite every later cell that starts with '# CHECK' into 'pass'
    "get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'] if lines and lines[0].startswith('# CHECK') else lines)",
])
def test_cheats_that_hide_errors_or_rewrite_checks_score_zero(tmp_path, capsys, cheat):
    chapter = tiny_chapter(tmp_path / "99_tiny.ipynb")
    assert ma.main([str(chapter), "--out", str(tmp_path / "a")]) == 0
    nb = nbformat.read(tmp_path / "a" / "student" / "99_tiny.ipynb", as_version=4)
    nb.cells[0].source = "base = 1\n" + cheat          # exercises left as stubs
    nbformat.write(nb, tmp_path / "mallory.ipynb")
    key = tmp_path / "a" / "autograder" / "99_tiny.json"
    assert ma.main(["grade", "--key", str(key), str(tmp_path / "mallory.ipynb"), "--out", str(tmp_path / "g.csv"),
                    "--jobs", "1"]) == 0
    assert "mallory.ipynb  0/2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ the red-team set
def redteam_chapter(path: Path) -> Path:
    """Two exercises; the second's check draws its inputs at grading time."""
    return exercise_chapter(path, [
        ("add one", "Store `base + 1` in `two`.", "two = base + 1", "assert two == 2, f'two={two}'"),
        ("add", "Write `add(a, b)`; `add(1, 2)` is 3.", "def add(a, b):\n    return a + b",
         "import random\na, b = random.random(), random.random()  # drawn afresh each time the check runs\n"
         "assert add(a, b) == a + b")])


SOLVED = ("two = base + 1", "def add(a, b):\n    return a + b")


def test_the_red_team_set_scores_what_the_work_deserves(tmp_path, capsys):
    """Twelve submissions, graded in one batch: each scores what it solved, a crash, hang or memory hog costs only
    itself, and a process started to rewrite the results is dead before the CSV is written."""
    import socket

    chapter = redteam_chapter(tmp_path / "98_redteam.ipynb")
    assert ma.main([str(chapter), "--out", str(tmp_path / "a")]) == 0
    student = nbformat.read(tmp_path / "a" / "student" / "98_redteam.ipynb", as_version=4)
    grades, marker = tmp_path / "grades.csv", tmp_path / "survivor-was-here"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    later = f"import time; time.sleep(4); open({str(grades)!r}, 'w').write('all full marks'); open({str(marker)!r}, 'w')"
    rewrite = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {later!r}], start_new_session=True)\n"
    swallow = "get_ipython().set_custom_exc((BaseException,), lambda shell, etype, value, tb, tb_offset=None: None)\n"
    transform = ("get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'] if lines and "
                 "lines[0].startswith('# CHECK') else lines)\n")
    submissions = {              # name: (cell 0 prefix, exercise 1, exercise 2, check 1 replaced by) -> expected points
        "correct": (("", *SOLVED, None), (1, 1)),
        "wrong": (("", "two = base + 2", SOLVED[1], None), (0, 1)),
        "blank": (("", None, None, None), (0, 0)),
        "hard-coded": (("", "two = 2", "def add(a, b):\n    return 3", None), (1, 0)),
        "swallowed errors": ((swallow, None, None, None), (0, 0)),
        "rewritten check": (("", None, SOLVED[1], "# CHECK exercise 1\nassert True"), (0, 1)),
        "input transformer": ((transform, None, None, None), (0, 0)),
        "detached rewriter": ((rewrite, *SOLVED, None), (1, 1)),
        "os._exit": (("", SOLVED[0], "import os\nos._exit(1)", None), (1, 0)),
        "infinite loop": (("", SOLVED[0], "while True:\n    pass", None), (1, 0)),
        "memory hog": (("", SOLVED[0], "hog = bytearray(3 * 2**30)\n" + SOLVED[1], None), (1, 0)),
        "network": (("", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n" + SOLVED[0],
                     SOLVED[1], None), (0, 1)),
    }
    paths = []
    for name, ((prefix, first, second, check), _) in submissions.items():
        nb = copy.deepcopy(student)
        nb.cells[0].source = prefix + nb.cells[0].source
        if first is not None:
            nb.cells[2].source = first
        if second is not None:
            nb.cells[5].source = second
        if check is not None:
            nb.cells[3].source = check
        paths.append(tmp_path / f"{name}.ipynb")
        nbformat.write(nb, paths[-1])
    key = tmp_path / "a" / "autograder" / "98_redteam.json"
    assert ma.main(["grade", "--key", str(key), *map(str, paths), "--out", str(grades), "--timeout", "10",
                    "--memory", "2", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    listener.close()
    time.sleep(6)                                      # longer than the rewriter would have waited
    rows = {(r["submission"], int(r["exercise"])): int(r["earned"]) for r in csv.DictReader(grades.open())}
    sandbox_line = next(line for line in out.splitlines() if line.startswith("sandbox:")).split(";")[0]
    provided = {"network": "unshare" in sandbox_line, "memory hog": "prlimit" in sandbox_line}
    for name, (_, expected) in submissions.items():
        if not provided.get(name, True):
            continue                                   # this machine refused that guard (printed): nothing to assert
        assert (rows[f"{name}.ipynb", 1], rows[f"{name}.ipynb", 2]) == expected, f"{name}: {out}"
    assert not marker.exists(), "a process started by a submission outlived its grading"
    assert "a cell ran longer than 10 s" in out and "kernel died" in out


def test_hidden_tests_are_kept_in_the_key_and_counted_in_the_student_notebook(tmp_path):
    check = "assert add(1, 2) == 3\n# HIDDEN TESTS\nimport random\nx = random.random()\nassert add(x, 1) == x + 1\nassert add(0, x) == x"
    chapter = exercise_chapter(tmp_path / "97_hidden.ipynb", [("add", "Write `add(a, b)`.", "def add(a, b):\n    return a + b", check)])
    student, key = ma.make_assignment(chapter, tmp_path / "a")
    shown = nbformat.read(student, as_version=4).cells[3].source
    assert shown == "# CHECK exercise 1\nassert add(1, 2) == 3\n# + 2 hidden tests, run when this notebook is graded, on inputs drawn then"
    assert json.loads(key.read_text())["exercises"][0]["check"] == f"# CHECK exercise 1\n{check}"
    assert ma.split_check("assert True") == ("assert True", "")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_has_hidden_tests(chapter):
    """DESIGN's chapter contract: every exercise's check cell has hidden tests (asserts after '# HIDDEN TESTS')."""
    exercises = ma.parse_exercises(nbformat.read(chapter, as_version=4), chapter.name)
    without = {ex.number for ex in exercises if ma.count_asserts(ma.split_check(ex.check)[1]) == 0}
    assert not without, \
        f"{chapter.stem}: exercises {sorted(without)} have no assert after a '# HIDDEN TESTS' line in their check cell"


# --- the student's view under nbval (scripts/make_assignments.py: with_student_view; conftest.py) ---------------
def run_composite(chapter: Path) -> list[str]:
    """Execute ``chapter`` with the student's view inserted, as `make test` does under nbval; return the error
    of each code cell that failed (nbclient, no stop at the first error)."""
    from nbclient import NotebookClient

    composite = ma.with_student_view(nbformat.read(chapter, as_version=4), chapter.name)
    NotebookClient(composite, kernel_name="python3", allow_errors=True, timeout=60,
                   resources={"metadata": {"path": str(chapter.parent)}}).execute()
    return [ma.cell_error(c) for c in composite.cells if c.cell_type == "code" and ma.cell_error(c)]


def test_student_view_runs_stubs_and_reference_checks_before_the_solutions(tmp_path):
    chapter = exercise_chapter(tmp_path / "97_view.ipynb", [
        ("add one", "Store `base + 1` in `two`.", "two = base + 1", "assert two == 2\n# HIDDEN TESTS\nassert two - base == 1"),
        ("add", "Write `add(a, b)`.", "def add(a, b):\n    return a + b", "assert add(1, 2) == 3")])
    source = nbformat.read(chapter, as_version=4)
    composite = ma.with_student_view(source)
    assert len(composite.cells) == len(source.cells) + 4               # two stubs and two checks, before the exercises
    view = [c.source for c in composite.cells[2:6]]                 # after `base = 1` and the first heading
    assert all(c.startswith("# The student's view of exercise") for c in view)
    assert "NotImplementedError" in view[0] and "HIDDEN TESTS" in view[1], "the stub, then the reference check"
    assert composite.cells[6:] == source.cells[2:], "then the chapter's own exercise cells, unchanged"
    assert run_composite(chapter) == []


@pytest.mark.parametrize("broken, message", [
    ("between", "NameError"),                                          # a cell between the exercises reads a solution
    ("check", "its check passes with the solution stubbed"),           # a check that passes without its solution
])
def test_student_view_fails_where_the_student_notebook_would(tmp_path, broken, message):
    check = "assert True" if broken == "check" else "assert two == 2"
    chapter = exercise_chapter(tmp_path / "96_broken.ipynb", [
        ("add one", "Store `base + 1` in `two`.", "two = base + 1", check),
        ("add two", "Store `base + 2` in `three`.", "three = base + 2", "assert three == 3")])
    if broken == "between":
        nb = nbformat.read(chapter, as_version=4)
        nb.cells.insert(4, nbformat.v4.new_code_cell("print(two * 10)"))
        nbformat.write(nb, chapter)
    errors = run_composite(chapter)
    assert len(errors) == 1 and message in errors[0], errors
