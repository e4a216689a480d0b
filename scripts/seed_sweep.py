"""Run every chapter (ci profile) on other seeds and record whether it completes and what it concludes.

  python scripts/seed_sweep.py --seeds 0 10 11 20       # what `make seeds` runs (the stored sweep)
  python scripts/seed_sweep.py notebooks/08_fbpt.ipynb --seeds 0 10 11

Each chapter runs with papermill and ``-p SEED <seed>`` into ``_build/seeds/<seed>/``, with
``EFFNB_REPORT_DIR`` pointing at that run's own claims folder. For every chapter and seed the sweep
stores in ``data/results/seed-sweep.json``:

- ``completed`` (bool) and, when a cell raised, ``error`` (the cell's number and the exception);
- ``claims``: every record the chapter made with :func:`effnb.report.record_claim` (kind, verdict, this
  run's figure);
- ``nbval``: the text of every ``# NBVAL_CHECK_OUTPUT`` cell, sanitized as nbval sanitizes it
  (``nbval_sanitize.cfg``), so that ``tests/test_conventions.py`` can check that what nbval compares is
  the same on every seed;
- ``seconds``: the chapter's wall time;

and, once for the file, the machine (CPU model and instruction sets), Python, torch, the commit and the date.

The sweep is resumable: a finished run is kept in ``_build/seeds/<seed>/<chapter>.json`` together with a
fingerprint of the chapter's source and of ``effnb/``; it is reused while neither changed. The results file
is rewritten after every run, so an interrupted sweep loses at most the chapter it was running.
"""
from __future__ import annotations

import argparse
import configparser
import datetime as dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import papermill
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_notebooks  # noqa: E402

from effnb.data import atomic_path  # noqa: E402
from effnb.measure import cpu_instruction_sets, cpu_name  # noqa: E402
from effnb.report import load_claims  # noqa: E402

OUT = ROOT / "_build" / "seeds"
RESULTS = ROOT / "data" / "results" / "seed-sweep.json"
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def sanitizers(config: Path = ROOT / "nbval_sanitize.cfg") -> list[tuple[re.Pattern, str]]:
    """The (regex, replacement) pairs nbval applies before it compares outputs."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    return [(re.compile(parser[s]["regex"]), parser[s]["replace"]) for s in parser.sections()]


def checked_outputs(nb: nbformat.NotebookNode, rules: list[tuple[re.Pattern, str]] | None = None) -> list[str]:
    """The text every ``# NBVAL_CHECK_OUTPUT`` cell of ``nb`` printed (streams and plain-text results),
    sanitized as nbval does, one string per cell in order."""
    rules = sanitizers() if rules is None else rules
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code" or CHECK_MARK not in cell.source:
            continue
        parts = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
        text = "".join(parts)
        for pattern, replacement in rules:
            text = pattern.sub(replacement, text)
        texts.append(text)
    return texts


def fingerprint(notebook: Path) -> str:
    """sha256 over the chapter's code cells, every file of ``effnb/`` and the checkpoints' manifest: a stored run
    is reused only while all are unchanged (an edit of the prose alone changes no result)."""
    digest = hashlib.sha256()
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    for path in [*sorted((ROOT / "effnb").glob("*.py")), ROOT / "data" / "checkpoints" / "SHA256SUMS"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def commit() -> str:
    """The commit checked out, with ``+changes`` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def run_one(notebook: Path, seed: int, out: Path) -> dict:
    """Run ``notebook`` on the ci profile with ``SEED=seed``; return its record (see the module docstring)."""
    folder = out / str(seed)
    claims_dir = folder / "claims" / notebook.stem
    if claims_dir.exists():
        for stale in claims_dir.glob("*.json"):
            stale.unlink()
    executed = folder / notebook.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    os.environ["EFFNB_REPORT_DIR"] = str(claims_dir)
    record: dict = {"completed": True, "error": None}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters={"SEED": seed}, kernel_name="python3",
                                   cwd=str(folder), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as err:
        record.update(completed=False, error=f"cell {err.exec_count}: {err.ename}: {err.evalue}"[:600])
    except Exception as err:                       # a dead kernel, a timeout: recorded, and the sweep goes on
        record.update(completed=False, error=f"{type(err).__name__}: {err}"[:600])
    finally:
        os.environ.pop("EFFNB_REPORT_DIR", None)
    record["seconds"] = round(time.perf_counter() - start, 1)
    claims = load_claims(claims_dir) if claims_dir.exists() else []
    record["claims"] = [{"kind": c.kind, "claim": c.claim, "verdict": c.verdict(), "outcome": c.status, "ours": c.ours,
                         "value": c.value, "threshold": c.threshold, "lo": c.lo, "hi": c.hi} for c in claims]
    record["nbval"] = checked_outputs(nbformat.read(executed, as_version=4)) if executed.exists() else []
    return record


