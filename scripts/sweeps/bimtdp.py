"""Chapter 7 (Bi-MTDP) in the experiments tier: does VIB + KD recover the binary network's loss as it grows?

At the ci width (16 channels, 200 steps) the binary network's gap to FP is large and its seeds noisy. Axis: the
encoder width, with the training steps growing with it (16 wide for 200 steps, the ci point; 32 for 500; 64, the
full profile's width, for 1,000). Scenes are the chapter's ci ones (16 x 16, data seed 0). At each point and seed, the
chapter's own arms (``ARMS``: FP, binary, binary+VIB, binary+KD, binary+VIB+KD; its network, per-task VIB layers with
beta = 1e-3, whole-map distillation with gamma = 1 and training loop) and the A/A control (binary with training seed
s + 100). Stored per arm: Delta_m against the seed's FP network, the four metrics, and each VIB arm's KL per task.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from effnb import binary as B
from effnb.data import dense_scene_split
from effnb.train import DENSE_METRICS, delta_m, dense_metrics

from . import ROOT, notebook_functions

CHAPTER = "07_bimtdp"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "width", "encoder width (training steps: 200 at 16, 500 at 32, 1,000 at 64)"
STEPS = {16: 200, 32: 500, 64: 1000, 128: 3000}
POINTS = {"cpu": [16, 32, 64], "cuda": [16, 32, 64, 128]}
SEEDS = 5
EFFNB_MODULES = ["binary", "train", "data"]
SIZE, BATCH, N_TRAIN, N_TEST, LR, BETA, GAMMA, AA_OFFSET = 16, 16, 1500, 300, 1e-2, 1e-3, 1.0, 100
FUNCTIONS = ["Block", "MultiTaskNet", "task_loss", "evaluate", "train", "build", "VariationalBottleneck",
             "distillation_loss", "arm_loss", "task_kl", "ARMS"]


def config(width: int) -> dict:
    """What one point runs; the chapter's ci run is the point ``width = 16``."""
    return {"width": width, "steps": STEPS[width], "size": SIZE, "batch": BATCH, "n_train": N_TRAIN, "n_test": N_TEST,
            "lr": LR, "beta": BETA, "gamma": GAMMA, "data_seed": 0, "aa_offset": AA_OFFSET,
            "metric": "Delta_m against FP of the same seed (%); the four dense metrics; KL per task"}


def cost(width: int) -> float:
    """About the work of one seed at ``width`` (steps times width), for the progress bar's ETA."""
    return STEPS[width] * width / 1000


COST_UNIT = "k step-widths"


def setup(device: torch.device) -> dict:
    """The chapter's scenes (data seed 0) on ``device``."""
    train_set, test_set = dense_scene_split(N_TRAIN, N_TEST, size=SIZE, seed=0)
    ctx = {"device": device, "train_set": train_set.to(device), "test_set": test_set.to(device),
           "K": train_set.num_classes}
    return {**ctx, "sources": notebook_functions(NOTEBOOK, FUNCTIONS, _namespace(ctx, POINTS["cpu"][0]))}


def _namespace(ctx: dict, width: int) -> dict:
    """The globals the chapter's functions read, at ``width`` (progress bars off)."""
    quiet = SimpleNamespace(config=SimpleNamespace(progress_bar=lambda iterable, desc=None: iterable))
    return {"torch": torch, "F": F, "nn": nn, "copy": copy, "B": B, "effnb": quiet, "dense_metrics": dense_metrics,
            "run": SimpleNamespace(device=ctx["device"]), "LR": LR, "BATCH": BATCH, "WIDTH": width, "K": ctx["K"],
            "STEPS": STEPS[width], "BETA": BETA, "GAMMA": GAMMA, "train_set": ctx["train_set"],
            "test_set": ctx["test_set"]}


def run(ctx: dict, width: int, seed: int) -> dict[str, float]:
    """Every arm's Delta_m, metrics and KL at ``width`` for training seed ``seed``."""
    ns = _namespace(ctx, width)
    notebook_functions(NOTEBOOK, FUNCTIONS, ns)
    nets, values = {}, {}
    for arm, (binary, with_vib, with_kd) in ns["ARMS"].items():       # FP first: the KD arms' teacher
        nets[arm] = ns["build"](seed, binary, vib=with_vib)
        ns["train"](nets[arm], seed, ns["arm_loss"](nets[arm], nets["FP"].eval() if with_kd else None))
    aa = ns["build"](seed + AA_OFFSET, True)
    ns["train"](aa, seed + AA_OFFSET)
    nets["binary, A/A seed"] = aa
    fp = ns["evaluate"](nets["FP"])
    for arm, net in nets.items():
        metrics = ns["evaluate"](net)
        values[arm] = delta_m(metrics, fp)
        values.update({f"{name}: {arm}": metrics.as_dict()[name] for name in DENSE_METRICS})
        values.update({f"KL {task}: {arm}": kl for task, kl in ns["task_kl"](net).items()})
    return values
