"""Build the book's full edition: every chapter run with PROFILE="full" on a GPU, rendered as a second site.

  python scripts/build_full_edition.py                 # needs a CUDA GPU; writes _build/full/html
  python scripts/build_full_edition.py --allow-cpu     # run the full profile anyway (slow)
  python scripts/build_full_edition.py --gpus 0,1      # chapters in parallel on GPUs 0 and 1

The chapters are executed with papermill by scripts/run_notebooks.py (``--profile full``) into
_build/full/executed (never over notebooks/), the run-time table and the reproduction report are
generated from that run, and Jupyter Book renders _build/full/html, reusing scripts/build_book.py.
With several GPUs visible the chapters run in parallel, one per GPU (scripts/run_notebooks.py); with
one they run one after another.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_book  # noqa: E402
from run_notebooks import gpu_name  # noqa: E402

FULL = ROOT / "_build" / "full"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter in _toc.yml")
    parser.add_argument("--out", type=Path, default=FULL, help="build folder (default _build/full)")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full profile without a GPU (hours)")
    parser.add_argument("--gpus", help="GPU indices to run chapters on in parallel, e.g. 0,1 (default: every visible GPU)")
    args = parser.parse_args(argv)
    gpu = gpu_name()
    if gpu is None and not args.allow_cpu:
        print("No CUDA GPU found: the full edition needs one (pass --allow-cpu to run it on the CPU anyway, "
              "or use `make book` for the ci edition).", file=sys.stderr)
        return 2
    out = args.out.resolve()
    if out in ((ROOT / "notebooks").resolve(), build_book.BUILD.resolve()):
        parser.error(f"--out {out} would overwrite the sources or the ci edition; choose another folder.")
    print(f"full edition on {gpu or 'the CPU (--allow-cpu)'} -> {out / 'html'}", flush=True)
    return build_book.build(execute=True, build_dir=out, profile="full",
                            notebooks=[p.resolve() for p in args.notebooks] or None, gpus=args.gpus)


if __name__ == "__main__":
    sys.exit(main())
