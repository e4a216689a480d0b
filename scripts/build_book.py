"""Build the HTML book: execute every chapter (ci profile) into _build, then render with Jupyter Book.

Tracked files are never modified. The book's sources are staged in _build/src, the notebooks
there are replaced by freshly executed copies, the run-time table and the reproduction report
are generated from that execution, and `jupyter-book build -W` renders _build/html.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402

from effnb.report import claims_markdown, load_claims  # noqa: E402

BUILD = ROOT / "_build"
STAGE = BUILD / "src"
CLAIMS = BUILD / "claims"


def stage_sources() -> None:
    """Copy what the book renders into _build/src."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, STAGE / name)
    shutil.copytree(ROOT / "book", STAGE / "book")
    shutil.copytree(ROOT / "notebooks", STAGE / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))


def write_report() -> None:
    """Fill the staged reproduction-report page with the claims this build recorded."""
    page = STAGE / "book" / "reproduction.md"
    text = page.read_text().replace("<!-- CLAIMS TABLE -->", claims_markdown(load_claims(CLAIMS)))
    page.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-execute", action="store_true",
                        help="render the stored outputs instead of executing (fast; for checking the layout)")
    args = parser.parse_args(argv)

    stage_sources()
    if CLAIMS.exists():
        shutil.rmtree(CLAIMS)
    os.environ["EFFNB_REPORT_DIR"] = str(CLAIMS)
    if not args.no_execute:
        executed = BUILD / "executed"
        code = run_notebooks.main(["--out", str(executed), "--runtimes", str(STAGE / "book" / "runtimes.md")])
        if code:
            return code
        for notebook in executed.glob("*.ipynb"):
            shutil.copy2(notebook, STAGE / "notebooks" / notebook.name)
    write_report()
    html = BUILD / "html"
    if html.exists():
        shutil.rmtree(html)
    cmd = ["jupyter-book", "build", str(STAGE), "--path-output", str(BUILD.parent), "-W", "-n", "--keep-going"]
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode == 0:
        print(f"book: {html / 'index.html'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
