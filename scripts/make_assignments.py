"""Turn the chapters into assignments (student notebooks + answer keys) and grade submissions.

  python scripts/make_assignments.py                        # every chapter in _toc.yml -> _build/assignments
  python scripts/make_assignments.py notebooks/00_*.ipynb --out DIR
  python scripts/make_assignments.py grade --key KEY.json SUBMISSION.ipynb ... [--out grades.csv]

A chapter's exercise is a markdown heading ``### Exercise N: title``, a code cell with the solution
between ``# BEGIN SOLUTION`` and ``# END SOLUTION``, and a check cell whose first line is
``# CHECK exercise N`` (plain asserts); the lines after a ``# HIDDEN TESTS`` line in a check cell
are hidden tests. The student notebook replaces each solution by a stub that raises
``NotImplementedError`` with a hint, and each check's hidden tests by one line saying how many
there are; the answer key (JSON) holds each exercise's whole reference check. Grading runs a submission top to bottom in a fresh kernel (nbclient, errors allowed) with the
reference checks put back in place of the submitted ones; an exercise scores when its check runs
without an error. This file needs only nbformat and nbclient, so it is copied next to the keys as
``grade.py`` and runs there on its own. The sources in notebooks/ are never written.
"""
from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "assignments"
HEADING = re.compile(r"^#{2,4}\s*Exercise\s+(\d+)\s*[:.]\s*(.+?)\s*$", re.MULTILINE)
CHECK = re.compile(r"^# CHECK exercise (\d+)\s*$")
SOLUTION = re.compile(r"^([ \t]*)# BEGIN SOLUTION[^\n]*\n(.*?)^[ \t]*# END SOLUTION[^\n]*$", re.MULTILINE | re.DOTALL)
META = "effnb"  # cell metadata key marking solution and check cells in student notebooks
HIDDEN = re.compile(r"^[ \t]*# HIDDEN TESTS[^\n]*$", re.MULTILINE)


@dataclass
class Exercise:
    """One exercise of a chapter: its number, title, reference check and the cells that hold it."""

    number: int
    title: str
    points: int = 1
    check: str = ""
    solution_cells: list[int] = field(default_factory=list)
    check_cell: int | None = None


@dataclass
class Result:
    """The grade of one exercise in one submission."""

    number: int
    title: str
    points: int
    earned: int
    error: str = ""


# --- reading a chapter -------------------------------------------------------------------------

def check_number(source: str) -> int | None:
    """The N of a check cell (first line ``# CHECK exercise N``), else None."""
    first = source.lstrip("\n").split("\n", 1)[0]
    match = CHECK.match(first.strip())
    return int(match.group(1)) if match else None


def parse_exercises(nb: nbformat.NotebookNode, name: str = "notebook") -> list[Exercise]:
    """The exercises of ``nb`` in order; raise ValueError naming the fix when one is incomplete."""
    exercises: dict[int, Exercise] = {}
    current: Exercise | None = None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            for number, title in HEADING.findall(cell.source):
                current = exercises.setdefault(int(number), Exercise(int(number), title))
        elif "# BEGIN SOLUTION" in cell.source:
            if current is None:
                raise ValueError(f"{name}: cell {index} has a solution but no '### Exercise N: title' heading above it.")
            current.solution_cells.append(index)
        elif (number := check_number(cell.source)) is not None:
            if number not in exercises:
                raise ValueError(f"{name}: cell {index} checks exercise {number}, which has no '### Exercise {number}:' heading.")
            exercises[number].check, exercises[number].check_cell = cell.source, index
    for ex in exercises.values():
        if not ex.solution_cells or ex.check_cell is None:
            missing = "a '# BEGIN SOLUTION' cell" if not ex.solution_cells else f"a '# CHECK exercise {ex.number}' cell"
            raise ValueError(f"{name}: exercise {ex.number} ({ex.title}) lacks {missing}; add it after the heading.")
    return sorted(exercises.values(), key=lambda ex: ex.number)


