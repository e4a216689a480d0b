r"""Diffusion plumbing shared by the diffusion chapters: models, schedules, one training step
with a pluggable time-step sampler and loss weights, samplers, an offline sample-quality
metric, and reference checkpoints.

Everything here is generic; each chapter writes its own method (SpeeD's time-step sampler and
weights in Chapter 2, quantizers in the PTQ4DiT and QuEST chapters) on top of it.

Notation (DDPM, Ho et al. 2020): a schedule :math:`\beta_1..\beta_T`,
:math:`\alpha_t = 1-\beta_t`, :math:`\bar\alpha_t = \prod_{s\le t}\alpha_s`, the forward process
:math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon` (DDPM eq. 4), and the
:math:`\epsilon`-prediction loss :math:`\|\epsilon - \epsilon_\theta(x_t, t, y)\|^2` (DDPM eq. 14).
Time steps are 0-based, ``t = 0 .. T-1``, as in diffusers. Images live in ``[-1, 1]``.
Introduced in Chapter 2.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from effnb.config import PROFILES, Profile, check_choice, progress_bar
from effnb.train import (CHECKPOINT_DIR, checkpoint_fix, load_checkpoint, read_listed_checkpoint,
                         save_listed_checkpoint)

__all__ = [
    "CHECKPOINT_DIR",
    "MAKE_SCRIPT",
    "DIT4X64_SNAPSHOTS",
    "REFERENCE_NAMES",
    "MLPDenoiserConfig",
    "ResidualMLPDenoiser",
    "SampleQuality",
    "TimestepSampler",
    "TrainHistory",
    "categorical_sampler",
    "convergence_boundary",
    "denoising_loss",
    "denoising_loss_per_timestep",
    "feature_statistics",
    "frechet_distance",
    "load_reference",
    "make_scheduler",
    "predict_noise",
    "process_increment",
    "sample",
    "sample_quality",
    "save_reference",
    "sinusoidal_embedding",
    "snr",
    "tiny_dit",
    "tiny_unet",
    "train_diffusion",
    "train_step",
    "update_ema",
    "uniform_sampler",
    "variance_increment",
]

SCHEDULES: tuple[str, ...] = ("linear", "cosine")
SCHEDULER_KINDS: tuple[str, ...] = ("ddpm", "ddim")

# A time-step sampler draws ``batch_size`` time steps in [0, T) with the given generator: (B,) int64.
TimestepSampler = Callable[[int, torch.Generator], torch.Tensor]
DiffusionModel = DiTTransformer2DModel | UNet2DModel | torch.nn.Module


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class DiTSize:
    """Width and depth of a tiny DiT; ``patch_size`` sets the tokens: (H / patch)²."""

    heads: int
    head_dim: int
    layers: int
    patch_size: int


# ci: 59k parameters, ~66 steps/s at batch 64 on 2 cores (DESIGN.md); full: 8.0M, 64 tokens at 32×32
# (about 22 ms per step at batch 128 on an H200, launch-bound).
_DIT_SIZES = {"ci": DiTSize(heads=2, head_dim=16, layers=2, patch_size=2),
              "full": DiTSize(heads=4, head_dim=64, layers=6, patch_size=4)}


def tiny_dit(size: Profile = "ci", sample_size: int | None = None, in_channels: int = 1,
             num_classes: int = 10) -> DiTTransformer2DModel:
    r"""A class-conditional DiT (Peebles & Xie 2023) from diffusers, with adaLN-Zero blocks.

    ``size="ci"``: 2 heads × 16, 2 layers, patch 2 (59k parameters at 8×8);
    ``size="full"``: 4 heads × 64, 6 layers, patch 4 (for 32×32). ``sample_size`` defaults to
    8 (ci) or 32 (full). Input and output: (B, C, H, W); it predicts :math:`\epsilon`.
    Note: diffusers' label embedding drops 10% of labels to a null class while training (for
    classifier-free guidance). Introduced in Chapter 2.
    """
    check_choice("size", size, PROFILES)
    cfg = _DIT_SIZES[size]
    sample_size = sample_size if sample_size is not None else (8 if size == "ci" else 32)
    if sample_size % cfg.patch_size:
        raise ValueError(f"sample_size={sample_size} must be a multiple of the patch size {cfg.patch_size}.")
    return DiTTransformer2DModel(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=in_channels,
        out_channels=in_channels, num_layers=cfg.layers, sample_size=sample_size,
        patch_size=cfg.patch_size, num_embeds_ada_norm=num_classes, norm_type="ada_norm_zero")


def tiny_unet(size: Profile = "ci", sample_size: int | None = None, in_channels: int = 1,
              num_classes: int = 10) -> UNet2DModel:
    r"""A class-conditional UNet (Ho et al. 2020) from diffusers: ResNet blocks with a sinusoidal
    time embedding, self-attention at the lowest resolution, class embedding added to the time one.

    ``size="ci"``: channels (16, 32), attention at H/2 (177k parameters at 8×8);
    ``size="full"``: channels (64, 128, 128), attention at H/2 and H/4 (for 32×32).
    Input and output: (B, C, H, W). Introduced in Chapter 2.
    """
    check_choice("size", size, PROFILES)
    sample_size = sample_size if sample_size is not None else (8 if size == "ci" else 32)
    if size == "ci":
        channels, down, up = (16, 32), ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
    else:
        channels = (64, 128, 128)
        down = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
        up = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=channels, layers_per_block=1, down_block_types=down, up_block_types=up,
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_classes)


def sinusoidal_embedding(t: torch.Tensor, frequencies: int = 32, max_period: float = 1000.0) -> torch.Tensor:
    r"""Sinusoidal time embedding (Vaswani et al. 2017, as in DDPM): angles
    :math:`t\,\omega_i` with :math:`\omega_i = \text{max\_period}^{-i/F}`, :math:`i < F`;
    t (B,) -> (B, 2F) = [sin, cos]. Introduced in Chapter 2.
    """
    freqs = torch.exp(-math.log(max_period) * torch.arange(frequencies, device=t.device) / frequencies)  # (F,)
    angles = t[:, None].float() * freqs[None]                                                      # (B, F)
    return torch.cat([angles.sin(), angles.cos()], dim=1)                                          # (B, 2F)


@dataclass(frozen=True)
class MLPDenoiserConfig:
    """Shape of a :class:`ResidualMLPDenoiser`; :func:`sample` reads ``sample_size`` and ``in_channels``.
    Introduced in Chapter 2.
    """

    sample_size: int = 8
    in_channels: int = 1
    width: int = 256
    blocks: int = 3
    num_classes: int = 10
    frequencies: int = 32


class _ConditionedBlock(torch.nn.Module):
    """Pre-LayerNorm residual block: h + W2 SiLU(W1 LN(h) + P emb); h, emb (B, D) -> (B, D)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, width)
        self.condition = torch.nn.Linear(width, width)   # the projection of the (t, y) embedding
        self.fc2 = torch.nn.Linear(width, width)
        torch.nn.init.zeros_(self.fc2.weight)            # each block starts as the identity: faster early training
        torch.nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h)) + self.condition(emb)))


