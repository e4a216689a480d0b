"""Time fp32 ``torch.matmul`` of ±1 matrices against the packed XNOR-popcount ``binary_matmul`` on this CPU.

  python scripts/bench_binary.py                         # K = 1024 4096 16384, M = N = 256
  python scripts/bench_binary.py --k 4096 --m 64 --json data/results/bench-binary.json

For each K it builds ±1 matrices A (M, K) and B (N, K), checks that the packed product equals
``A @ B.T`` exactly, then reports the median time of each (effnb.measure.latency, after warm-up),
a GFLOP/s equivalent (2·M·N·K operations per product, for both), the float/binary time ratio and
the time to pack A (which an inference layer pays for its activations on every call; the weights
B are packed once). The CPU model, its instruction sets, popcount support, the backend and the
thread count are printed first, since a speed depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from effnb.binary import BACKENDS, binary_backend, binary_matmul, pack_bits, popcount_support
from effnb.measure import cpu_instruction_sets, cpu_name, latency


def operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ±1 float32 matrices A (M, K) and B (N, K)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (m, k), generator=gen).float() * 2 - 1,
            torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1)


def agree(a: torch.Tensor, b: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the packed product equals ``a @ b.T`` exactly (every |entry| <= K < 2^24 is exact in fp32)."""
    packed = binary_matmul(pack_bits(a), pack_bits(b), a.shape[1], backend)
    return bool(torch.equal(packed.float(), a @ b.T))


def machine(backend: str) -> dict:
    """What the timings depend on."""
    used = binary_backend() if backend == "auto" else backend
    return {"cpu": cpu_name(), "instruction_sets": cpu_instruction_sets(), "popcount": popcount_support(),
            "backend": used, "threads": torch.get_num_threads(), "torch": torch.__version__}


def bench(k: int, m: int, n: int, backend: str, warmup: int, repeats: int) -> dict:
    """One row: times in milliseconds, GFLOP/s equivalents, the ratio, and whether the results agree."""
    a, b = operands(m, n, k)
    a_packed, b_packed = pack_bits(a), pack_bits(b)
    float_s = latency(lambda: torch.matmul(a, b.T), warmup=warmup, repeats=repeats)
    binary_s = latency(lambda: binary_matmul(a_packed, b_packed, k, backend), warmup=warmup, repeats=repeats)
    pack_s = latency(lambda: pack_bits(a), warmup=warmup, repeats=repeats)
    flop = 2 * m * n * k
    return {"k": k, "m": m, "n": n, "fp32_ms": float_s * 1e3, "binary_ms": binary_s * 1e3,
            "pack_a_ms": pack_s * 1e3, "fp32_gflops": flop / float_s / 1e9,
            "binary_gflops_equiv": flop / binary_s / 1e9, "speedup": float_s / binary_s,
            "equal": agree(a, b, backend)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 4096, 16384], help="inner sizes K")
    parser.add_argument("--m", type=int, default=256, help="rows of A")
    parser.add_argument("--n", type=int, default=None, help="rows of B (default: M)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    n = args.n or args.m
    info = machine(args.backend)
    print(f"CPU: {info['cpu']}\ninstruction sets: {' '.join(info['instruction_sets'])}")
    print(f"popcount: {info['popcount']}  backend: {info['backend']}  threads: {info['threads']}")
    print(f"{'K':>7} {'fp32 ms':>9} {'binary ms':>10} {'pack A ms':>10} {'fp32 GF/s':>10} "
          f"{'bin GF/s eq':>12} {'ratio':>7}  equal")
    rows = []
    for k in args.k:
        row = bench(k, args.m, n, args.backend, args.warmup, args.repeats)
        rows.append(row)
        print(f"{k:>7} {row['fp32_ms']:>9.3f} {row['binary_ms']:>10.3f} {row['pack_a_ms']:>10.3f} "
              f"{row['fp32_gflops']:>10.1f} {row['binary_gflops_equiv']:>12.1f} {row['speedup']:>7.2f}  {row['equal']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(row["equal"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
