"""The chapter contract (DESIGN.md), checked on every notebook the book lists.

What nbval may compare (DESIGN, *stable everywhere*). nbval re-executes every chapter on whatever CPU runs
the tests and compares the printed output of the cells marked ``# NBVAL_CHECK_OUTPUT`` with the stored one.
Trained weights differ between CPU families (AVX2, AVX-512, AMX take different float kernels) and between
seeds, so a printed line may be compared only if no such difference can change it:

1. A *claim's* verdict (reproduced, not reproduced) is never compared. It is a measurement that could have
   come out either way, and its margin over the threshold on another machine or seed is not known in advance.
   The claim cell prints it, the reproduction report lists it, and ``make seeds`` records it at other seeds
   (``data/results/seed-sweep.json``); none of these is nbval's business.
2. A compared cell prints *checks*: that a baseline learned, that a count lies within its bound, that our code
   agrees with an equation. A check that compares a number with a threshold records both
   (``effnb.report.check_threshold``), and across the seeds of the sweep the number must stay farther from
   the threshold than twice the whole run-to-run spread of that number (its range over the seeds), so that
   another seed, or another CPU, which moves it by less than another seed does, cannot flip it either.
3. Every compared cell prints the same text at every seed of the sweep, and every chapter completes at every
   seed of the sweep (seeds 10, 11 and 20 at least; 20 shares no internal seed with the others).

Rules 1 and 2's form are checked on the sources and stored outputs below; rule 2's margin and rule 3 against the
stored sweep (``test_seed_sweep_*``).
"""
from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from run_notebooks import toc_files  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO_URL = CONFIG["repository"]["url"].rstrip("/")
MAX_IMAGE_BYTES = 300 * 1024


CHAPTERS = [ROOT / f"{f}.ipynb" for f in toc_files() if f.startswith("notebooks/")]


def test_every_toc_entry_exists():
    for entry in toc_files():
        assert any((ROOT / f"{entry}{ext}").exists() for ext in (".ipynb", ".md")), f"{entry} is in _toc.yml but missing"


def test_every_notebook_is_in_the_toc():
    listed = {p.name for p in CHAPTERS}
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert notebook.name in listed, f"{notebook.name} is not listed in _toc.yml"


def test_notebooks_are_named_nn_short_name():
    for notebook in CHAPTERS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", notebook.name), notebook.name


@pytest.fixture(params=CHAPTERS, ids=lambda p: p.stem)
def nb(request):
    notebook = nbformat.read(request.param, as_version=4)
    notebook.path = request.param
    return notebook


def sources(nb, kind=None):
    return [c.source for c in nb.cells if kind is None or c.cell_type == kind]


