"""Build the HTML book: execute every chapter (ci profile) into _build, then render with Jupyter Book.

Tracked files are never modified. The book's sources are staged in _build/src, the notebooks
there are replaced by freshly executed copies, the run-time table and the reproduction report
are generated from that execution, and `jupyter-book build -W` renders _build/html.

The steps are functions with the folders as parameters, so that other scripts
(scripts/build_full_edition.py, tests/test_browser.py) build other copies of the site with them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402
import seed_sweep  # noqa: E402

from effnb.report import claims_markdown, forest_plot, load_claims  # noqa: E402

FOREST = "reproduction_forest.png"  # the report page's forest plot, written beside it

BUILD = ROOT / "_build"
STAGE = BUILD / "src"
CLAIMS = BUILD / "claims"
NOT_EXECUTED = (
    "This copy of the book was rendered from the outputs stored in the notebooks, without executing "
    "them (`scripts/build_book.py --no-execute`), so no claims were recorded. `make book` executes "
    "every chapter and fills this table.\n"
)


def stage_sources(stage: Path | None = None) -> Path:
    """Copy what the book renders (config, toc, book/, notebooks/) into ``stage`` (default _build/src)."""
    stage = stage or STAGE
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, stage / name)
    shutil.copytree(ROOT / "book", stage / "book")
    shutil.copytree(ROOT / "notebooks", stage / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for notebook in (stage / "notebooks").glob("*.ipynb"):
        set_ipython_lexer(notebook)
    return stage


def set_ipython_lexer(notebook: Path) -> None:
    """Give a staged notebook the ipython3 lexer when its metadata lacks one.

    A notebook saved without a kernel's language_info (written by a script, or a run cut short)
    is highlighted as plain Python, and the install cell's ``!pip`` then fails to lex, which the
    ``-W`` build turns into an error. Only the staged copy is changed.
    """
    nb = nbformat.read(notebook, as_version=4)
    info = nb.metadata.setdefault("language_info", {"name": "python"})
    if info.get("name", "python") == "python" and "pygments_lexer" not in info:
        info["pygments_lexer"] = "ipython3"
        nbformat.write(nb, notebook)


def use_executed(executed: Path, stage: Path | None = None) -> None:
    """Replace the staged notebooks by the executed copies in ``executed``."""
    stage = stage or STAGE
    for notebook in executed.glob("*.ipynb"):
        shutil.copy2(notebook, stage / "notebooks" / notebook.name)


def write_report(stage: Path | None = None, claims: Path | None = None, executed: bool = True) -> None:
    """Fill the staged reproduction-report page with the claims this build recorded in ``claims``."""
    stage, claims = stage or STAGE, claims or CLAIMS
    page = stage / "book" / "reproduction.md"
    sweep = json.loads(seed_sweep.RESULTS.read_text()) if seed_sweep.RESULTS.exists() else {}
    records = load_claims(claims) if executed else []
    table = claims_markdown(records, seed_sweep.stability(sweep)) if executed else NOT_EXECUTED
    figure = forest_plot(records)
    forest = ""
    if figure is not None:
        figure.savefig(page.parent / FOREST, dpi=110)
        forest = f"![One row per claim: its effect, 95% interval, threshold and A/A band]({FOREST})\n"
    page.write_text(page.read_text().replace("<!-- CLAIMS TABLE -->", table).replace("<!-- FOREST PLOT -->", forest)
                    .replace("<!-- SEED SWEEP -->", seed_sweep.sweep_markdown(sweep)))


def render(stage: Path | None = None, html: Path | None = None) -> int:
    """Run ``jupyter-book build -W`` on ``stage`` into ``html`` (default _build/html); return its exit code."""
    stage, html = stage or STAGE, html or BUILD / "html"
    workdir = html.parent / f".jb-{html.name}"  # jupyter-book writes <path-output>/_build/{html,jupyter_execute}
    for path in (html, workdir):
        if path.exists():
            shutil.rmtree(path)
    cmd = ["jupyter-book", "build", str(stage), "--path-output", str(workdir), "-W", "-n", "--keep-going"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode == 0:
        shutil.move(str(workdir / "_build" / "html"), str(html))
        shutil.rmtree(workdir)
        print(f"book: {html / 'index.html'}")
    return result.returncode


def build(execute: bool = True, build_dir: Path | None = None, profile: str = "ci",
          notebooks: list[Path] | None = None, gpus: str | None = None) -> int:
    """Stage, (optionally) execute on ``profile``, fill the report and render into ``build_dir``/html.
    ``gpus`` ("0,1") spreads a full-profile run over those GPUs (default: every visible one)."""
    build_dir = build_dir or BUILD
    stage, claims = build_dir / "src", build_dir / "claims"
    stage_sources(stage)
    if claims.exists():
        shutil.rmtree(claims)
    os.environ["EFFNB_REPORT_DIR"] = str(claims)
    if execute:
        executed = build_dir / "executed"
        args = ["--out", str(executed), "--runtimes", str(stage / "book" / "runtimes.md"), "--profile", profile]
        args += ["--gpus", gpus] if gpus else []
        code = run_notebooks.main(args + [str(p) for p in notebooks or []])
        if code:
            return code
        use_executed(executed, stage)
    write_report(stage, claims, executed=execute)
    return render(stage, build_dir / "html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-execute", action="store_true",
                        help="render the stored outputs instead of executing (fast; for checking the layout)")
    parser.add_argument("--build-dir", type=Path, default=BUILD,
                        help="where to stage and render (default _build; the site lands in BUILD_DIR/html)")
    args = parser.parse_args(argv)
    return build(execute=not args.no_execute, build_dir=args.build_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
