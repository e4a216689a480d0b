"""Time fp32 ``torch.matmul`` of ±1 matrices against the XNOR-popcount product of effnb.xnor on this CPU.

  python scripts/bench_binary.py                         # K = 1024 4096 16384, M = N = 256
  python scripts/bench_binary.py --k 4096 --m 64 --json _build/bench-binary.json

For each K it builds ±1 matrices A (M, K) and B (N, K), checks that the packed product equals
``A @ B.T`` exactly, then reports median times (effnb.measure.latency, after warm-up): fp32, the
popcount GEMM on operands packed beforehand (``binary_ms``), packing A alone (``pack_a_ms``) and the
whole path, packing A included (``whole_ms``; B, the weights, is packed once), with the ratios
``popcount_ratio`` = fp32 / GEMM and ``whole_path_ratio`` = fp32 / whole path. The CPU model, its
instruction sets, popcount support, the engine (compiled or the torch fallback) and the thread
count are printed first and stored with ``--json``, since a speed depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from effnb.binary import popcount_support
from effnb.measure import cpu_instruction_sets, cpu_name, latency
from effnb.xnor import engine, interleave, pack_signs, popcount_gemm


def operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ±1 float32 matrices A (M, K) and B (N, K)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (m, k), generator=gen).float() * 2 - 1,
            torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1)


def agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the packed product equals ``a @ b.T`` exactly (every |entry| <= K < 2^24 is exact in fp32)."""
    packed = popcount_gemm(pack_signs(a), interleave(pack_signs(b)), len(b), a.shape[1])
    return bool(torch.equal(packed.float(), a @ b.T))


def machine() -> dict:
    """What the timings depend on."""
    return {"cpu": cpu_name(), "instruction_sets": cpu_instruction_sets(), "popcount": popcount_support(),
            "engine": engine(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def bench(k: int, m: int, n: int, warmup: int, repeats: int) -> dict:
    """One row: times in milliseconds, GFLOP/s equivalents, the two ratios, and whether the results agree."""
    a, b = operands(m, n, k)
    a_packed, weights = pack_signs(a), interleave(pack_signs(b))
    time = lambda fn: latency(fn, warmup=warmup, repeats=repeats)
    float_s = time(lambda: torch.matmul(a, b.T))
    binary_s = time(lambda: popcount_gemm(a_packed, weights, n, k))
    pack_s = time(lambda: pack_signs(a))
    whole_s = time(lambda: popcount_gemm(pack_signs(a), weights, n, k))
    flop = 2 * m * n * k
    return {"k": k, "m": m, "n": n, "fp32_ms": float_s * 1e3, "binary_ms": binary_s * 1e3,
            "pack_a_ms": pack_s * 1e3, "whole_ms": whole_s * 1e3, "fp32_gflops": flop / float_s / 1e9,
            "binary_gflops_equiv": flop / binary_s / 1e9, "popcount_ratio": float_s / binary_s,
            "whole_path_ratio": float_s / whole_s, "equal": agree(a, b)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096, 16384], help="inner sizes K")
    parser.add_argument("--m", type=int, default=256, help="rows of A")
    parser.add_argument("--n", type=int, default=None, help="rows of B (default: M)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    n = args.n or args.m
    info = machine()
    print(f"CPU: {info['cpu']}\ninstruction sets: {' '.join(info['instruction_sets'])}")
    print(f"popcount: {info['popcount']}  engine: {info['engine']}  threads: {info['threads']}")
    print(f"{'K':>7} {'fp32 ms':>9} {'GEMM ms':>9} {'pack A ms':>10} {'whole ms':>9} {'GEMM ratio':>11} "
          f"{'whole ratio':>12}  equal")
    rows = []
    for k in args.k:
        row = bench(k, args.m, n, args.warmup, args.repeats)
        rows.append(row)
        print(f"{k:>7} {row['fp32_ms']:>9.3f} {row['binary_ms']:>9.3f} {row['pack_a_ms']:>10.3f} {row['whole_ms']:>9.3f} "
              f"{row['popcount_ratio']:>10.2f}x {row['whole_path_ratio']:>11.2f}x  {row['equal']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