def test_kernelspec_is_python3(nb):
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_exactly_one_parameters_cell_with_the_standard_knobs(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged 'parameters'"
    for knob in ('PROFILE = "ci"', "SEED = ", 'DEVICE = "auto"'):
        assert knob in cells[0].source, f"parameters cell lacks {knob}"
    following = nb.cells[nb.cells.index(cells[0]) + 1]
    assert "setup(" in following.source, "the cell after the parameters must validate them with effnb.config.setup"


def test_colab_badge_points_at_this_notebook(nb):
    badge = f"https://colab.research.google.com/github/{REPO_URL.split('github.com/')[1]}/blob/main/notebooks/{nb.path.name}"
    assert badge in nb.cells[0].source, f"first cell lacks the Colab badge {badge}"


def test_install_cell_is_guarded_and_pins_the_release_tag_of_this_version(nb):
    """Colab installs the effnb these notebooks were written for: the tag v<version> of pyproject.toml
    (a release pushes that tag), never whatever main holds that day."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    code = sources(nb, "code")[0]
    assert 'find_spec("effnb") is None' in code
    assert f'"effnb @ git+{REPO_URL}@v{version}"' in code and f"'effnb @ git+{REPO_URL}@v{version}'" in code


def test_install_cell_says_in_one_sentence_when_the_install_failed(nb, monkeypatch):
    """Run the install cell as Colab would without network: the pip line fails (here it does nothing) and the
    cell must stop with one sentence naming the fix, not let the next cell die with a bare ModuleNotFoundError."""
    import importlib.util

    code = sources(nb, "code")[0].replace("!{sys.executable} -m pip install", "pass  # pip install")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModuleNotFoundError, match=r"^Installing effnb failed .*; fix that and run this cell again"):
        exec(code, {})


CHECKED = "# NBVAL_CHECK_OUTPUT"
VERDICT_OF_A_CLAIM = re.compile(r"^\[(reproduced|NOT reproduced|not reproduced|inconclusive)\]", re.M)


def test_nbval_compares_a_cell_of_checks_and_no_hard_coded_verdict(nb):
    checked = [s for s in sources(nb, "code") if s.startswith(CHECKED)]
    assert any("check_threshold(" in s or "record_claim(" in s for s in checked), \
        "no cell starting with # NBVAL_CHECK_OUTPUT records a check (check_threshold or record_claim(kind='check'))"
    code = "\n".join(sources(nb, "code"))
    assert "reproduced=True" not in code and "reproduced=False" not in code, "reproduced is hard-coded"


def test_nbval_never_compares_the_verdict_of_a_claim(nb):
    """Rule 1 of the module docstring, on the sources (every record in a compared cell is a check) and on the
    stored outputs (no claim verdict printed by a compared cell)."""
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.startswith(CHECKED):
            continue
        for call in _record_calls_in(cell.source):
            if getattr(call.func, "attr", getattr(call.func, "id", None)) == "record_claim":
                kind = next((k.value for k in call.keywords if k.arg == "kind"), None)
                assert getattr(kind, "value", None) == "check", \
                    "a # NBVAL_CHECK_OUTPUT cell records a claim; record it in a cell nbval does not compare"
        text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
        assert not VERDICT_OF_A_CLAIM.search(text), f"a compared cell prints a claim's verdict: {text[:200]}"


def test_at_least_three_exercises_each_with_solution_and_check(nb):
    code = sources(nb, "code")
    solutions = [s for s in code if "# BEGIN SOLUTION" in s]
    assert len(solutions) >= 3, f"{len(solutions)} exercises with solutions"
    for s in solutions:
        assert s.count("# BEGIN SOLUTION") == s.count("# END SOLUTION"), "unbalanced solution markers"
    checks = [s for s in code if s.startswith("# CHECK exercise")]
    assert len(checks) >= len(solutions) and all("assert " in s for s in checks)


def test_no_error_outputs(nb):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"stored error output: {out.get('ename')}"


def test_no_widget_state_in_stored_outputs(nb):
    """Widgets (progress bars, what-if controls) live only in a reader's Lab: the runners set
    EFFNB_WIDGETS=0, so a stored output or nbval comparison never holds a widget view or its state."""
    assert "widgets" not in nb.metadata, "the notebook stores widget state (metadata.widgets)"
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), "stored widget view"


def test_markdown_has_no_myst_roles_lab_would_show_raw(nb):
    """JupyterLab and Colab render plain Markdown: a MyST role such as {cite}`key` shows raw there.
    Chapters link the paper instead; the book's References page lists every entry of references.bib."""
    for text in sources(nb, "markdown"):
        assert not re.search(r"\{[a-z:-]+\}`", text), f"MyST role in markdown: {text[:120]}"


def test_stored_outputs_exist(nb):
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "notebook stored without outputs"


def test_no_embedded_image_over_300_kb(nb):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for mime, payload in out.get("data", {}).items():
                if mime.startswith("image/") and mime != "image/svg+xml":
                    size = len(base64.b64decode(payload if isinstance(payload, str) else "".join(payload)))
                    assert size <= MAX_IMAGE_BYTES, f"{mime} of {size / 1024:.0f} KB"


def test_papermill_sees_every_parameter(nb):
    """papermill must parse the parameters cell (a quote in a comment breaks it), or `-p NAME` does nothing."""
    import ast

    import papermill

    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert set(papermill.inspect_notebook(str(nb.path))) == assigned


def test_every_chapter_supports_the_gpu_smoke_run(nb):
    """DESIGN: `make gpu-smoke` runs each chapter's full-profile path cut short, through run.pick(..., smoke=...)."""
    code = "\n".join(sources(nb, "code"))
    assert re.search(r"\bsmoke\s*=", code) or "run.smoke" in code, \
        "no smoke setting: give the full profile's long loops a run.pick(ci=..., full=..., smoke=...) value"


def test_full_profile_never_downloads_without_a_parameter(nb):
    """DESIGN: every network access sits behind an explicit parameter (DOWNLOAD = False by default)."""
    code = "\n".join(sources(nb, "code"))
    if "download=True" in code.replace(" ", ""):
        raise AssertionError("download=True is hard-coded; pass download=DOWNLOAD with DOWNLOAD = False in the parameters cell")


def _record_calls_in(source, names=("record_claim", "check_threshold")):
    import ast

    try:
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))))
    except SyntaxError:
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) in names]


def _record_calls(nb):
    return [c for source in sources(nb, "code") for c in _record_calls_in(source, ("record_claim", "record_evidence"))]


