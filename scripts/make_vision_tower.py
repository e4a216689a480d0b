"""Re-create Chapter 9's vision tower, data/checkpoints/clip_scenes32.safetensors (a few minutes on 2 CPU cores).

    python scripts/make_vision_tower.py [--steps 3000] [--out data/checkpoints/clip_scenes32.safetensors]

A CLIP vision transformer (transformers' ``CLIPVisionModel``: 32×32 images, 4×4 patches, so 64 patch
tokens, 64 wide, 4 layers, 4 heads) trained from scratch on generated question scenes
(:func:`effnb.data.make_question_scenes`, seed 1 for training, seed 2 for the reported accuracies)
with :func:`effnb.tokens.pretrain_vision_tower`. It plays CLIP's role in LLaVA: trained once, frozen,
its patch tokens handed to the consumer. The accuracies of the pretraining heads are stored in the
checkpoint's metadata, its sha256 in ``data/checkpoints/SHA256SUMS``.
"""
from __future__ import annotations

import argparse
import time

from effnb.config import seed_everything
from effnb.data import make_question_scenes
from effnb.tokens import CHECKPOINT, pretrain_vision_tower, save_vision_tower, vision_tower

SETTINGS = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 4, "heads": 4}
SEED = 0


def main(argv: list[str] | None = None) -> int:
    """Train the tower and save it; print its pretraining accuracies and the time taken."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="AdamW steps at batch 64 (default 3000)")
    parser.add_argument("--out", default=str(CHECKPOINT), help="where to write the safetensors file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps} must be >= 1, e.g. --steps 3000")
    size = SETTINGS["image_size"]
    start = time.perf_counter()
    train, test = make_question_scenes(8000, size, seed=1), make_question_scenes(1000, size, seed=2)
    seed_everything(SEED)
    tower = vision_tower(**SETTINGS)
    accuracy = pretrain_vision_tower(tower, train, test, steps=args.steps, seed=SEED)
    minutes = (time.perf_counter() - start) / 60
    digest = save_vision_tower(tower, args.out, SETTINGS, {
        "steps": args.steps, "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "made_by": "scripts/make_vision_tower.py", "minutes": round(minutes, 1)})
    print(f"{args.out}: heads' test accuracy {accuracy}, {minutes:.1f} min, sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
