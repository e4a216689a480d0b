"""Execute chapter notebooks with papermill, time each one, and write the run-time table.

  python scripts/run_notebooks.py --out _build/executed          # executed copies elsewhere
  python scripts/run_notebooks.py --refresh                      # store ci outputs in notebooks/
  python scripts/run_notebooks.py --out DIR --runtimes book/runtimes.md   # the benchmark
  python scripts/run_notebooks.py --out DIR --profile full --gpus 0,1,2,3 # four chapters at a time

The sources in notebooks/ are only written with --refresh, and only by a run that succeeded: each
notebook executes into a temporary file beside it that replaces the source at the end (os.replace),
so a failing chapter leaves its source as it was. Offline by default: the runs set
HF_HUB_OFFLINE=1 and EFFNB_BLOCK_NETWORK=1 unless --allow-network is given.

On the full profile with several GPUs visible (or named with --gpus), the chapters run in parallel,
one per GPU: each in its own papermill process that sees only its GPU (CUDA_VISIBLE_DEVICES), the
next chapter in _toc.yml order starting on whichever GPU frees up first. With one GPU, or on the
ci profile, they run one after another in this process. A measured time is then the chapter's own
wall time on its GPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import papermill
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_BUDGET_S = 120.0
BOOK_BUDGET_S = 15 * 60.0


def toc_files(root: Path = ROOT) -> list[str]:
    """Every ``file:`` entry of _toc.yml (without extension), in order."""
    files: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load((root / "_toc.yml").read_text()))
    return files


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """Chapter notebooks in the order _toc.yml lists them."""
    return [root / f"{f}.ipynb" for f in toc_files(root) if (root / f"{f}.ipynb").exists()]


def gpu_name() -> str | None:
    """The name of the first CUDA GPU, or None when there is none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def strip_run_metadata(path: Path) -> None:
    """Drop papermill's per-cell timing metadata so refreshed notebooks diff cleanly."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def execute(notebook: Path, output: Path, profile: str) -> float:
    """Run one notebook with papermill into ``output``; return its wall time in seconds."""
    output.parent.mkdir(parents=True, exist_ok=True)
    parameters = {} if profile == "ci" else {"PROFILE": profile}
    start = time.perf_counter()
    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name="python3",
        cwd=str(output.parent), progress_bar=False, log_output=False,
    )
    return time.perf_counter() - start


def execute_on_gpu(notebook: Path, output: Path, profile: str, gpu: str) -> float:
    """Run one notebook with papermill in a process that sees only GPU ``gpu`` (``CUDA_VISIBLE_DEVICES``);
    return its wall time in seconds. Raises ``RuntimeError`` with papermill's last lines when it fails."""
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "papermill", str(notebook), str(output), "-k", "python3", "--cwd",
               str(output.parent), "--no-progress-bar", "-p", "PROFILE", profile]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{notebook.name} failed on GPU {gpu}: {done.stderr.strip()[-800:]}")
    return time.perf_counter() - start


def schedule(notebooks: Sequence[Path], devices: Sequence[str], run_one: Callable[[Path, str], float]) -> dict[Path, float]:
    """Run ``run_one(notebook, device)`` for every notebook, at most one notebook per device at a time and
    ``len(devices)`` at once, starting them in the given order as devices free up; return each one's time.

    Every notebook runs even when another fails; the first failure is raised at the end.
    """
    if not devices:
        raise ValueError("no devices to run on; pass at least one (e.g. ['0']).")
    free: queue.Queue[str] = queue.Queue()
    for device in devices:
        free.put(device)

    def task(notebook: Path) -> float:
        device = free.get()
        try:
            return run_one(notebook, device)
        finally:
            free.put(device)

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [pool.submit(task, nb) for nb in notebooks]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]
    return {nb: f.result() for nb, f in zip(notebooks, futures)}


def visible_gpus(requested: str | None) -> list[str]:
    """The GPUs to spread chapters over: ``requested`` ("0,2") or every CUDA device torch sees."""
    if requested:
        gpus = [g.strip() for g in requested.split(",") if g.strip()]
        if not gpus or not all(g.isdigit() for g in gpus):
            raise ValueError(f"--gpus {requested!r} must list GPU indices separated by commas, e.g. --gpus 0,1.")
        return gpus
    return [str(i) for i in range(torch.cuda.device_count())]


def refresh(notebook: Path) -> float:
    """Run ``notebook`` on the ci profile and store its outputs in it, only if every cell succeeds.

    It executes into a temporary file in the same folder (same working directory for the run);
    the source is replaced with ``os.replace`` at the end, and on any error the temporary file is
    deleted and the source is left untouched. Returns the wall time in seconds.
    """
    from effnb.data import atomic_path

    with atomic_path(notebook) as tmp:
        seconds = execute(notebook, tmp, "ci")
        strip_run_metadata(tmp)
    return seconds


