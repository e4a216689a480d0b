"""Chapter 9 (PruMerge) in the experiments tier: where does merging beat pruning, as fewer tokens are kept?

Axis: the visual tokens kept per image, the same count for every arm and image (of the 64 patch tokens of the
stored tower). At each point and consumer seed, the chapter's own reductions at that budget (``at_budget``: random,
the most attended (prune), PruMerge (the most attended, each merged with its key neighbours) and PruMerge+ (the
outliers and PruMerge+'s spatial sample, in PruMerge+'s order, cut or filled to the budget, merged)), each applied to
the seed's all-token consumer and finetuned as the chapter does; the A/A control is top-k finetuned again with
another order seed. Data, tower, consumer and training settings are the chapter's ci ones.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from effnb.data import make_question_scenes
from effnb.tokens import Consumer, Encoded, answer_accuracy, encode, fit_consumer, load_vision_tower

from . import ROOT, notebook_functions

CHAPTER = "09_prumerge"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "tokens", "visual tokens kept per image (of 64)"
POINTS = {"cpu": [2, 4, 8, 16, 32], "cuda": [2, 4, 8, 16, 32]}
SEEDS = 10                      # consumer seeds per point: a point costs seconds a seed, and the gaps are small
EFFNB_MODULES = ["tokens", "data"]
IMAGE, N_TRAIN, N_TEST, STEPS, FINETUNE, NEIGHBOURS = 32, 4000, 1000, 400, 100, 4
CONSUMER = dict(width=32, layers=2, heads=2)
FUNCTIONS = ["cls_attention", "iqr_count", "merge_neighbours", "top_index", "gather_tokens", "spatial_sample",
             "kept_mask", "at_budget", "finetuned"]
ARMS = ["random-k", "top-k (prune)", "PruMerge", "PruMerge+"]


def config(tokens: int) -> dict:
    """What one point runs; the chapter's live run measures the point ``tokens = 8``."""
    return {"tokens": tokens, "image": IMAGE, "n_train": N_TRAIN, "n_test": N_TEST, "consumer": CONSUMER,
            "steps": STEPS, "finetune": FINETUNE, "neighbours": NEIGHBOURS, "tower": "clip_scenes32",
            "scenes": "train seed 1000, test seed 2000", "metric": "finetuned test accuracy"}


def setup(device: torch.device) -> dict:
    """The scenes, the stored tower's tokens and the chapter's reductions."""
    train_scenes, test_scenes = make_question_scenes(N_TRAIN, IMAGE, seed=1000), make_question_scenes(N_TEST, IMAGE, seed=2000)
    tower, _ = load_vision_tower(device=device)
    ns = {"torch": torch, "F": F, "math": math, "copy": copy, "np": np, "NEIGHBOURS": NEIGHBOURS,
          "fit_consumer": fit_consumer, "FINETUNE": FINETUNE, "train_scenes": train_scenes, "baselines": {},
          "train_tokens": encode(tower, train_scenes.images), "Encoded": Encoded}
    sources = notebook_functions(NOTEBOOK, FUNCTIONS, ns)
    return {"ns": ns, "sources": sources, "device": device, "test": (encode(tower, test_scenes.images), test_scenes)}


def run(ctx: dict, tokens: int, seed: int) -> dict[str, float]:
    """Every arm's finetuned accuracy at ``tokens`` kept per image, for consumer seed ``seed``."""
    ns, (test_tokens, test_scenes) = ctx["ns"], ctx["test"]
    if seed not in ns["baselines"]:
        torch.manual_seed(seed)
        model = Consumer(ns["train_tokens"].features.shape[-1], **CONSUMER).to(ctx["device"])
        fit_consumer(model, ns["train_tokens"], ns["train_scenes"], STEPS, batch_size=64, lr=5e-3, seed=seed,
                     progress=False)
        ns["baselines"][seed] = model
    values = {"all tokens": answer_accuracy(ns["baselines"][seed], test_tokens, test_scenes)["all"]}
    for arm in ARMS:
        reduce = ns["at_budget"](tokens, arm)
        values[arm] = answer_accuracy(ns["finetuned"](seed, reduce, 100 + seed), test_tokens, test_scenes, reduce,
                                      seed)["all"]
    reduce = ns["at_budget"](tokens, "top-k (prune)")
    values["A/A: top-k again"] = answer_accuracy(ns["finetuned"](seed, reduce, 200 + seed), test_tokens, test_scenes,
                                                 reduce, seed)["all"]
    return values