def defined_names(code: str) -> list[str]:
    """Top-level names a solution defines (assignments, defs, classes), in order."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return []
    names: list[str] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        for target in targets:
            for sub in ast.walk(target) if target is not None else []:
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.append(sub.id)
    return list(dict.fromkeys(names))


def used_names(code: str) -> set[str]:
    """Names that ``code`` reads (what a check cell expects the solution to define)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def stub_solution(source: str, exercise: Exercise, otter: bool = False) -> str:
    """``source`` with each BEGIN/END SOLUTION block replaced by a stub raising NotImplementedError.

    The hint names the solution's definitions that the check cell or the rest of the cell reads
    (all of them if none), so that the code kept after the stub runs once they are defined. With
    ``otter``, the solution stays, marked for otter-grader to remove, followed by the stub as otter's
    prompt (a string in the solution, code in the student notebook).
    """
    needed = used_names(exercise.check) | used_names(SOLUTION.sub("", source))

    def stub(match: re.Match) -> str:
        indent, body = match.group(1), match.group(2)
        defined = defined_names(body)
        names = [n for n in defined if n in needed] or defined
        goal = f"define {', '.join(f'`{n}`' for n in names)}" if names else "write your solution"
        hint = f"Exercise {exercise.number} ({exercise.title}): {goal} here, then run the check cell below."
        prompt = f"{indent}# YOUR CODE HERE\n{indent}raise NotImplementedError({hint!r})"
        if not otter:
            return prompt
        return (f"{indent}# BEGIN SOLUTION NO PROMPT\n{body}{indent}# END SOLUTION\n"
                f'{indent}""" # BEGIN PROMPT\n{prompt}\n{indent}""" # END PROMPT')

    return SOLUTION.sub(stub, source)


def split_check(source: str) -> tuple[str, str]:
    """A check cell's visible part and its hidden tests (the lines after ``# HIDDEN TESTS``; '' if none)."""
    match = HIDDEN.search(source)
    return (source, "") if match is None else (source[:match.start()].rstrip("\n"), source[match.end():].strip("\n"))


def count_asserts(code: str) -> int:
    """How many ``assert`` statements ``code`` holds (what the student notebook counts as tests)."""
    try:
        return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))
    except SyntaxError:
        return 0


def student_check(source: str) -> str:
    """A check cell as students see it: the visible part, and one line saying how many hidden tests run at grading."""
    visible, hidden = split_check(source)
    if not hidden:
        return source
    count = count_asserts(hidden)
    return (f"{visible}\n# + {count} hidden test{'s' if count != 1 else ''}, run when this notebook is graded, on "
            "inputs drawn then")


# --- making assignments ------------------------------------------------------------------------

def clear_run(nb: nbformat.NotebookNode) -> None:
    """Remove, in place, what a run left in ``nb``: outputs, execution counts and papermill/timing metadata."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def student_notebook(nb: nbformat.NotebookNode, exercises: list[Exercise]) -> nbformat.NotebookNode:
    """A copy of ``nb`` with solutions stubbed, outputs cleared and exercise cells marked in metadata."""
    student = copy.deepcopy(nb)
    for ex in exercises:
        for index in ex.solution_cells:
            student.cells[index].source = stub_solution(student.cells[index].source, ex)
            student.cells[index].metadata[META] = {"exercise": ex.number, "role": "solution"}
        student.cells[ex.check_cell].source = student_check(student.cells[ex.check_cell].source)
        student.cells[ex.check_cell].metadata[META] = {"exercise": ex.number, "role": "check"}
    clear_run(student)
    if any("# BEGIN SOLUTION" in c.source for c in student.cells if c.cell_type == "code"):
        raise ValueError("a solution marker survived stubbing: each '# BEGIN SOLUTION' needs its '# END SOLUTION'.")
    return student


STUDENT_ERRORS = {"solution": ("NotImplementedError",), "check": ("NameError", "AssertionError")}
STUDENT_VIEW = """\
# The student's view of exercise {number}, its {role} cell as the grader runs it (added by `make test` only).
_student_error = None
try:
    exec(compile(get_ipython().transform_cell({source!r}), "<exercise {number}: student's {role} cell>", "exec"), globals())