def runtime_table(times: dict[str, float], profile: str) -> str:
    """The Markdown page of measured run times, with the machine they ran on."""
    from effnb.measure import cpu_name

    total = sum(times.values())
    lines = [
        "# Run times",
        "",
        f"Measured by `scripts/run_notebooks.py` on {dt.date.today().isoformat()}: profile `{profile}`, "
        f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
        f"Each time includes starting the kernel. Budget on the ci profile: ≤ {NOTEBOOK_BUDGET_S:.0f} s a chapter, "
        f"≤ {BOOK_BUDGET_S / 60:.0f} min for the book.",
        "",
        "| chapter | wall time (s) | within budget |",
        "| --- | ---: | --- |",
    ]
    for name, seconds in times.items():
        lines.append(f"| {name} | {seconds:.1f} | {'yes' if seconds <= NOTEBOOK_BUDGET_S else '**no**'} |")
    lines.append(f"| **whole book** | {total:.1f} | {'yes' if total <= BOOK_BUDGET_S else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for the executed copies")
    where.add_argument("--refresh", action="store_true", help="write the outputs back into notebooks/")
    parser.add_argument("--profile", default="ci", choices=["ci", "full"])
    parser.add_argument("--runtimes", type=Path, help="write the run-time table (Markdown) here")
    parser.add_argument("--allow-network", action="store_true", help="let the notebooks reach the internet")
    parser.add_argument("--gpus", help="full profile: GPU indices to run chapters on in parallel, e.g. 0,1 "
                                       "(default: every visible GPU; one GPU runs them one after another)")
    args = parser.parse_args(argv)

    notebooks = [p.resolve() for p in args.notebooks] or toc_notebooks()
    missing = [str(p) for p in notebooks if not p.exists()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.refresh and args.profile != "ci":
        parser.error("--refresh stores ci-profile outputs only; use --out for the full profile.")
    os.environ.setdefault("EFFNB_PROGRESS", "0" if args.refresh else "1")
    os.environ["EFFNB_WIDGETS"] = "0"  # text bars and default figures: no widget state in stored outputs
    if not args.allow_network:
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", EFFNB_BLOCK_NETWORK="1")

    try:
        gpus = visible_gpus(args.gpus) if args.profile == "full" else []
    except ValueError as err:
        parser.error(str(err))
    if len(gpus) > 1:
        return run_in_parallel(notebooks, gpus, args)
    times: dict[str, float] = {}
    for notebook in notebooks:
        print(f"running {notebook.name} ({args.profile}) ...", flush=True)
        try:
            times[notebook.stem] = refresh(notebook) if args.refresh else execute(
                notebook, args.out / notebook.name, args.profile)
        except papermill.PapermillExecutionError as err:
            print(f"FAILED {notebook.name}: {err.ename}: {err.evalue}", file=sys.stderr)
            return 1
        print(f"  {times[notebook.stem]:.1f} s", flush=True)
    return finish(times, args)


def run_in_parallel(notebooks: list[Path], gpus: list[str], args: argparse.Namespace) -> int:
    """The full profile on several GPUs: :func:`schedule` with :func:`execute_on_gpu`."""
    print(f"running {len(notebooks)} chapters ({args.profile}) on GPUs {', '.join(gpus)}, one chapter per GPU ...",
          flush=True)

    def run_one(notebook: Path, gpu: str) -> float:
        seconds = execute_on_gpu(notebook, args.out / notebook.name, args.profile, gpu)
        print(f"  {notebook.name}: {seconds:.1f} s on GPU {gpu}", flush=True)
        return seconds

    start = time.perf_counter()
    try:
        times = {nb.stem: s for nb, s in schedule(notebooks, gpus, run_one).items()}
    except RuntimeError as err:
        print(f"FAILED {err}", file=sys.stderr)
        return 1
    print(f"wall time {time.perf_counter() - start:.1f} s on {len(gpus)} GPUs")
    return finish(times, args)


def finish(times: dict[str, float], args: argparse.Namespace) -> int:
    """Write the run-time table when asked and print the total."""
    if args.runtimes:
        args.runtimes.parent.mkdir(parents=True, exist_ok=True)
        args.runtimes.write_text(runtime_table(times, args.profile))
        print(f"wrote {args.runtimes}")
    print(f"total {sum(times.values()):.1f} s for {len(times)} notebooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
