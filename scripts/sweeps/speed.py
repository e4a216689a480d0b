"""Chapter 2 (SpeeD) in the experiments tier: does SpeeD's step ratio grow with the training budget?

Axis: training steps per run. At each point and seed, three runs of the chapter's image setting (digits 8x8,
the residual-MLP denoiser, the ci batch, learning rate and EMA): uniform time steps, SpeeD (the chapter's own
sampler and weights), and the A/A control, uniform with training seed + 1000. Each run's EMA is scored by
feature-FD every tenth of the run (DDIM-25, 400 class-balanced samples, noise seed 0); the claim's value per
seed is the chapter's: the step ratio B / steps-to-reach, median over budgets B at 20, 40 and 60 % of the run.
"""
from __future__ import annotations

import numpy as np
import torch

from effnb import diffusion as D
from effnb.data import load_digits

from . import ROOT, notebook_functions

CHAPTER = "02_speed"
NOTEBOOK = ROOT / "notebooks" / f"{CHAPTER}.ipynb"
AXIS, AXIS_LABEL = "steps", "training steps per run (each arm and seed)"
POINTS = {"cpu": [600, 2000, 6000, 12000], "cuda": [600, 2000, 6000, 12000, 40000]}
EFFNB_MODULES = ["diffusion", "data", "train", "models"]
AA_OFFSET = 1000
FUNCTIONS = ["asymmetric_probabilities", "speed_sampler", "change_aware_weights", "smooth", "steps_to_reach",
             "step_ratio"]


def config(steps: int) -> dict:
    """What one point runs; the chapter's ci run is the point ``steps = 600``."""
    return {"steps": steps, "data": "digits 8x8", "denoiser": "ResidualMLPDenoiser", "batch_size": 256,
            "lr": 2e-3, "ema_decay": 0.995, "eval_every": max(1, steps // 10), "eval_samples": 400,
            "ddim_steps": 25, "budgets": [max(1, steps // 10) * k for k in (2, 4, 6)], "tau": 700, "k": 5,
            "lambda": 0.6, "metric": "feature-FD"}


def setup(device: torch.device) -> dict:
    """Data, the stored feature classifier, the schedulers and the chapter's SpeeD functions."""
    namespace = {"torch": torch, "D": D, "np": np}
    sources = notebook_functions(NOTEBOOK, FUNCTIONS, namespace)
    split = load_digits(size=8, seed=0)
    classifier, _ = D.load_reference("classifier_digits8", device=device)
    classifier.eval()
    with torch.no_grad():
        reference = D.feature_statistics(classifier.features(split.x_test[:2000].to(device)).cpu())
    scheduler = D.make_scheduler("linear")
    c = config(POINTS["cpu"][0])
    probs = namespace["asymmetric_probabilities"](1000, c["tau"], c["k"])
    m = D.convergence_boundary(scheduler)
    return {"ns": namespace, "sources": sources, "device": device, "scheduler": scheduler,
            "ddim": D.make_scheduler("linear", kind="ddim"), "classifier": classifier, "reference": reference,
            "x": (split.x_train * 2 - 1).to(device), "y": split.y_train.to(device),
            "speed": (namespace["speed_sampler"](probs, m),
                      namespace["change_aware_weights"](scheduler, c["tau"], c["lambda"]))}


def run(ctx: dict, steps: int, seed: int) -> dict[str, float]:
    """Uniform, SpeeD and the A/A run at ``steps`` for ``seed``: the step ratios and the final scores."""
    c, ns = config(steps), ctx["ns"]
    labels = torch.arange(10).repeat_interleave(c["eval_samples"] // 10)

    def evaluate(model, step):
        samples = D.sample(model, ctx["ddim"], labels, num_inference_steps=c["ddim_steps"], seed=0)
        quality = D.sample_quality(ctx["classifier"], samples, labels, ctx["reference"])
        return {"fd": quality.frechet, "accuracy": quality.accuracy}

    curves, final = {}, {}
    for arm, (sampler, weights), s in [("uniform", (None, None), seed), ("SpeeD", ctx["speed"], seed),
                                       ("A/A", (None, None), seed + AA_OFFSET)]:
        torch.manual_seed(s)
        model = D.ResidualMLPDenoiser(sample_size=8).to(ctx["device"])
        h = D.train_diffusion(model, ctx["scheduler"], ctx["x"], ctx["y"], steps=steps, batch_size=c["batch_size"],
                              lr=c["lr"], ema_decay=c["ema_decay"], timestep_sampler=sampler, loss_weights=weights,
                              seed=s, eval_every=c["eval_every"], evaluate=evaluate, desc=f"{arm} {steps} s{seed}")
        rows = [(st, e) for st, e in zip(h.eval_steps, h.evals) if st > 0]
        curves[arm] = (np.array([st for st, _ in rows]), ns["smooth"](np.array([e["fd"] for _, e in rows])))
        final[arm] = rows[-1][1]
    ratio = {arm: float(np.median([ns["step_ratio"](curves["uniform"], curves[arm], b) for b in c["budgets"]]))
             for arm in ("SpeeD", "A/A")}
    return {"SpeeD": ratio["SpeeD"], "A/A": ratio["A/A"],
            "uniform final accuracy": final["uniform"]["accuracy"], "SpeeD final accuracy": final["SpeeD"]["accuracy"],
            "uniform final FD": final["uniform"]["fd"], "SpeeD final FD": final["SpeeD"]["fd"]}
