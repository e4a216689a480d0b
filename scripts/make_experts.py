"""Train expert trajectories for trajectory matching (Chapter 4, LAD), one process or many.

    python scripts/make_experts.py --out experts/digits_b10                       # one process
    torchrun --nproc-per-node 2 scripts/make_experts.py --out experts/digits_b10  # two ranks

Each rank trains its share of the experts (expert i goes to rank i mod world size) on its own
device: gloo on CPUs, nccl on GPUs (rank r uses cuda:LOCAL_RANK). Expert i is initialised and
shuffled from a seed derived from ``--seed`` and i alone (``effnb.distill.expert_seed``), so the
files do not depend on how many ranks made them. Without torchrun's environment variables it runs
as a single process (world size 1).

Output: ``OUT/expert_XXX.safetensors`` (tensor ``stage1`` of shape (epochs + 1, P), the flat
parameters after every epoch; ``stage2`` (classifier epochs + 1, P) when ``--classifier-epochs`` > 0;
the settings in the header) and ``OUT/metadata.json``. Everything is written into a hidden staging
folder next to OUT that replaces OUT only when every expert is done, so an error or an interrupt
never leaves a half-written OUT. Data: the bundled digits 8x8 (default) or CIFAR-10 from
``--root`` (fetched only with ``--download``), long-tailed with ``--imbalance``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from effnb.config import DEVICES, choose_device
from effnb.distill import DATA_SETS, ExpertConfig, ParameterLayout, expert_seed, long_tailed_split, make_expert, \
    save_expert

DEFAULT = ExpertConfig()  # the digits 8x8 settings


def parser() -> argparse.ArgumentParser:
    """The command line (every option has a default except ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist, or pass --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--data", default="digits", choices=DATA_SETS, help="digits (bundled 8x8) or cifar10")
    p.add_argument("--root", type=Path, default=None, help="folder with cifar-10-binary.tar.gz (--data cifar10)")
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --root if missing (needs internet)")
    p.add_argument("--imbalance", type=float, default=10.0, help="largest class / smallest class (1 = balanced)")
    p.add_argument("--data-seed", type=int, default=0, help="which images the long-tailed subset keeps")
    p.add_argument("--experts", type=int, default=8, help="number of experts")
    p.add_argument("--epochs", type=int, default=DEFAULT.epochs, help="stage-1 epochs per expert")
    p.add_argument("--lr", type=float, default=DEFAULT.lr, help="stage-1 SGD learning rate")
    p.add_argument("--momentum", type=float, default=DEFAULT.momentum, help="stage-1 SGD momentum")
    p.add_argument("--batch", type=int, default=DEFAULT.batch_size, help="batch size of both stages")
    p.add_argument("--weight-decay", type=float, default=DEFAULT.weight_decay,
                   help="stage-1 weight decay (weight balancing)")
    p.add_argument("--classifier-epochs", type=int, default=DEFAULT.classifier_epochs,
                   help="stage-2 epochs (0: no stage-2 experts)")
    p.add_argument("--classifier-lr", type=float, default=DEFAULT.classifier_lr, help="stage-2 SGD learning rate")
    p.add_argument("--width", type=int, default=DEFAULT.width, help="ConvNet channels")
    p.add_argument("--depth", type=int, default=DEFAULT.depth,
                   help="ConvNet blocks (image side must divide by 2**depth)")
    p.add_argument("--seed", type=int, default=0, help="base seed; expert i uses expert_seed(seed, i)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda if present, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank (default: torch's)")
    return p


def check_settings(args: argparse.Namespace) -> None:
    """Raise one ``ValueError`` sentence naming the fix for the first bad setting, before any work."""
    for name in ("experts", "epochs", "batch", "width", "depth"):
        if getattr(args, name) < 1:
            example = parser().get_default(name)
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1; e.g. --{name} {example}.")
    for name in ("classifier_epochs", "weight_decay", "momentum", "seed", "data_seed"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0.")
    if args.lr <= 0 or args.classifier_lr <= 0:
        raise ValueError(f"--lr={args.lr} and --classifier-lr={args.classifier_lr} must both be > 0, e.g. --lr 0.2.")
    if args.imbalance < 1:
        raise ValueError(f"--imbalance={args.imbalance} must be >= 1 (largest class / smallest class), e.g. 10.")
    if args.data == "cifar10" and args.root is None:
        raise ValueError("--data cifar10 needs --root DIR (a folder for cifar-10-binary.tar.gz; "
                         "add --download to fetch it).")
    if args.data == "digits" and (args.root is not None or args.download):
        raise ValueError("--root and --download apply only to --data cifar10; drop them for the bundled digits.")
    side = 8 if args.data == "digits" else 32
    if side % 2**args.depth:
        raise ValueError(f"--depth={args.depth} halves the {side}x{side} images too often; use --depth <= "
                         f"{side.bit_length() - 1}.")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} already holds files; pass --overwrite or choose another --out.")


def settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (:func:`check_settings`)."""
    args = parser().parse_args(argv)
    check_settings(args)
    return args


def expert_config(args: argparse.Namespace) -> ExpertConfig:
    """The :class:`effnb.distill.ExpertConfig` the arguments describe."""
    return ExpertConfig(width=args.width, depth=args.depth, epochs=args.epochs, lr=args.lr, batch_size=args.batch,
                        weight_decay=args.weight_decay, momentum=args.momentum,
                        classifier_epochs=args.classifier_epochs, classifier_lr=args.classifier_lr)


def start_ranks(device: str) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``: torchrun's process group when ``WORLD_SIZE`` > 1, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = choose_device(device)
    if world == 1:
        return 0, 1, chosen
    if chosen.type == "cuda":
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), chosen


def wait_for_all(device: torch.device) -> None:
    """A barrier across ranks (nothing in a single process)."""
    if not dist.is_initialized():
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])  # nccl needs to know this rank's GPU
    else:
        dist.barrier()


def settings_record(args: argparse.Namespace, split_counts: list[int], layout: ParameterLayout) -> dict:
    """What the files were made from: data, imbalance, seeds, the expert config and the parameter layout."""
    return {"data": args.data, "imbalance": args.imbalance, "data_seed": args.data_seed, "seed": args.seed,
            "experts": args.experts, "class_counts": split_counts, "config": asdict(expert_config(args)),
            "parameters": [[n, list(s)] for n, s in zip(layout.names, layout.shapes)]}


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``, replacing an old ``out`` only after the new one is whole."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train_share(args: argparse.Namespace, rank: int, world: int, device: torch.device, staging: Path) -> dict:
    """Train experts ``rank, rank + world, ...`` into ``staging``; returns the settings record."""
    split = long_tailed_split(args.data, args.imbalance, root=args.root, download=args.download, seed=args.data_seed)
    config = expert_config(args)
    record = settings_record(args, torch.bincount(split.y_train).tolist(), ParameterLayout.of(config.build(split)))
    for index in range(rank, args.experts, world):
        start = time.perf_counter()
        seed = expert_seed(args.seed, index)
        trajectories = make_expert(split, config, seed, device)
        metadata = {**record, "index": index, "seed_of_expert": seed}
        save_expert(staging / f"expert_{index:03d}.safetensors", trajectories, metadata)
        print(f"rank {rank}/{world}: expert {index} in {time.perf_counter() - start:.2f} s on {device}", flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    """Check the arguments, train this rank's experts, and (rank 0) publish the folder. Returns the exit code."""
    try:
        args = settings(argv)
    except ValueError as err:
        print(f"make_experts.py: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = start_ranks(args.device)
    if world > 1:  # when one rank fails, torchrun stops the others with SIGTERM: let them clean up too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    staging = args.out.parent / f".{args.out.name}.partial"
    started = time.perf_counter()
    try:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        wait_for_all(device)
        record = train_share(args, rank, world, device, staging)
        wait_for_all(device)
        if rank == 0:
            record.update(world_size=world, seconds=round(time.perf_counter() - started, 2))
            (staging / "metadata.json").write_text(json.dumps(record, indent=1) + "\n")
            publish(staging, args.out)
            print(f"wrote {args.experts} experts to {args.out} in {record['seconds']} s with {world} rank(s)")
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