except ({errors},) as _student_caught:
    _student_error = _student_caught
{require}"""


def with_student_view(nb: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """``nb`` with the student's view of its exercises inserted before the exercises themselves, so one run
    checks both the chapter and its student notebook (``make test`` runs this under nbval).

    The inserted cells are the exercise cells of :func:`student_notebook` (solutions stubbed) with the
    reference checks of the key: a stub may only stop with NotImplementedError, and a check must stop with
    NameError or AssertionError (no check passes without its solution); the other cells between the
    exercises must run as they are. Then the chapter's own exercise cells run, solutions and all, in the
    same kernel, so the chapter's first part is executed once for both.
    """
    exercises = parse_exercises(nb, name)
    student = student_notebook(nb, exercises)
    cells = [i for ex in exercises for i in [*ex.solution_cells, ex.check_cell]]
    start, end = min(cells), max(cells)
    view = []
    for cell in student.cells[start : end + 1]:
        if cell.cell_type != "code":
            continue
        marked = cell.metadata.get(META)
        if not marked:
            view.append(nbformat.v4.new_code_cell(cell.source))
            continue
        role, number = marked["role"], marked["exercise"]
        source = next(ex.check for ex in exercises if ex.number == number) if role == "check" else cell.source
        require = ("" if role == "solution" else
                   f"assert _student_error is not None, 'exercise {number}: its check passes with the solution stubbed'\n")
        view.append(nbformat.v4.new_code_cell(STUDENT_VIEW.format(
            number=number, role=role, source=source, errors=", ".join(STUDENT_ERRORS[role]), require=require)))
    composite = copy.deepcopy(nb)
    composite.cells = composite.cells[:start] + view + composite.cells[start:]
    return composite


def answer_key(chapter: str, exercises: list[Exercise]) -> dict:
    """The JSON answer key of a chapter: title, points and reference check of each exercise."""
    return {"chapter": chapter, "exercises": [
        {"number": ex.number, "title": ex.title, "points": ex.points, "check": ex.check} for ex in exercises]}


def make_assignment(notebook: Path, out: Path) -> tuple[Path, Path]:
    """Write ``out``/student/<name>.ipynb and ``out``/autograder/<name>.json for one chapter."""
    nb = nbformat.read(notebook, as_version=4)
    exercises = parse_exercises(nb, notebook.name)
    if not exercises:
        raise ValueError(f"{notebook.name} has no exercises ('### Exercise N: title' + solution + check cells).")
    student, key = out / "student" / notebook.name, out / "autograder" / f"{notebook.stem}.json"
    student.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(student_notebook(nb, exercises), student)
    key.write_text(json.dumps(answer_key(notebook.stem, exercises), indent=2) + "\n")
    return student, key


def chapters() -> list[Path]:
    """The chapter notebooks in _toc.yml order."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebooks import toc_notebooks

    return toc_notebooks(ROOT)


def make_main(argv: list[str]) -> int:
    """CLI: make the assignments of the given (default: all) chapters."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default _build/assignments)")
    parser.add_argument("--format", choices=["native", "otter"], default="native",
                        help="native: student notebooks + JSON keys for grade.py; otter: otter-grader master "
                             "notebooks and `otter assign` output (needs the `otter` extra)")
    parser.add_argument("--run-tests", action="store_true", help="otter: run each chapter's tests on its "
                        "solutions while assigning (executes the chapter)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out == (ROOT / "notebooks").resolve():
        parser.error("--out must not be notebooks/: the sources are never overwritten.")
    for notebook in [p.resolve() for p in args.notebooks] or chapters():
        if not notebook.exists():
            parser.error(f"no such notebook: {notebook}")
        if args.format == "otter":
            dist = make_otter(notebook, out, args.run_tests)
            print(f"{notebook.name}: otter master notebook and `otter assign` output in {dist.relative_to(out)}")
            continue
        student, key = make_assignment(notebook, out)
        count = len(json.loads(key.read_text())["exercises"])
        print(f"{notebook.name}: {count} exercises -> {student.relative_to(out)}, {key.relative_to(out)}")
    if args.format == "otter":
        print(f"otter assignments in {out / 'otter'}: upload each dist/autograder/NN_name-autograder_*.zip to "
              "Gradescope, or grade locally with `otter run -a dist/autograder/NN_name-autograder_*.zip SUBMISSION.ipynb`")
        return 0
    shutil.copy2(Path(__file__), out / "autograder" / "grade.py")
    print(f"assignments in {out}; grade with: make grade SUBMISSIONS=folder CHAPTER=NN "
          f"(or {sys.executable} {out / 'autograder' / 'grade.py'} grade --key KEY.json SUBMISSIONS)")
    return 0


# --- otter-grader export -----------------------------------------------------------------------

OTTER_VERSION = "7.0.0"  # the version the export is tested with (pyproject's `otter` extra pins it)
OTTER_CONFIG = """# ASSIGNMENT CONFIG
name: {name}
init_cell: true
check_all_cell: false
export_cell: false
run_tests: {run_tests}
python_version: "3.11"
solutions_pdf: false
requirements: requirements.txt
overwrite_requirements: true
generate:
  pdf: false
  filtering: false
