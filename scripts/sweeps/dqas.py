"""Chapter 3 (DQAS) in the experiments tier: at which keep ratios does DQAS beat DQ, and do bins built in the
final stage's feature space help?

Axis: the keep ratio, the share of the digits' training pool a subset keeps. The bins, the autoencoder and the
final-stage pool are built once, as the chapter builds them at ``SEED = 0`` (data seed 0, selection networks and
autoencoder at seed 0). At each point and seed, the chapter's own selections (``select``, ``dqas_select``) each train
a fresh model with the chapter's recipe: random, GraphCut, DQ, DQAS, and DQ's subset trained again from seed +
``AA_OFFSET`` (the A/A control of "DQAS beats DQ"); then section 5.1's arms on the final-stage images: DQAS with the
original images' bins, DQAS with the final-stage bins, and the original-bins subset trained again from seed +
``AA_OFFSET``. Every value is a test accuracy on the digits' test set.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from effnb import coreset as C
from effnb.config import progress_bar
from effnb.data import load_digits
from effnb.models import MLP, SmallCNN
from effnb.train import evaluate, fit

from . import ROOT, notebook_functions

CHAPTER = "03_dqas"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "ratio", "keep ratio (share of the training pool)"
POINTS = {"cpu": [0.01, 0.02, 0.03, 0.05, 0.10], "cuda": [0.01, 0.02, 0.03, 0.05, 0.10, 0.20]}
SEEDS = 100                # a subset trains in a few hundredths of a second; at 1% the chapter's 20 seeds leave
COST_UNIT = "samples"      # DQAS against DQ inconclusive
EFFNB_MODULES = ["coreset", "data", "models", "train"]
SETTINGS = dict(data="digits 8x8, data seed 0", model="MLP, 64 hidden units", epochs=100, lr=3e-3,
                weight_decay=1e-4, batch=64, rounds=3, alpha=0.5, bins=10, selection_epochs=40, patch=2,
                drop_ratio=0.2, mae_steps=1500, aa_offset=50_000)
FUNCTIONS = ["make_model", "train_model", "take", "pool_error", "dqas_select", "select", "selection_embed",
             "pixel_mask", "least_important", "random_drop", "fill", "train_autoencoder", "final_stage"]


def config(ratio: float) -> dict:
    """What one point runs; the chapter's ci run (SEED = 0) measures the points 0.01 and 0.02."""
    return {"ratio": ratio, **SETTINGS, "metric": "test accuracy"}


def cost(ratio: float) -> int:
    """The samples a point's subsets hold, a stand-in for its training time."""
    return max(1, round(ratio * 1347))


def setup(device: torch.device) -> dict:
    """The chapter's pool, full-pool model, bins, autoencoder and final-stage bins at SEED = 0."""
    s = SETTINGS
    split = load_digits(seed=0)
    x, y = split.x_train.to(device), split.y_train
    members = [torch.nonzero(y == c).flatten() for c in range(split.num_classes)]
    ns = {"torch": torch, "F": F, "np": np, "time": time, "C": C, "fit": fit, "MLP": MLP, "SmallCNN": SmallCNN,
          "progress_bar": progress_bar, "run": type("Run", (), {"device": device, "smoke": False})(),
          "CIFAR": False, "X": x, "Y": y, "K": split.num_classes, "members": members, "SEED": 0,
          "class_sizes": torch.tensor([len(m) for m in members]), "EPOCHS": s["epochs"], "BATCH": s["batch"],
          "LR": s["lr"], "WEIGHT_DECAY": s["weight_decay"], "ROUNDS": s["rounds"], "ALPHA": s["alpha"],
          "SELECTION_EPOCHS": s["selection_epochs"], "PATCH": s["patch"], "MAE_STEPS": s["mae_steps"]}
    ns["SIDE"] = x.shape[-1] // s["patch"]
    ns["NUM_PATCHES"] = ns["SIDE"] ** 2
    ns["DROPPED"] = ns["NUM_PATCHES"] - int(ns["NUM_PATCHES"] * (1 - s["drop_ratio"]))
    sources = notebook_functions(NOTEBOOK, FUNCTIONS, ns)
    sizes = C.dq_bin_sizes(ns["class_sizes"], s["bins"])
    calls = []
    ns["bins"] = C.quantization_bins(ns["selection_embed"](x, calls), y, sizes)
    ns["graphcut_orders"] = [m[C.graphcut_order(C.similarity(calls[0][1][m]), len(m))] for m in members]
    full_model = ns["train_model"](torch.arange(len(y)), 0)
    ns["X_FINAL"] = ns["final_stage"](x, full_model, ns["train_autoencoder"](0))
    ns["bins_final"] = C.quantization_bins(ns["selection_embed"](ns["X_FINAL"], []), y, sizes)
    return {"ns": ns, "sources": sources, "test": (split.x_test.to(device), split.y_test, split.num_classes)}


def run(ctx: dict, ratio: float, seed: int) -> dict[str, float]:
    """Every arm's test accuracy at keep ratio ``ratio`` for seed ``seed``."""
    ns, (x_test, y_test, k), aa = ctx["ns"], ctx["test"], SETTINGS["aa_offset"]
    total = round(ratio * len(ns["Y"]))
    score = lambda chosen, s, images=ns["X"]: evaluate(ns["train_model"](chosen, s, images=images),  # noqa: E731
                                                       x_test, y_test, k).overall
    values = {}
    for method in ("random", "GraphCut", "DQ", "DQAS"):
        chosen = ns["select"](method, total, seed)
        values[method] = score(chosen, seed)
        if method == "DQ":
            values["DQ, A/A seed"] = score(chosen, seed + aa)
    final = ns["X_FINAL"]
    for arm, class_bins in (("final stage: original bins", ns["bins"]), ("final stage: final-stage bins", ns["bins_final"])):
        chosen, _ = ns["dqas_select"](total, seed, class_bins=class_bins, images=final)
        values[arm] = score(chosen, seed, final)
        if class_bins is ns["bins"]:
            values["final stage: original bins, A/A seed"] = score(chosen, seed + aa, final)
    return values
