"""GPU smoke run: every chapter's full-profile code path, with steps and seeds cut, on one GPU.

  python scripts/gpu_smoke.py            # needs a CUDA GPU; writes data/results/gpu-smoke.json
  make gpu-smoke                         # the same

Each chapter runs with ``PROFILE="full"`` and ``EFFNB_SMOKE=1`` (``effnb.config.Run.pick`` then
returns its ``smoke=`` value: the full profile's sizes, fewer steps and seeds). The executed
copies go to _build/gpu-smoke/ (never over notebooks/); the JSON names the card, the time and
pass or fail of every chapter, and whether the whole run kept within its budget. DESIGN asks
for ≤ 8 minutes on one H100-class GPU, so that the rest of a lent GPU's time can go to one
chapter's real full profile.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import papermill
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402

BUDGET_S = 8 * 60.0
RESULT = ROOT / "data" / "results" / "gpu-smoke.json"
OUT = ROOT / "_build" / "gpu-smoke"


def smoke(notebooks: list[Path], out: Path) -> list[dict]:
    """Run each notebook on the full profile with ``EFFNB_SMOKE=1``; one row per chapter.

    A chapter that fails is recorded with its error and the run goes on to the next one.
    """
    os.environ["EFFNB_SMOKE"] = "1"
    rows = []
    for notebook in notebooks:
        print(f"smoke: {notebook.name} ...", flush=True)
        start = time.perf_counter()
        try:
            run_notebooks.execute(notebook, out / notebook.name, "full")
            row = {"chapter": notebook.stem, "passed": True}
        except papermill.PapermillExecutionError as err:
            row = {"chapter": notebook.stem, "passed": False, "error": f"{err.ename}: {err.evalue}"[:500]}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(f"  {'passed' if row['passed'] else 'FAILED'} in {row['seconds']} s", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    parser.add_argument("--result", type=Path, default=RESULT, help="where to write the JSON record")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the executed copies")
    args = parser.parse_args(argv)
    card = run_notebooks.gpu_name()
    if card is None:
        print("No CUDA GPU found: the GPU smoke run needs one; on this machine use `make test` "
              "or `make book` (ci profile) instead.", file=sys.stderr)
        return 2
    notebooks = [p.resolve() for p in args.notebooks] or run_notebooks.toc_notebooks()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EFFNB_BLOCK_NETWORK="1")
    os.environ.setdefault("EFFNB_PROGRESS", "0")
    os.environ["EFFNB_WIDGETS"] = "0"
    rows = smoke(notebooks, args.out)
    total = sum(r["seconds"] for r in rows)
    record = {
        "card": card,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "budget_s": BUDGET_S,
        "total_s": round(total, 1),
        "within_budget": total <= BUDGET_S,
        "all_passed": all(r["passed"] for r in rows),
        "chapters": rows,
    }
    args.result.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.result.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, args.result)
    print(f"{card}: {sum(r['passed'] for r in rows)}/{len(rows)} chapters passed in {total:.0f} s "
          f"(budget {BUDGET_S:.0f} s) -> {args.result}")
    return 0 if record["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