tests:
  files: false
  ok_format: false
"""


def otter_test_cell(source: str, hidden: bool) -> nbformat.NotebookNode:
    """One otter exception-based test cell: a function that runs ``source`` in the notebook's globals.

    The reference check runs as written, in the student's namespace (what the native grader does), so
    its assert messages reach the student unchanged.
    """
    config = '""" # BEGIN TEST CONFIG\nhidden: true\n""" # END TEST CONFIG\n' if hidden else ""
    name = "hidden" if hidden else "visible"
    return nbformat.v4.new_code_cell(f"{config}def test_{name}(env):\n"
                                     f"    exec(compile({source!r}, '<{name} check>', 'exec'), env)")


def otter_master(nb: nbformat.NotebookNode, exercises: list[Exercise], name: str,
                 run_tests: bool = False) -> nbformat.NotebookNode:
    """The chapter as an otter-grader master notebook (assignment format v1).

    Each exercise becomes a question ``exercise_N`` (all or nothing, its points), from its heading cell to
    its check cell: the solution cell is otter's solution, with the book's stub as its prompt, and the
    check cell becomes two tests: the visible part (public) and the whole check with its hidden tests (hidden).
    """
    raw = nbformat.v4.new_raw_cell
    master = copy.deepcopy(nb)
    clear_run(master)
    starts = {}
    for ex in exercises:
        if len(ex.solution_cells) != 1:
            raise ValueError(f"{name}: exercise {ex.number} has {len(ex.solution_cells)} solution cells; the otter "
                             "export needs exactly one (merge them into one cell).")
        heading = max(i for i in range(ex.solution_cells[0] + 1) if nb.cells[i].cell_type == "markdown"
                      and any(int(n) == ex.number for n, _ in HEADING.findall(nb.cells[i].source)))
        starts[heading] = ex
    cells, current = [raw(OTTER_CONFIG.format(name=name, run_tests=str(run_tests).lower()))], None
    for index, cell in enumerate(master.cells):
        if index in starts:
            current = starts[index]
            cells.append(raw(f"# BEGIN QUESTION\nname: exercise_{current.number}\npoints: {current.points}\n"
                             "all_or_nothing: true"))
        if current is not None and index == current.solution_cells[0]:
            cell.source = stub_solution(cell.source, current, otter=True)
            cells += [raw("# BEGIN SOLUTION"), cell, raw("# END SOLUTION")]
        elif current is not None and index == current.check_cell:
            visible, hidden = split_check(current.check)
            cells += [raw("# BEGIN TESTS"), otter_test_cell(visible, False)]
            cells += [otter_test_cell(current.check, True)] if hidden else []
            cells += [raw("# END TESTS"), raw("# END QUESTION")]
            current = None
        else:
            cells.append(cell)
    master.cells = cells
    return master