class ResidualMLPDenoiser(torch.nn.Module):
    r""":math:`\epsilon_\theta(x_t, t, y)` as a residual MLP on the flattened pixels: small images
    (8×8 digits) learn in seconds on a CPU, where a DiT or UNet of the same budget has not yet learned.

    Input Linear(C·H·W → width); embedding :math:`e = \mathrm{SiLU}(\mathrm{MLP}(\text{sinusoid}(t)) +
    \text{class}(y))`; ``blocks`` pre-LayerNorm residual blocks, each adding a projection of
    :math:`e`; LayerNorm and Linear back to C·H·W. Conditioning every block matters: an MLP that adds
    :math:`e` only at its input learns far more slowly. x_t (B, C, H, W), t (B,), y (B,) -> (B, C, H, W).
    ``config`` is a :class:`MLPDenoiserConfig`. Introduced in Chapter 2.
    """

    def __init__(self, sample_size: int = 8, in_channels: int = 1, width: int = 256, blocks: int = 3,
                 num_classes: int = 10, frequencies: int = 32) -> None:
        super().__init__()
        if min(sample_size, in_channels, width, blocks, num_classes, frequencies) < 1:
            raise ValueError(f"ResidualMLPDenoiser needs positive sizes; got sample_size={sample_size}, "
                             f"in_channels={in_channels}, width={width}, blocks={blocks}, "
                             f"num_classes={num_classes}, frequencies={frequencies}.")
        self.config = MLPDenoiserConfig(sample_size, in_channels, width, blocks, num_classes, frequencies)
        pixels = in_channels * sample_size * sample_size
        self.input = torch.nn.Linear(pixels, width)
        self.time_mlp = torch.nn.Sequential(torch.nn.Linear(2 * frequencies, width), torch.nn.SiLU(),
                                            torch.nn.Linear(width, width))
        self.class_embedding = torch.nn.Embedding(num_classes, width)
        self.blocks = torch.nn.ModuleList(_ConditionedBlock(width) for _ in range(blocks))
        self.output = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, pixels))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.silu(
            self.time_mlp(sinusoidal_embedding(t, self.config.frequencies)) + self.class_embedding(y))  # (B, D)
        h = self.input(x_t.flatten(1))                                                       # (B, D)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(h).view_as(x_t)                                                   # (B, C, H, W)


