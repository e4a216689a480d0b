"""Dry run of the full profile on the CPU: every chapter's full-size code path, with every repetition cut.

  python scripts/full_dry.py                         # every chapter in _toc.yml
  python scripts/full_dry.py notebooks/03_dqas.ipynb --timeout 120
  make full-dry                                      # the same

Each chapter runs with ``PROFILE="full"``, ``DEVICE="cpu"`` and ``EFFNB_SMOKE=dry``:
``effnb.config.Run.pick`` then returns a chapter's ``dry=`` value (else its ``smoke=`` value) for a
repetition (training steps, seeds, samples, timing rounds) and the full profile's own value for every
size (widths, depths, data and image sizes, batch sizes, token counts), and ``effnb.config.DeviceCheck``
raises where a tensor would sit on the host beside a model on the GPU. The executed copies go to
``_build/full-dry/`` (never over ``notebooks/``; nbval compares nothing in them). A verdict from a step or
two is meaningless, so a dry run's verdicts are never results: only that every cell ran.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402

OUT = ROOT / "_build" / "full-dry"


def dry_run(notebook: Path, out: Path, timeout: float) -> dict:
    """Run one chapter dry in its own papermill process; one row: chapter, passed, seconds, error."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EFFNB_SMOKE": "dry", "EFFNB_PROGRESS": "0", "EFFNB_WIDGETS": "0",
           "EFFNB_BLOCK_NETWORK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "papermill", str(notebook), str(out / notebook.name), "-k", "python3",
               "--cwd", str(out), "--no-progress-bar", "-p", "PROFILE", "full", "-p", "DEVICE", "cpu"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        error = "" if done.returncode == 0 else _last_error(done.stderr)
    except subprocess.TimeoutExpired:
        error = f"did not finish in {timeout:.0f} s"
    return {"chapter": notebook.stem, "passed": not error, "seconds": round(time.perf_counter() - start, 1),
            "error": error}


def _last_error(stderr: str) -> str:
    """The exception line papermill prints last (``SomeError: message``), or the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    found = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))
             and not line.startswith("papermill.")]                  # papermill's wrapper, not the cell's error
    return (found or lines or ["no message"])[-1][:500]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the executed copies")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a chapter may take")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or run_notebooks.toc_notebooks()
    rows = []
    for notebook in notebooks:
        row = dry_run(notebook, args.out, args.timeout)
        rows.append(row)
        print(f"{row['chapter']:28s} {'passed' if row['passed'] else 'FAILED'} in {row['seconds']:6.1f} s  "
              f"{row['error']}", flush=True)
    total = sum(r["seconds"] for r in rows)
    print(f"{sum(r['passed'] for r in rows)}/{len(rows)} chapters ran dry in {total:.0f} s -> {args.out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