def machine() -> dict:
    """Where the sweep ran."""
    return {"cpu": cpu_name(), "instruction_sets": cpu_instruction_sets(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def sweep(notebooks: list[Path], seeds: list[int], out: Path = OUT, results: Path = RESULTS) -> dict:
    """Run every chapter on every seed (reusing finished runs), writing ``results`` after each; return it."""
    data = json.loads(results.read_text()) if results.exists() else {}
    runs: dict = data.get("runs", {})
    for seed in seeds:
        for notebook in notebooks:
            cache = out / str(seed) / f"{notebook.stem}.json"
            key = fingerprint(notebook)
            stored = json.loads(cache.read_text()) if cache.exists() else {}
            if stored.get("fingerprint") == key:
                record = stored["record"]
                print(f"seed {seed} {notebook.stem}: reused ({'completed' if record['completed'] else 'FAILED'})",
                      flush=True)
            else:
                print(f"seed {seed} {notebook.stem}: running ...", flush=True)
                record = run_one(notebook, seed, out)
                record["commit"] = commit()
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps({"fingerprint": key, "record": record}, indent=1) + "\n")
                print(f"  {'completed' if record['completed'] else 'FAILED: ' + record['error']} "
                      f"in {record['seconds']:.0f} s", flush=True)
            record["fingerprint"] = key[:16]
            runs.setdefault(notebook.stem, {})[str(seed)] = record
            data = {"machine": machine(), "commit": commit(), "date": dt.date.today().isoformat(),
                    "seeds": sorted({int(s) for ch in runs.values() for s in ch}),
                    "runs": {ch: dict(sorted(runs[ch].items(), key=lambda kv: int(kv[0]))) for ch in sorted(runs)}}
            results.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(results) as tmp:
                tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data


def outcome_of(record: dict) -> str:
    """A stored claim's verdict: its ``outcome``, or for a record stored before claims had intervals, the word in
    its verdict line (``[NOT reproduced] ...`` -> ``"not reproduced"``)."""
    return record.get("outcome") or record["verdict"].split("]", 1)[0].lstrip("[").lower()


def stability(data: dict) -> dict[tuple[str, str], list[str]]:
    """``(chapter, claim)`` -> its outcome at each swept seed, in the sweep's order (``""`` where the seed has no
    such claim): what the report page shows beside each claim."""
    seeds, table = [str(s) for s in data.get("seeds", [])], {}
    for chapter, by_seed in data.get("runs", {}).items():
        for i, s in enumerate(seeds):
            for record in by_seed.get(s, {}).get("claims", []):
                if record["kind"] == "claim":
                    table.setdefault((chapter, record["claim"]), [""] * len(seeds))[i] = outcome_of(record)
    return table


def sweep_markdown(data: dict) -> str:
    """Markdown for the reproduction report: per chapter and seed, whether the chapter completed and each
    measured claim's verdict, with where and when the sweep ran."""
    if not data.get("runs"):
        return "No seed sweep is stored yet (`make seeds`).\n"
    machine, seeds = data["machine"], [str(s) for s in data["seeds"]]
    lines = [f"Stored by `make seeds` on {data['date']} (commit {data['commit']}): {machine['cpu']}, "
             f"{machine['cores']} cores, torch {machine['torch']}. A claim whose verdict differs between seeds is "
             "inside its noise at this scale.", "",
             "| chapter | claim | " + " | ".join(f"SEED={s}" for s in seeds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
    for chapter, by_seed in data["runs"].items():
        failed = [s for s in seeds if s in by_seed and not by_seed[s]["completed"]]
        if failed:
            lines.append(f"| {chapter} | **did not complete** at seeds {', '.join(failed)} | "
                         + " | ".join("" for _ in seeds) + " |")
        claims = {}
        for s in seeds:
            for record in by_seed.get(s, {}).get("claims", []):
                if record["kind"] == "claim":
                    claims.setdefault(record["claim"], {})[s] = outcome_of(record)
        for claim, marks in claims.items():
            cells = [marks.get(s, "") for s in seeds]
            lines.append(f"| {chapter} | {claim.replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="the values of SEED to run, e.g. 10 11")
    parser.add_argument("--out", type=Path, default=OUT, help="executed copies and per-run records (default _build/seeds)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="default data/results/seed-sweep.json")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or run_notebooks.toc_notebooks()
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds takes non-negative integers, e.g. --seeds 10 11.")
    os.environ.update(EFFNB_PROGRESS="0", EFFNB_WIDGETS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      EFFNB_BLOCK_NETWORK="1")
    data = sweep(notebooks, args.seeds, args.out.resolve(), args.results.resolve())
    failed = [f"{ch} at seed {s}" for ch, by_seed in data["runs"].items() for s, r in by_seed.items()
              if int(s) in args.seeds and not r["completed"]]
    print(f"wrote {args.results}: {len(notebooks)} chapters x seeds {args.seeds}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every run completed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
