"""Chapter 10 (online multi-spectral neuron tracing) in the experiments tier: does the full tracer beat a plain
correlation filter and OpenCV's CSR-DCF, and does each of its pieces matter, as the volumes grow crowded?

Axis: neurons per generated volume (48 x 96 x 96 voxels, the chapter's ci volumes; more neurons, more crossings and
near passes). Each seed is one volume (``make_neuron_volume(SHAPE, neurons, seed)``), traced from every start box
by the chapter's own arms (``ARMS``: plain DCF, OpenCV CSRT, the full tracer and its ablations), plus the full tracer
without the histograms' pull-back, and the A/A controls: plain DCF, OpenCV CSRT and the full tracer on the same
neurons with another noise draw (the chapter's ``redraw``). The pull-back guards against colour drift, which the
chapter's volumes hold little of, so the same neurons are also rendered with three times the drift
(``colour_drift=0.03``, the same random draws scaled) and traced with and without it. Stored per volume and arm:
the mean over its neurons of VSA and of BRR.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
from scipy import ndimage

from effnb import tracing as T
from effnb.data import PLANES, NeuronVolume, make_neuron_volume

from . import ROOT, notebook_functions

CHAPTER = "10_neuron_tracing"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "neurons", "neurons per volume (48 x 96 x 96 voxels)"
POINTS = {"cpu": [4, 6, 10], "cuda": [4, 6, 10]}
SEEDS = 16                 # volumes per point: the claims are paired per volume, and at least 10 are asked for
COST_UNIT = "neurons"
EFFNB_MODULES = ["tracing", "data"]
SHAPE, NOISE, FAST_DRIFT = (48, 96, 96), 0.05, 0.03
FUNCTIONS = ["HUES", "PALETTE", "BINS", "DARK", "LAM", "ADMM_ITERS", "G_HAT", "WINDOW", "MIN_BRANCH", "MAX_STEPS",
             "colour_names", "features", "Appearance", "constrained_filter", "MaskedFilter", "PlainFilter",
             "OpenCVFilter", "make_filter", "locate", "centre_colour", "branch_seeds", "roundness", "trace_branch",
             "trace_neuron", "score", "redraw", "ARMS"]
EXTRA = {"- pull-back": dict(kind="ours", pull=0.0)}
AA = ["plain DCF", "OpenCV CSRT", "ours (full)"]


def config(neurons: int) -> dict:
    """What one point runs; the chapter's ci run (SEED = 0) is the point ``neurons = 6`` at volumes 0-4."""
    return {"neurons": neurons, "shape": list(SHAPE), "noise": NOISE, "patch": 24, "colour_drift": 0.01,
            "fast_drift": FAST_DRIFT, "metrics": "per volume: mean over its neurons of VSA and of BRR"}


def cost(neurons: int) -> int:
    """Neurons traced per volume, a stand-in for a volume's time."""
    return neurons


def setup(device) -> dict:
    """The chapter's tracer, filters, arms and scores (tracing runs on the CPU with NumPy whatever ``device``)."""
    ns = {"np": np, "T": T, "time": time, "cv2": cv2, "ndimage": ndimage, "PLANES": PLANES, "PATCH": 24,
          "SHAPE": SHAPE, "NOISE": NOISE, "make_neuron_volume": make_neuron_volume, "NeuronVolume": NeuronVolume}
    sources = notebook_functions(NOTEBOOK, FUNCTIONS, ns)
    return {"ns": ns, "sources": sources}


def run(ctx: dict, neurons: int, seed: int) -> dict[str, float]:
    """Every arm's VSA and BRR on volume ``seed`` of ``neurons`` neurons (means over its neurons)."""
    ns = ctx["ns"]
    ns["N_NEURONS"] = neurons                                   # what the chapter's redraw reads
    volume = make_neuron_volume(SHAPE, neurons, seed, noise=NOISE)
    redrawn, _ = ns["redraw"](seed)
    fast = make_neuron_volume(SHAPE, neurons, seed, noise=NOISE, colour_drift=FAST_DRIFT)
    plan = [(arm, options, volume) for arm, options in {**ns["ARMS"], **EXTRA}.items()]
    plan += [(f"A/A: {arm}, new noise", ns["ARMS"][arm], redrawn) for arm in AA]
    plan += [(f"{arm}, drift {FAST_DRIFT}", options, fast)
             for arm, options in (("ours (full)", ns["ARMS"]["ours (full)"]), ("- pull-back", EXTRA["- pull-back"]))]
    values = {}
    for arm, options, vol in plan:
        scores = np.array([ns["score"](ns["trace_neuron"](vol.image, start, **options)[0], table)
                           for start, table in zip(vol.starts, vol.neurons)])
        values[f"VSA: {arm}"], values[f"BRR: {arm}"] = float(scores[:, 0].mean()), float(scores[:, 2].mean())
    return values
