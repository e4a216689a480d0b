"""The chapter contract (DESIGN.md), checked on every notebook the book lists."""
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


def test_claim_cell_is_checked_by_nbval_and_records_claims(nb):
    claims = [s for s in sources(nb, "code") if s.startswith("# NBVAL_CHECK_OUTPUT") and "record_claim(" in s]
    assert claims, "no claim cell (starts with # NBVAL_CHECK_OUTPUT and calls record_claim)"
    assert all("reproduced=True" not in s and "reproduced=False" not in s for s in claims), "reproduced is hard-coded"


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


def _record_calls(nb):
    import ast

    calls = []
    for source in sources(nb, "code"):
        try:
            tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))))
        except SyntaxError:
            continue
        calls += [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and getattr(n.func, "attr", getattr(n.func, "id", None)) == "record_claim"]
    return calls


def test_every_chapter_records_a_measured_claim(nb):
    """DESIGN's evidence standard: at least one record is a measured claim, not a check."""
    def kind(call):
        value = next((k.value for k in call.keywords if k.arg == "kind"), None)
        return "claim" if value is None else getattr(value, "value", "?")

    kinds = [kind(c) for c in _record_calls(nb)]
    assert "claim" in kinds, f"only checks are recorded ({kinds}); record at least one measured claim (kind='claim')"