def test_every_claim_is_declared_judged_and_printed_with_its_interval(nb):
    """Issue 31 / DESIGN's three verdicts: a chapter declares each claim (a ClaimSpec whose declaration it prints
    before the arms run), records claims only through record_evidence (record_claim is for checks), and every
    claim line in its stored outputs shows the 95% interval."""
    code = "\n".join(sources(nb, "code"))
    assert "ClaimSpec(" in code and ".declaration()" in code, "no claim is declared: build a ClaimSpec and print its declaration()"
    for call in _record_calls(nb):
        if getattr(call.func, "attr", getattr(call.func, "id", None)) == "record_claim":
            kind = next((k.value for k in call.keywords if k.arg == "kind"), None)
            assert getattr(kind, "value", None) == "check", \
                "record_claim records a claim without an interval; judge it and record it with record_evidence"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
    lines = [line for line in text.splitlines() if VERDICT_OF_A_CLAIM.match(line)]
    assert lines, "the stored outputs print no claim verdict"
    bare = [line for line in lines if "95% CI [" not in line]
    assert not bare, f"claim lines without their 95% interval: {bare}"
    for line in lines:
        statement = re.match(r"^\[[^]]+\] (.*): -?[\d.]+, 95% CI \[", line).group(1)
        assert f"[declared] {statement}: " in text, f"no declaration printed for the claim {statement!r}"


def test_every_chapter_records_a_measured_claim(nb):
    """DESIGN's evidence standard: at least one record is a measured claim, not a check."""
    def kind(call):
        if getattr(call.func, "attr", getattr(call.func, "id", None)) == "record_evidence":
            return "claim"
        value = next((k.value for k in call.keywords if k.arg == "kind"), None)
        return "claim" if value is None else getattr(value, "value", "?")

    kinds = [kind(c) for c in _record_calls(nb)]
    assert "claim" in kinds, f"only checks are recorded ({kinds}); record at least one measured claim (record_evidence)"


# ----------------------------------------------------------------------------- the stored seed sweep
SWEEP = ROOT / "data" / "results" / "seed-sweep.json"
SWEEP_SEEDS = (10, 11, 20)   # every chapter must complete at these (20 shares no internal seed with 0, 10 or 11)
REFRESH_SWEEP = 'make seeds SEEDS="0 10 11 20" NOTEBOOKS=notebooks/{name}'


@pytest.fixture(scope="module")
def sweep():
    import json

    assert SWEEP.exists(), f"{SWEEP.relative_to(ROOT)} is missing: run make seeds SEEDS=\"0 10 11 20\""
    return json.loads(SWEEP.read_text())


def test_seed_sweep_says_where_it_ran_and_covers_every_chapter(sweep):
    assert {"cpu", "instruction_sets", "torch", "python"} <= set(sweep["machine"])
    assert sweep["commit"] and re.fullmatch(r"\d{4}-\d\d-\d\d", sweep["date"])
    assert set(sweep["runs"]) == {p.stem for p in CHAPTERS}, "the sweep does not cover exactly the book's chapters"
    for chapter, by_seed in sweep["runs"].items():
        missing = [s for s in SWEEP_SEEDS if str(s) not in by_seed]
        assert not missing, f"{chapter} has no sweep run at seeds {missing}: {REFRESH_SWEEP.format(name=chapter + '.ipynb')}"


def test_seed_sweep_every_chapter_completes_at_every_seed(sweep):
    failed = {f"{ch} at seed {s}": r["error"] for ch, by_seed in sweep["runs"].items() for s, r in by_seed.items()
              if not r["completed"]}
    assert not failed, f"chapters that did not run to the end: {failed}"


def test_seed_sweep_compared_output_is_the_same_at_every_seed(nb, sweep):
    """Rule 3: what nbval compares is printed alike at every seed of the sweep and in the stored notebook."""
    from seed_sweep import checked_outputs

    stored = checked_outputs(nb)
    for seed, run in sweep["runs"][nb.path.stem].items():
        assert run["nbval"] == stored, (
            f"{nb.path.name}: at SEED={seed} the # NBVAL_CHECK_OUTPUT cells print\n{run['nbval']}\nbut the stored "
            f"notebook holds\n{stored}\nEither something compared depends on the seed (print it elsewhere), or the "
            f"sweep is older than the chapter: {REFRESH_SWEEP.format(name=nb.path.name)}")


def test_seed_sweep_compared_checks_lie_outside_their_spread(nb, sweep):
    """Rule 2's margin: a compared check stays farther from its threshold, at every seed, than twice the range of
    its value over the seeds (a range over three or four seeds understates the spread, hence the factor)."""
    from seed_sweep import checked_outputs

    compared = "".join(checked_outputs(nb))
    records: dict[str, list] = {}
    for run in sweep["runs"][nb.path.stem].values():
        for record in run["claims"]:
            if record["kind"] == "check" and record.get("threshold") is not None and record["verdict"] in compared:
                records.setdefault(record["claim"], []).append(record)
    for claim, rows in records.items():
        values, threshold = [r["value"] for r in rows], rows[0]["threshold"]
        spread, margin = max(values) - min(values), min(abs(v - threshold) for v in values)
        assert margin > 2 * spread, (f"{claim!r}: value {min(values):.4g} to {max(values):.4g} over the sweep's seeds, "
                                     f"threshold {threshold:g}: its margin {margin:.3g} is within twice its spread {spread:.3g}; "
                                 "do not let nbval compare it (or make the baseline learn)")
