"""Run one chapter's sweep of the experiments tier and store it in ``data/results/<chapter>.json``.

  python scripts/experiments.py --chapter 02                # what `make experiments CHAPTER=02` runs
  python scripts/experiments.py --chapter 02 --device cuda  # the same sweep, extended, on a GPU

A sweep (``scripts/sweeps/<name>.py``) runs every (point, seed) of its axis; see :mod:`effnb.experiments` for
the stored file. Resumable: each finished (point, seed) is written at once to
``_build/experiments/<chapter>-<device>.json`` with a fingerprint of the sweep's code (its module, the chapter's
functions it runs and the effnb modules it uses), and reused while that fingerprint holds; a stopped run
continues where it stopped. When every (point, seed) is done, the results file is replaced atomically. The progress bar counts work (a
sweep's ``cost(x)``, e.g. training steps), so that its ETA holds when points differ in size. A GPU
run writes ``<chapter>-cuda.json`` beside the CPU one. Never run by `make test` or `make book`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from seed_sweep import commit  # noqa: E402

from effnb.data import atomic_path  # noqa: E402
from effnb.experiments import MIN_POINTS, MIN_SEEDS, RESULTS_DIR, validate  # noqa: E402
from effnb.measure import cpu_instruction_sets, cpu_name  # noqa: E402

SWEEPS = {"02": "speed", "03": "dqas", "04": "lad", "05": "ptq4dit", "07": "bimtdp", "08": "fbpt", "09": "prumerge",
          "10": "tracing"}
PARTIAL = ROOT / "_build" / "experiments"


def sweep_module(chapter: str):
    """The sweep of chapter ``chapter`` ("02" or "2")."""
    key = f"{int(chapter):02d}" if str(chapter).isdigit() else str(chapter)
    if key not in SWEEPS:
        raise SystemExit(f"chapter {chapter!r} has no sweep in the experiments tier yet; choose one of "
                         f"{sorted(SWEEPS)}, e.g. make experiments CHAPTER=02.")
    return importlib.import_module(f"sweeps.{SWEEPS[key]}")


def fingerprint(module, sources: dict[str, str]) -> str:
    """sha256 of the sweep's module, the chapter functions it runs and the effnb modules it names."""
    digest = hashlib.sha256(Path(module.__file__).read_bytes())
    for name in sorted(sources):
        digest.update(name.encode() + sources[name].encode())
    for name in module.EFFNB_MODULES:
        digest.update((ROOT / "effnb" / f"{name}.py").read_bytes())
    return digest.hexdigest()


def run_sweep(module, device: torch.device, seeds: list[int], results_dir: Path = RESULTS_DIR,
              partial_dir: Path = PARTIAL) -> Path:
    """Run every (point, seed) not yet stored, then write the results file; return its path."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    if len(module.POINTS[kind]) < MIN_POINTS or len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds):
        raise SystemExit(f"{module.CHAPTER}'s sweep plans {len(module.POINTS[kind])} points and seeds {seeds}; the tier "
                         f"needs at least {MIN_POINTS} points and {MIN_SEEDS} distinct seeds: fix POINTS or SEEDS.")
    context = module.setup(device)
    key = fingerprint(module, context["sources"])
    partial_path = partial_dir / f"{module.CHAPTER}-{kind}.json"
    partial = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    if partial.get("fingerprint") != key:
        if partial:
            print(f"{partial_path}: the sweep's code changed since it was written; starting afresh.")
        partial = {"fingerprint": key, "runs": {}}
    jobs = [(x, s) for x in module.POINTS[kind] for s in seeds]
    todo = [(x, s) for x, s in jobs if f"{x}/{s}" not in partial["runs"]]
    print(f"{module.CHAPTER}: {len(jobs)} (point, seed) runs on {kind}, {len(jobs) - len(todo)} already done")
    cost = getattr(module, "cost", lambda x: 1)          # the bar counts work, so that its ETA holds
    bar = tqdm(total=sum(cost(x) for x, _ in jobs), initial=sum(cost(x) for x, s in jobs if (x, s) not in todo),
               desc=f"{module.CHAPTER} sweep", unit=getattr(module, "COST_UNIT", "run"))
    for x, seed in todo:
        start = time.perf_counter()
        values = module.run(context, x, seed)
        partial["runs"][f"{x}/{seed}"] = {"values": values, "seconds": time.perf_counter() - start}
        with atomic_path(partial_path) as tmp:
            tmp.write_text(json.dumps(partial, indent=1))
        bar.update(cost(x))
    bar.close()
    points = []
    for x in module.POINTS[kind]:
        runs = [partial["runs"][f"{x}/{s}"] for s in seeds]
        points.append({"config": module.config(x), "seeds": seeds,
                       "values": {arm: [r["values"][arm] for r in runs] for arm in runs[0]["values"]},
                       "seconds": round(sum(r["seconds"] for r in runs), 1)})
    data = {"chapter": module.CHAPTER, "axis": module.AXIS, "axis_label": module.AXIS_LABEL,
            "provenance": {"commit": commit(), "code": key, "cpu": cpu_name(), "instruction_sets": cpu_instruction_sets(),
                           "device": torch.cuda.get_device_name(device) if kind == "cuda" else "cpu",
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "date": dt.date.today().isoformat(),
                           "wall_s": round(sum(p["seconds"] for p in points), 1),
                           "command": f"make experiments CHAPTER={module.CHAPTER[:2]}"
                                      + (" DEVICE=cuda" if kind == "cuda" else "")},
            "points": points}
    validate(data, module.CHAPTER)
    path = Path(results_dir) / (f"{module.CHAPTER}.json" if kind == "cpu" else f"{module.CHAPTER}-cuda.json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} ({data['provenance']['wall_s']:.0f} s of runs)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chapter", required=True, help="the chapter's number, e.g. 02")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds 0..N-1 (at least {MIN_SEEDS}; default: the sweep's SEEDS, else {MIN_SEEDS})")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < MIN_SEEDS:
        raise SystemExit(f"--seeds {args.seeds} is too few; the tier needs at least {MIN_SEEDS}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU and a CUDA build of torch; run with --device cpu instead.")
    module = sweep_module(args.chapter)
    seeds = getattr(module, "SEEDS", MIN_SEEDS) if args.seeds is None else args.seeds
    os.environ.setdefault("EFFNB_PROGRESS", "0")        # one bar, the sweep's, with its ETA
    run_sweep(module, torch.device(args.device), list(range(seeds)) if isinstance(seeds, int) else list(seeds))


if __name__ == "__main__":
    main()