def predict_noise(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\epsilon_\theta(x_t, t, y)`: x_t (B, ...) -> (B, ...), t (B,), y (B,).

    diffusers' DiT and UNet are called with their own keywords; any other ``nn.Module`` (e.g. the
    2-D toy denoiser of Chapter 2) is called as ``model(x_t, t, y)``. Introduced in Chapter 2.
    """
    if isinstance(model, DiTTransformer2DModel):
        return model(x_t, timestep=t, class_labels=y).sample
    if isinstance(model, UNet2DModel):
        return model(x_t, t, class_labels=y).sample
    if isinstance(model, torch.nn.Module):
        return model(x_t, t, y)
    raise TypeError(f"predict_noise needs a torch.nn.Module, not {type(model).__name__}.")


# -------------------------------------------------------------------------- schedules
def make_scheduler(schedule: str = "linear", kind: str = "ddpm",
                   num_train_timesteps: int = 1000) -> DDPMScheduler | DDIMScheduler:
    r"""A diffusers scheduler: ``schedule`` "linear" (DDPM: :math:`\beta` from 1e-4 to 0.02) or
    "cosine" (Nichol & Dhariwal 2021); ``kind`` "ddpm" (training, ancestral sampling) or "ddim"
    (deterministic sampling in few steps, Song et al. 2021). Introduced in Chapter 2.
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("kind", kind, SCHEDULER_KINDS)
    beta_schedule = "linear" if schedule == "linear" else "squaredcos_cap_v2"
    common = dict(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                  beta_schedule=beta_schedule, clip_sample=True, prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(**common)
    return DDIMScheduler(**common, set_alpha_to_one=False)


def _alphas_cumprod(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.double()  # (T,)


def process_increment(scheduler) -> torch.Tensor:
    r"""How far the noise level moves per step: :math:`\Delta_t = \sqrt{1-\bar\alpha_t} -
    \sqrt{1-\bar\alpha_{t-1}}` with :math:`\bar\alpha_{-1} = 1`; shape (T,), float64.

    SpeeD (Wang et al. 2024) reads the acceleration, deceleration and convergence areas off it.
    Introduced in Chapter 2.
    """
    std = torch.sqrt(1.0 - _alphas_cumprod(scheduler))
    return torch.diff(std, prepend=torch.zeros(1, dtype=std.dtype))


def variance_increment(scheduler) -> torch.Tensor:
    r""":math:`g(t) = (1-\bar\alpha_t) - (1-\bar\alpha_{t-1})` with :math:`\bar\alpha_{-1} = 1`;
    shape (T,), float64. SpeeD's change-aware weights normalise it. Introduced in Chapter 2.
    """
    var = 1.0 - _alphas_cumprod(scheduler)
    return torch.diff(var, prepend=torch.zeros(1, dtype=var.dtype))


def convergence_boundary(scheduler, threshold: float = 1e-4) -> int:
    r"""The first time step m whose process increment falls below ``threshold``:
    :math:`m = \min\{t : \Delta_t < \text{threshold}\}` (642 for the linear schedule, T = 1000).

    Raises ``ValueError`` if no step qualifies. Introduced in Chapter 2.
    """
    below = torch.nonzero(process_increment(scheduler) < threshold)
    if len(below) == 0:
        raise ValueError(f"no time step has a process increment below threshold={threshold}; raise it.")
    return int(below[0])


def snr(scheduler) -> torch.Tensor:
    r"""Signal-to-noise ratio :math:`\bar\alpha_t / (1-\bar\alpha_t)` per time step; (T,), float64."""
    ab = _alphas_cumprod(scheduler)
    return ab / (1.0 - ab)


def uniform_sampler(num_train_timesteps: int = 1000) -> TimestepSampler:
    """The standard DDPM time-step sampler, t ~ U{0, .., T-1}. Introduced in Chapter 2."""

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)

    return draw


def categorical_sampler(probs: torch.Tensor) -> TimestepSampler:
    """Draw t with P(t) = probs[t]; ``probs`` (T,) non-negative, normalised here. Introduced in Chapter 2."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.ndim != 1 or bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError("probs must be a 1-D tensor of non-negative numbers with a positive sum.")
    probs = probs / probs.sum()

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(probs, batch_size, replacement=True, generator=generator)

    return draw


# --------------------------------------------------------------------------- training
def _per_sample_mse(model: DiffusionModel, scheduler, x0: torch.Tensor, y: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    x_t = scheduler.add_noise(x0, noise, t)                    # DDPM eq. 4, (B, C, H, W)
    eps_hat = predict_noise(model, x_t, t, y)                  # (B, C, H, W)
    return (eps_hat - noise).pow(2).flatten(1).mean(dim=1)     # DDPM eq. 14 per sample, (B,)


def train_step(model: DiffusionModel, optimizer: torch.optim.Optimizer, scheduler, x0: torch.Tensor,
               y: torch.Tensor, *, timestep_sampler: TimestepSampler,
               loss_weights: torch.Tensor | None = None, generator: torch.Generator) -> float:
    r"""One optimiser step on :math:`\frac1B\sum_b w(t_b)\,\|\epsilon_b - \epsilon_\theta(x_{t_b}, t_b, y_b)\|^2`.

    x0 (B, C, H, W) in [-1, 1] and y (B,) on the model's device; ``timestep_sampler`` draws
    t (B,); ``loss_weights`` (T,) gives w(t) (``None``: all ones). Noise and time steps come from
    ``generator`` (a CPU generator), so two arms with the same seed see the same noise.
    Returns the weighted loss. Introduced in Chapter 2.
    """
    device = x0.device
    t = timestep_sampler(x0.shape[0], generator)                          # (B,)
    noise = torch.randn(x0.shape, generator=generator).to(device)         # (B, C, H, W)
    per_sample = _per_sample_mse(model, scheduler, x0, y, t.to(device), noise)
    weights = torch.ones_like(per_sample) if loss_weights is None else loss_weights[t].to(per_sample)
    loss = (weights * per_sample).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def denoising_loss(model: DiffusionModel, scheduler, x0: torch.Tensor, y: torch.Tensor,
                   *, seed: int = 0, repeats: int = 4, batch_size: int = 512) -> float:
    r"""Held-out :math:`\mathbb E_{t\sim U, \epsilon}\|\epsilon - \epsilon_\theta(x_t,t,y)\|^2`, unweighted,
    with time steps and noise fixed by ``seed`` (the same for every model). x0 (N, C, H, W), y (N,).

    ``repeats`` draws of (t, noise) per image lower the variance. Introduced in Chapter 2.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    T = scheduler.config.num_train_timesteps
    for _ in range(repeats):
        for start in range(0, len(x0), batch_size):
            xb, yb = x0[start:start + batch_size], y[start:start + batch_size]
            t = torch.randint(0, T, (len(xb),), generator=generator)
            noise = torch.randn(xb.shape, generator=generator).to(xb.device)
            total += float(_per_sample_mse(model, scheduler, xb, yb, t.to(xb.device), noise).sum())
            count += len(xb)
    model.train(was_training)
    return total / count


@torch.no_grad()
def denoising_loss_per_timestep(model: DiffusionModel, scheduler, x0: torch.Tensor, y: torch.Tensor,
                                timesteps: list[int] | torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    r"""Held-out :math:`\mathbb E_\epsilon\|\epsilon - \epsilon_\theta(x_t,t,y)\|^2` at each given t,
    every image noised once per t with noise fixed by ``seed``; x0 (N, C, H, W) -> (len(timesteps),).

    Shows where in t a model is still learning (Chapter 2) or where quantization hurts.
    Introduced in Chapter 2.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)      # (N, C, H, W), shared by all t
    was_training = model.training
    model.eval()
    out = []
    for t in torch.as_tensor(timesteps, dtype=torch.long).tolist():
        t_batch = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        out.append(float(_per_sample_mse(model, scheduler, x0, y, t_batch, noise).mean()))
    model.train(was_training)
    return torch.tensor(out)


@dataclass
class TrainHistory:
    """What :func:`train_diffusion` measured: the loss per step, evaluations and time per step;
    ``ema`` is the exponential moving average of the weights when one was kept (else ``None``)."""

    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds_per_step: float = 0.0
    ema: torch.nn.Module | None = None


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    r"""One EMA update, :math:`\theta_\text{ema} \leftarrow d\,\theta_\text{ema} + (1-d)\,\theta` with
    the warm-up :math:`d = \min(\text{decay}, (1+s)/(10+s))` at step s, so early averages do not
    cling to the random initial weights; buffers are copied. Introduced in Chapter 2.
    """
    d = min(decay, (1.0 + step) / (10.0 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train_diffusion(model: DiffusionModel, scheduler, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                    batch_size: int = 64, lr: float = 1e-3, timestep_sampler: TimestepSampler | None = None,
                    loss_weights: torch.Tensor | None = None, seed: int = 0, eval_every: int = 0,
                    evaluate: Callable[[DiffusionModel, int], dict] | None = None,
                    desc: str = "train", ema_decay: float = 0.0) -> TrainHistory:
    r"""Train ``model`` for ``steps`` AdamW steps on x (N, C, H, W) in [-1, 1], y (N,).

    Batches, noise and time steps come from one generator seeded with ``seed``; torch's global
    seed is reset too (the DiT's label dropout draws from it), so arms differ only in their
    sampler and weights. ``evaluate(model, step)`` runs at step 0, every ``eval_every`` steps and
    at the end; its time is excluded from ``seconds_per_step``. With ``ema_decay`` in (0, 1) an
    EMA of the weights (:func:`update_ema`) is kept in ``history.ema`` and is what ``evaluate``
    sees. Introduced in Chapter 2.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must both be at least 1.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay={ema_decay} must lie in [0, 1); 0 keeps no average, 0.999 is usual.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = timestep_sampler or uniform_sampler(scheduler.config.num_train_timesteps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history, train_seconds = TrainHistory(), 0.0
    if ema_decay > 0:
        history.ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    for step in progress_bar(range(steps + 1), desc):
        if evaluate is not None and (step == steps or (eval_every and step % eval_every == 0)):
            history.eval_steps.append(step)
            history.evals.append(evaluate(history.ema if history.ema is not None else model, step))
            model.train()
        if step == steps:
            break
        start = time.perf_counter()
        index = torch.randint(0, len(x), (batch_size,), generator=generator).to(x.device)
        history.losses.append(train_step(model, optimizer, scheduler, x[index], y[index],
                                         timestep_sampler=sampler, loss_weights=loss_weights,
                                         generator=generator))
        if history.ema is not None:
            update_ema(history.ema, model, ema_decay, step)
        train_seconds += time.perf_counter() - start
    history.seconds_per_step = train_seconds / steps
    return history


# ---------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model: DiffusionModel, scheduler, labels: torch.Tensor, *, num_inference_steps: int = 20,
           seed: int = 0, batch_size: int = 500,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    r"""Class-conditional samples (N, C, H, W) in [-1, 1] for ``labels`` (N,).

    ``scheduler`` is a DDIM scheduler (deterministic, few steps) or a DDPM one (ancestral);
    its timesteps are reset here. Starts from :math:`x_T\sim\mathcal N(0, I)` drawn with ``seed``.
    ``on_step(i, t, x_t)``, if given, is called before the model sees step ``i`` (0 = the noisiest)
    of each batch: to record the trajectory, or to route a quantized model to the quantizers of
    step ``i`` (Chapter 6). Introduced in Chapter 2.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1.")
    cfg = model.config
    size, channels = cfg.sample_size, cfg.in_channels
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    scheduler.set_timesteps(num_inference_steps)
    chunks = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        x = torch.randn((len(y), channels, size, size), generator=generator).to(device)  # x_T
        for i, t in enumerate(scheduler.timesteps):
            if on_step is not None:
                on_step(i, t, x)
            eps = predict_noise(model, x, t.expand(len(y)).to(device), y)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        chunks.append(x.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(chunks)


# -------------------------------------------------------------------- quality metric
def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and covariance (F, F) of features (N, F), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must have shape (N, F) with N >= 2, not {tuple(f.shape)}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _check_covariance(name: str, sigma: np.ndarray) -> None:
    """Raise unless ``sigma`` is symmetric positive semi-definite, up to rounding (1e-9 of its scale)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1e-300)
    fix = "compute it with feature_statistics(features) from (N, F) features"
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1] or not np.allclose(sigma, sigma.T, rtol=0, atol=1e-9 * scale):
        raise ValueError(f"{name} is not a covariance matrix: it is not symmetric; {fix}.")
    smallest = float(np.linalg.eigvalsh(sigma).min())
    if smallest < -1e-9 * scale:
        raise ValueError(f"{name} is not a covariance matrix: it has the negative eigenvalue {smallest:.3g}; {fix}.")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    r"""Fréchet distance between Gaussians (Dowson & Landau 1982; Heusel et al. 2017, the FID formula):

    :math:`d^2 = \|\mu_1-\mu_2\|^2 + \operatorname{Tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big)`.

    :math:`\operatorname{Tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i}` over the eigenvalues
    of :math:`\Sigma_1\Sigma_2` (real and non-negative for covariances; rounding noise is clipped).
    That holds only for symmetric positive semi-definite :math:`\Sigma`: anything else raises
    ``ValueError`` (clipping a truly negative eigenvalue would give a wrong, often zero, distance).
    Introduced in Chapter 2.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}.")
    _check_covariance("sigma1", sigma1)
    _check_covariance("sigma2", sigma2)
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real.clip(min=0.0)
    trace_sqrt = float(np.sqrt(eigenvalues).sum())
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


@dataclass(frozen=True)
class SampleQuality:
    r"""Offline sample quality: ``frechet`` is the Fréchet distance between the classifier's features
    of samples and of held-out real images (lower is better); ``accuracy`` is the fraction of
    class-conditional samples the classifier labels as the class they were asked for, ``correct`` of
    ``total``, divided in float64 so that a threshold such as 0.9 compares exactly (135 / 150 >= 0.9).

    Not Inception-FID: the features come from a small classifier this repository trains on the
    same data (Inception-v3 needs a download and sees 299×299 photos, not 8×8 digits), so values
    are comparable only within this book, between models scored with the same classifier.
    """

    frechet: float
    accuracy: float
    correct: int = 0
    total: int = 0


@torch.no_grad()
def sample_quality(classifier: torch.nn.Module, samples: torch.Tensor, labels: torch.Tensor,
                   reference: tuple[np.ndarray, np.ndarray]) -> SampleQuality:
    """Score samples (N, C, H, W) in [-1, 1] asked for ``labels`` (N,) against ``reference`` =
    :func:`feature_statistics` of real held-out images' features. The classifier takes images in
    [0, 1] and has ``.features(x) -> (B, F)``. Introduced in Chapter 2.
    """
    classifier.eval()
    device = next(classifier.parameters()).device
    images = ((samples + 1.0) / 2.0).to(device)                     # [-1, 1] -> [0, 1]
    features = classifier.features(images).cpu()                    # (N, F)
    predicted = classifier(images).argmax(dim=1).cpu()              # (N,)
    mu, sigma = feature_statistics(features)
    correct, total = int((predicted == labels.cpu()).sum()), len(labels)
    return SampleQuality(frechet=frechet_distance(mu, sigma, *reference), accuracy=correct / total,
                         correct=correct, total=total)


# ------------------------------------------------------------------------- checkpoints
MAKE_SCRIPT = "python scripts/make_diffusion_checkpoints.py"
# dit4x64_digits8 (Chapter 5): a 393k-parameter DiT trained with EMA until its samples are digits,
# with two earlier EMA snapshots of the same run, to see how activation salience grows with training.
DIT4X64_SNAPSHOTS: tuple[int, ...] = (500, 2000)
REFERENCE_NAMES: tuple[str, ...] = ("dit_digits8", "unet_digits8", "classifier_digits8", "dit4x64_digits8",
                                    *(f"dit4x64_digits8_step{s}" for s in DIT4X64_SNAPSHOTS))


def _model_kind(model: torch.nn.Module) -> str:
    if isinstance(model, DiTTransformer2DModel):
        return "dit"
    if isinstance(model, UNet2DModel):
        return "unet"
    return "classifier"


def save_reference(model: torch.nn.Module, name: str, metadata: dict[str, str] | None = None,
                   directory: Path | str = CHECKPOINT_DIR, config: dict | None = None) -> str:
    """Save ``model`` as ``<directory>/<name>.safetensors`` with its config, and record its
    sha256 in ``<directory>/SHA256SUMS`` (``sha256sum -c`` format). Returns the sha256.
    Written by :func:`effnb.train.save_listed_checkpoint`, which the vision tower of Chapter 9 uses too.

    diffusers models carry their config; pass ``config`` (constructor keyword arguments) for an
    ``effnb.models.SmallCNN`` classifier. Crash-safe: the weights are written and hashed under a
    temporary name first; then the manifest loses the old entry, the weights are renamed into
    place, and the manifest gains the new entry, each step an atomic ``os.replace``. An interrupt
    therefore leaves either the old checkpoint, readable, or a missing entry whose error names the
    script, never weights that disagree with their entry. Introduced in Chapter 2.
    """
    kind = _model_kind(model)
    if kind == "classifier" and config is None:
        raise ValueError("save_reference needs config=... (the SmallCNN keyword arguments) for a classifier.")
    model_config = json.loads(json.dumps(dict(model.config), default=list)) if kind != "classifier" else config
    return save_listed_checkpoint(model, Path(directory) / f"{name}.safetensors",
                                  {"kind": kind, "config": model_config, **(metadata or {})})


_KINDS: tuple[str, ...] = ("dit", "unet", "classifier")


def _build(kind: str, config: dict) -> torch.nn.Module:
    if kind == "dit":
        return DiTTransformer2DModel.from_config(config)
    if kind == "unet":
        return UNet2DModel.from_config(config)
    from effnb.models import SmallCNN  # layer 3; imported here so the rest works without it

    return SmallCNN(**config)


def load_reference(name: str, directory: Path | str = CHECKPOINT_DIR,
                   device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a reference checkpoint after checking its sha256; returns ``(model in eval mode, metadata)``.

    ``name`` is one of :data:`REFERENCE_NAMES` (or any name saved with :func:`save_reference` in
    ``directory``). A missing or corrupt file raises an error that names the script re-creating it.
    Introduced in Chapter 2.
    """
    directory = Path(directory)
    path = directory / f"{name}.safetensors"
    if directory == CHECKPOINT_DIR:
        check_choice("name", name, REFERENCE_NAMES)
    fix = checkpoint_fix(MAKE_SCRIPT)
    metadata = read_listed_checkpoint(path, fix, label=f"Checkpoint {path}")
    if "kind" not in metadata or "config" not in metadata:
        raise ValueError(f"Checkpoint {path} lacks the metadata 'kind', 'config' that save_reference writes; {fix}.")
    if metadata["kind"] not in _KINDS:
        raise ValueError(f"Checkpoint {path} has kind={metadata['kind']!r}, which load_reference cannot "
                         f"build (it builds {', '.join(map(repr, _KINDS))}); {fix}.")
    model = _build(metadata["kind"], metadata["config"])
    load_checkpoint(model, path)  # the sha256 was checked above
    return model.to(device).eval(), metadata