def make_otter(notebook: Path, out: Path, run_tests: bool = False) -> Path:
    """Write ``out``/otter/<name>/<name>.ipynb (the master notebook) and run ``otter assign`` on it into
    ``out``/otter/<name>/dist (student notebook, autograder notebook and the Gradescope ``autograder.zip``)."""
    try:
        import otter
    except ImportError:
        raise SystemExit("the otter export needs otter-grader: install the book's extra with "
                         "`.venv/bin/python -m pip install -c constraints.txt -e '.[otter]'` "
                         "(`make assignments FORMAT=otter` does it).") from None
    if otter.__version__ != OTTER_VERSION:
        print(f"warning: otter-grader {otter.__version__} is installed; the export is tested with {OTTER_VERSION}")
    nb = nbformat.read(notebook, as_version=4)
    exercises = parse_exercises(nb, notebook.name)
    folder = out / "otter" / notebook.stem
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    master = folder / notebook.name
    nbformat.write(otter_master(nb, exercises, notebook.stem, run_tests), master)
    # what Gradescope's image must install: the book's pinned runtime, and effnb itself
    pins = {line.split("==")[0].lower(): line for line in (ROOT / "constraints.txt").read_text().split()
            if "==" in line}
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    book = project["dependencies"] + project["optional-dependencies"]["book"]   # what a chapter needs to run
    runtime = [name for name in (re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in book)
               if not name.startswith(("jupyter-book", "sphinx", "myst", "papermill", "pypdf"))]   # not the site's renderer
    (folder / "requirements.txt").write_text("\n".join([pins[n] for n in runtime if n in pins] +
                                                       [f"effnb @ git+https://github.com/effnb/effnb@v{project['version']}"]) + "\n")
    command = [sys.executable, "-m", "otter", "assign", *([] if run_tests else ["--no-run-tests"]),
               master.name, "dist"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"otter assign failed on {master}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return folder / "dist"


# --- grading -----------------------------------------------------------------------------------

def with_reference_checks(nb: nbformat.NotebookNode, key: dict) -> tuple[nbformat.NotebookNode, dict[int, int]]:
    """A copy of ``nb`` whose check cells hold the key's checks; return it and {exercise: cell index}.

    A check cell is found by its first line or its metadata; a missing one is appended at the end.
    """
    nb = copy.deepcopy(nb)
    where: dict[int, int] = {}
    for index, cell in enumerate(nb.cells):
        number = check_number(cell.source) if cell.cell_type == "code" else None
        if number is None and cell.metadata.get(META, {}).get("role") == "check":
            number = cell.metadata[META]["exercise"]
        if number is not None:
            where.setdefault(number, index)
    for ex in key["exercises"]:
        if ex["number"] in where:
            nb.cells[where[ex["number"]]].source = ex["check"]
        else:
            nb.cells.append(nbformat.v4.new_code_cell(ex["check"]))
            where[ex["number"]] = len(nb.cells) - 1
    return nb, where


def cell_error(cell: nbformat.NotebookNode) -> str:
    """``'ename: evalue'`` of the first error output of ``cell``, or ``''``."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return ""


# --- the sandbox a submission runs in -----------------------------------------------------------

def _works(command: list[str]) -> bool:
    """Whether ``command`` runs and exits 0 here (within 20 s)."""
    try:
        return subprocess.run(command, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_SANDBOX: dict[tuple, tuple[list[str], list[str]]] = {}


def sandbox(memory_gb: float) -> tuple[list[str], list[str]]:
    """The command put in front of the kernel's, and what this machine could not provide.

    In order: a new network namespace, so no address outside the kernel is reachable (``unshare --net``
    as root, ``unshare -rn`` in a user namespace otherwise); a limit on the kernel's address space
    (``prlimit --as``), and, as root, on the processes it may start; and, when the grader runs as root,
    the unprivileged user ``nobody``, so a submission cannot write the grader's files (the answer key,
    other submissions, the CSV). Each part is tried once per process and left out, with a note, where
    the machine refuses it (a container without namespaces, a venv that ``nobody`` cannot read).
    """
    cache = (memory_gb, sys.executable)
    if cache in _SANDBOX:
        return _SANDBOX[cache]
    prefix, missing = [], []
    # the kernel's Python must start as itself: same stdlib (a venv whose base lies in an unreadable home would
    # otherwise fall back to another one) and able to start itself again
    probe = [sys.executable, "-c", f"import sys, subprocess, nbformat, ipykernel; assert sys.base_prefix == "
             f"{sys.base_prefix!r}; subprocess.run([sys.executable, '-c', ''], check=True)"]
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
    for net in (["unshare", "--net", "--"], ["unshare", "-rn", "--"]):
        if shutil.which("unshare") and _works(net + probe):
            prefix += net
            break
    else:
        missing.append("network isolation (unshare refused here)")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    drop = root and "-rn" not in prefix and bool(shutil.which("setpriv")) and _works(prefix + nobody + probe)
    if memory_gb > 0 and shutil.which("prlimit"):
        prefix += ["prlimit", f"--as={int(memory_gb * 2**30)}"] + (["--nproc=4096"] if drop else []) + ["--"]
    elif memory_gb > 0:
        missing.append("a memory limit (no prlimit)")
    if drop:
        prefix += nobody
    else:
        missing.append("an unprivileged user (" + ("user nobody cannot run this Python" if root else
                                                   "the grader does not run as root") + ")")
    _SANDBOX[cache] = (prefix, missing)
    return prefix, missing


def _become_subreaper() -> None:
    """Make this process inherit every orphaned descendant (Linux ``PR_SET_CHILD_SUBREAPER``), so that a
    process a submission detaches (double fork, new session) stays below it, to be found and killed."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below ``pid``, read from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            after_name = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        states[int(entry.name)] = after_name[0]
        children.setdefault(int(after_name[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            if states.get(child) != "Z":
                found.append(child)
    return found


def kill_descendants() -> int:
    """SIGKILL every process below this one until none is left, reaping them; returns how many were killed."""
    killed = 0
    for _ in range(100):
        pids = _descendants(os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
        while True:                                     # reap what was killed (they are our children now)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not pids:
            break
    return killed


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 900, prefix: list[str] | None = None,
            ) -> tuple[nbformat.NotebookNode, str, dict[int, str]]:
    """Run ``nb`` top to bottom in a fresh Python kernel in ``cwd``, errors allowed.

    The kernel talks to this process over Unix sockets (they work across a network namespace). With a
    ``prefix`` (see :func:`sandbox`; ``cwd`` is then a throwaway folder) it goes in front of the
    kernel's command, the kernel's files, home and caches live in ``cwd/.kernel``, and, when ``cwd``
    belongs to ``nobody``, so do they. Returns the notebook
    (cells run so far hold their outputs), ``''`` or the reason the run stopped early (a kernel that
    died, a cell that ran past ``timeout`` seconds), and for each cell whose execution the kernel
    acknowledged, the status of its reply (``"ok"`` or ``"error"``).
    """
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    completed: dict[int, str] = {}                      # cell index -> the kernel's own reply status

    def acknowledged(cell: nbformat.NotebookNode, cell_index: int, execute_reply: dict) -> None:
        completed[cell_index] = execute_reply.get("content", {}).get("status", "")

    sandboxed = prefix is not None
    runtime = cwd / ".kernel" if sandboxed else Path(tempfile.mkdtemp(prefix="effnb-kernel-"))
    spec = runtime / "kernels" / "effnb-grade"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [*(prefix or []), sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "grader", "language": "python"}))
    km = AsyncKernelManager(kernel_name="effnb-grade", transport="ipc", ip=str(runtime / "ipc"),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
    km.connection_file = str(runtime / "connection.json")
    km.write_connection_file()
    env = dict(os.environ)
    if sandboxed:
        env.update({name: str(runtime) for name in ("HOME", "IPYTHONDIR", "TMPDIR")}, HF_HUB_OFFLINE="1",
                   EFFNB_PROGRESS="0", EFFNB_WIDGETS="0", MPLCONFIGDIR=str(runtime / "matplotlib"))
        _copy_font_cache(runtime / "matplotlib")           # else matplotlib rebuilds it in every kernel
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # the kernel's user owns cwd: hand it its files
            owner = cwd.stat()
            for path in runtime.rglob("*"):
                os.chown(path, owner.st_uid, owner.st_gid)
            os.chown(runtime, owner.st_uid, owner.st_gid)
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(cwd)}}, on_cell_executed=acknowledged)
    client.owns_km = True                               # so it shuts the kernel down as it does its own
    try:
        client.execute(env=env)
    except DeadKernelError as err:
        return nb, f"the kernel died ({str(err).splitlines()[0][:120]})", completed
    except CellTimeoutError:
        return nb, f"a cell ran longer than {timeout} s", completed
    finally:
        if not sandboxed:
            shutil.rmtree(runtime, ignore_errors=True)
    return nb, "", completed


