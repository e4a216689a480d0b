"""The chapters' sweeps of the experiments tier (``scripts/experiments.py``; DESIGN, *where the effect appears*).

Each module here defines one chapter's sweep: ``CHAPTER``, ``AXIS``, ``AXIS_LABEL``, ``POINTS`` (per device),
``config(x)`` (what a point runs, stored beside its values and compared with the chapter's own by the tests),
optionally ``SEEDS`` (how many seeds, at least five, or which) and ``cost(x)`` with ``COST_UNIT`` (the work of
one (point, seed), for the progress bar's ETA), ``setup(device)`` (data, models and the chapter's functions, once) and ``run(context, x, seed)`` (one seed at
one point: every arm's value). A sweep runs the chapter's own method: :func:`notebook_functions` takes the
functions it needs from the notebook's code cells, so the sweep cannot drift from what the chapter teaches.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def notebook_definitions(notebook: str | Path, names: list[str]) -> dict[str, ast.stmt]:
    """The top-level functions, classes and plain assignments (``ARMS = {...}``) called ``names`` in
    ``notebook``'s code cells (the last definition of each wins, as in the notebook); ``LookupError`` if any is
    missing."""
    found: dict[str, ast.stmt] = {}
    for cell in json.loads(Path(notebook).read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "\n".join(line for line in "".join(cell["source"]).splitlines()
                           if not line.lstrip().startswith(("!", "%")))       # shell and magic lines
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            name = getattr(node, "name", None)
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
            if name in names and isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
                found[name] = node
    missing = [n for n in names if n not in found]
    if missing:
        raise LookupError(f"{Path(notebook).name} defines no top-level {missing}; the sweep uses them, so restore "
                          "them in the chapter or update scripts/sweeps/.")
    return found


def notebook_functions(notebook: str | Path, names: list[str], namespace: dict) -> dict[str, str]:
    """Define :func:`notebook_definitions` ``names`` in ``namespace`` (which must hold the globals they use,
    e.g. ``torch``), in the notebook's order; return each one's source, for the sweep's fingerprint."""
    found = notebook_definitions(notebook, names)
    for name in names:
        exec(compile(ast.Module(body=[found[name]], type_ignores=[]), str(notebook), "exec"), namespace)
    return {name: ast.unparse(node) for name, node in found.items()}
