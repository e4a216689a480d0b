"""Chapter 8 (FBPT) in the experiments tier: does the hybrid network close the gap to FP as the model grows?

At the ci width (32) the binary layers may limit every binary arm alike, so that the attention, the part FBPT
changes, cannot show. Axis: the model width, with the training steps growing with it (32 wide for 300 steps, the
ci point; 64 for 1,000; 96 for 2,000). Data and everything else are the chapter's ci settings (data seed 0). At each
point and seed, the chapter's own arms (``ARMS``: FP, naive binary with the learned static map, hybrid, hybrid in one
stage, hybrid + hierarchical; its own network, binarizers, schedule and training loop) and the A/A control (naive
binary with training seed s + 100), each scored by test accuracy and its last block's attention entropy H / log N.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from effnb import binary as B
from effnb.pointclouds import group_points, normalize_clouds, point_cloud_split

from . import ROOT, notebook_functions

CHAPTER = "08_fbpt"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "width", "model width (training steps: 300 at 32, 1,000 at 64, 2,000 at 96)"
STEPS = {32: 300, 64: 1000, 96: 2000}
POINTS = {"cpu": [32, 64, 96], "cuda": [32, 64, 96, 192]}
STEPS_CUDA = {192: 4000}
SEEDS = 5
EFFNB_MODULES = ["binary", "pointclouds"]
N_POINTS, GROUPS, NEIGHBOURS, HEADS, DEPTH, BATCH, N_TRAIN, N_TEST = 128, 16, 16, 2, 2, 32, 1600, 400
LR, FINETUNE_LR, AA_OFFSET = 5e-3, 2e-3, 100
FUNCTIONS = ["Attention", "Block", "PointTransformer", "NON_TRANSFORMER", "TRANSFORMER", "binarize_linears",
             "set_attention", "train", "evaluate", "hierarchical", "build_binary", "one_stage", "ARMS", "AA_ARMS"]


def steps_at(width: int) -> int:
    return {**STEPS, **STEPS_CUDA}[width]


def config(width: int) -> dict:
    """What one point runs; the chapter's ci run is the point ``width = 32``."""
    return {"width": width, "steps": steps_at(width), "points": N_POINTS, "groups": GROUPS, "neighbours": NEIGHBOURS,
            "heads": HEADS, "depth": DEPTH, "batch": BATCH, "n_train": N_TRAIN, "n_test": N_TEST, "lr": LR,
            "finetune_lr": FINETUNE_LR, "data_seed": 0, "aa_offset": AA_OFFSET,
            "metric": "test accuracy; last block's attention H / log N"}


def cost(width: int) -> float:
    """About the work of one seed at ``width``: steps times width (for the progress bar's ETA)."""
    return steps_at(width) * width / 1000


COST_UNIT = "k step-widths"


def setup(device: torch.device) -> dict:
    """The chapter's clouds (data seed 0), cut into patches once."""
    train_set, test_set = point_cloud_split(N_TRAIN, N_TEST, N_POINTS, seed=0, rotation="z")
    patches = lambda s: [t.to(device) for t in group_points(normalize_clouds(s.points), GROUPS, NEIGHBOURS)]
    data = {"train_patches": patches(train_set), "test_patches": patches(test_set),
            "Y_TRAIN": train_set.labels.to(device), "Y_TEST": test_set.labels.to(device), "C": train_set.num_classes}
    namespace = _namespace(device, data, POINTS["cpu"][0])
    return {"device": device, "data": data, "sources": notebook_functions(NOTEBOOK, FUNCTIONS, namespace)}


def _namespace(device: torch.device, data: dict, width: int) -> dict:
    """The globals the chapter's functions read, at ``width`` (defaults such as ``steps=STEPS`` bind at definition)."""
    return {"torch": torch, "F": F, "nn": nn, "math": math, "copy": copy, "B": B,
            "run": type("Run", (), {"device": device})(), "HEADS": HEADS, "DEPTH": DEPTH, "LR": LR,
            "FINETUNE_LR": FINETUNE_LR, "BATCH": BATCH, "DIM": width, "STEPS": steps_at(width), "fp_nets": {},
            "AA_SEEDS": {}, **data}


def run(ctx: dict, width: int, seed: int) -> dict[str, float]:
    """Every arm's test accuracy and attention entropy at ``width`` for training seed ``seed``."""
    ns = _namespace(ctx["device"], ctx["data"], width)
    notebook_functions(NOTEBOOK, FUNCTIONS, ns)
    torch.manual_seed(seed)
    ns["fp_nets"][seed] = ns["train"](ns["PointTransformer"](width, ns["C"]).to(ctx["device"]), ns["STEPS"], seed)
    ns["AA_SEEDS"][seed] = seed + AA_OFFSET
    values = {}
    for arm, make in {**ns["ARMS"], **ns["AA_ARMS"]}.items():
        accuracy, entropy = ns["evaluate"](make(seed))
        values[arm], values[f"H / log N: {arm}"] = accuracy, entropy
    return values