def _copy_font_cache(target: Path) -> None:
    """Copy this user's matplotlib font list (if any) to ``target``, a fresh MPLCONFIGDIR."""
    target.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("MPLCONFIGDIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "matplotlib")
    for font_list in cache.glob("fontlist-*.json"):
        shutil.copy(font_list, target / font_list.name)


def grade_notebook(nb: nbformat.NotebookNode, key: dict, cwd: Path, run: bool = True, timeout: int = 900,
                   prefix: list[str] | None = None) -> tuple[list[Result], nbformat.NotebookNode]:
    """Grade one submission against ``key``; return the results and the (executed) notebook.

    With ``run=False`` the outputs already in ``nb`` are scored: a check passes only when its cell
    is the reference check, was executed and shows no error. A run that stops early (dead kernel,
    timeout) scores the checks it reached and names the reason at the others.

    When it runs the submission, a check passes only if the kernel's own reply to it says ``ok``
    (a custom exception handler that hides tracebacks does not change that status) and the cell
    printed a token drawn now, which each reference check prints as its last line (a cell rewritten
    into ``pass`` by an input transformer never prints it).
    """
    stopped, completed, token = "", {}, f"effnb-check-{secrets.token_hex(8)}"
    if run:
        prepared, where = with_reference_checks(nb, key)
        for ex in key["exercises"]:
            prepared.cells[where[ex["number"]]].source = ex["check"] + f"\nprint({token!r})"
        executed, stopped, completed = execute(prepared, cwd, timeout, prefix)
    else:
        executed, where = nb, with_reference_checks(nb, key)[1]
    results = []
    for ex in key["exercises"]:
        index = where[ex["number"]]
        cell = executed.cells[index]
        printed = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        if cell.source != ex["check"] and not run:
            error = "check cell differs from the reference check"
        elif run and index not in completed:
            error = f"check cell was not run: {stopped}" if stopped else "check cell was not run"
        elif not run and cell.get("execution_count") is None:
            error = "check cell was not run"
        else:
            error = cell_error(cell)
            if run and not error and completed[index] != "ok":
                error = "the check failed (its error was hidden from the output)"
            elif run and not error and token not in printed:
                error = "the check did not run as written (it never reached its last line)"
        results.append(Result(ex["number"], ex["title"], ex["points"], 0 if error else ex["points"], error))
    return results, executed


def summary(name: str, results: list[Result]) -> str:
    """One line: ``name  earned/total  exercise 1 ok, exercise 2 AssertionError: ...``."""
    earned, total = sum(r.earned for r in results), sum(r.points for r in results)
    parts = [f"exercise {r.number} {'ok' if not r.error else r.error.splitlines()[0][:80]}" for r in results]
    return f"{name}  {earned}/{total}  " + ", ".join(parts)


def grade_text(text: str, key: dict, run: bool = True, timeout: int = 900, memory_gb: float = 8.0) -> list[Result]:
    """Grade one submission, given as the text of its file; text that is not a notebook scores 0 with the reason.

    It runs in :func:`sandbox`, from a throwaway folder (owned by ``nobody`` when the kernel runs as
    ``nobody``), and every process it started, detached or not, is killed before this returns.
    """
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the submission's fault, not the batch's
        reason = f"malformed notebook: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        return [Result(ex["number"], ex["title"], ex["points"], 0, reason) for ex in key["exercises"]]
    if not run:
        return grade_notebook(nb, key, Path.cwd(), run=False)[0]
    _become_subreaper()
    prefix, _ = sandbox(memory_gb)
    work = Path(tempfile.mkdtemp(prefix="effnb-grade-"))
    try:
        if "--reuid=65534" in prefix:
            os.chown(work, 65534, 65534)
        return grade_notebook(nb, key, work, True, timeout, prefix)[0]
    finally:
        kill_descendants()
        shutil.rmtree(work, ignore_errors=True)


def exercise_summary(key: dict, graded: dict[str, list[Result]]) -> list[str]:
    """Per exercise: mean points over the submissions and the most common error."""
    lines = []
    for ex in key["exercises"]:
        results = [r for rs in graded.values() for r in rs if r.number == ex["number"]]
        errors = Counter(r.error.splitlines()[0][:80] for r in results if r.error)
        common = f"; most common error ({errors.most_common(1)[0][1]}x): {errors.most_common(1)[0][0]}" if errors else ""
        mean = sum(r.earned for r in results) / max(len(results), 1)
        lines.append(f"exercise {ex['number']} ({ex['title']}): mean {mean:.2f}/{ex['points']}{common}")
    return lines


def grade_main(argv: list[str]) -> int:
    """CLI: grade submissions against an answer key (in parallel) and write a CSV."""
    parser = argparse.ArgumentParser(prog="grade", description="Grade submitted notebooks against an answer key.")
    parser.add_argument("submissions", nargs="+", type=Path, help="notebooks, or folders of notebooks")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", type=Path, help="the chapter's answer key, autograder/NN_name.json")
    which.add_argument("--chapter", help="the chapter's number, NN: its key in _build/assignments/autograder/")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV of per-exercise results")
    parser.add_argument("--no-run", action="store_true", help="score the outputs already in the submissions")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="submissions graded at once (default: cores)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may run before the submission stops")
    parser.add_argument("--memory", type=float, default=8.0, help="GB of address space a submission's kernel may use "
                        "(0: no limit)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout < 1 or args.memory < 0:
        raise SystemExit(f"--jobs={args.jobs} and --timeout={args.timeout} must both be at least 1, and "
                         f"--memory={args.memory} at least 0.")
    if args.chapter is not None:
        keys = sorted((OUT / "autograder").glob(f"{args.chapter}_*.json"))
        if len(keys) != 1:
            raise SystemExit(f"--chapter={args.chapter} matches {len(keys)} answer keys in {OUT / 'autograder'}; run "
                             "`make assignments` first and give the chapter's two-digit number, e.g. --chapter 02.")
        args.key = keys[0]
    key = json.loads(args.key.read_text())
    args.submissions = [p for path in args.submissions for p in (sorted(path.glob("*.ipynb")) if path.is_dir() else [path])]
    if not args.submissions:
        raise SystemExit("no submissions found: pass notebooks, or folders that hold .ipynb files.")
    # every file is read before any submission runs, so that none can change another's file before it is graded
    texts = {path: path.read_bytes().decode("utf-8", errors="replace") for path in args.submissions}
    if not args.no_run:
        prefix, missing = sandbox(args.memory)
        print(f"sandbox: {' '.join(prefix) or 'none'}" + (f"; not available here: {', '.join(missing)}" if missing else ""))
    # each submission is graded in a process of its own (spawned: no state shared with this one), with its own kernel;
    # the CSV is written below, by this process alone, after every submission's processes have been killed
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {path: pool.submit(grade_text, texts[path], key, not args.no_run, args.timeout, args.memory)
                   for path in args.submissions}
        graded = {}
        for path, future in futures.items():
            graded[path.name] = future.result()
            print(summary(path.name, graded[path.name]), flush=True)
    rows = [[name, r.number, r.title, r.points, r.earned, r.error] for name, results in graded.items() for r in results]
    with args.out.open("w", newline="") as handle:
        csv.writer(handle).writerows([["submission", "exercise", "title", "points", "earned", "error"], *rows])
    print("\n".join(exercise_summary(key, graded)))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "grade":
        return grade_main(argv[1:])
    return make_main(argv)


if __name__ == "__main__":
    sys.exit(main())
