"""Tests of effnb.diffusion's training side added for Chapter 2: the residual MLP denoiser, the
sinusoidal time embedding, and the EMA of weights kept by train_diffusion."""
from __future__ import annotations

import math

import pytest
import torch

from effnb import diffusion as D
from effnb.data import load_digits


@pytest.fixture(scope="module")
def linear():
    return D.make_scheduler("linear")


# ------------------------------------------------------------ time embedding
def test_sinusoidal_embedding_golden_values():
    t = torch.tensor([0, 1, 500])
    e = D.sinusoidal_embedding(t, frequencies=4, max_period=1000.0)
    assert e.shape == (3, 8)
    # t = 0: sin 0 = 0 and cos 0 = 1 at every frequency
    assert torch.equal(e[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    # frequency i is 1000^(-i/4): at t = 500, i = 2 the angle is 500 / sqrt(1000)
    angle = 500 / math.sqrt(1000.0)
    assert e[2, 2].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert e[2, 6].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # frequency 0 is 1 rad per step
    assert e[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)


# ------------------------------------------------------------ the MLP denoiser
def test_residual_mlp_shapes_config_and_parameter_count():
    model = D.ResidualMLPDenoiser(sample_size=8, in_channels=1, width=32, blocks=2, num_classes=10, frequencies=4)
    x = torch.randn(5, 1, 8, 8)
    out = model(x, torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,)))
    assert out.shape == (5, 1, 8, 8)
    assert (model.config.sample_size, model.config.in_channels) == (8, 1)
    linear = lambda i, o: i * o + o  # noqa: E731
    expected = (linear(64, 32)                               # input
                + linear(8, 32) + linear(32, 32)             # time MLP on 2F = 8 features
                + 10 * 32                                    # class embedding
                + 2 * (2 * 32 + 3 * linear(32, 32))          # blocks: LayerNorm + fc1, condition, fc2
                + 2 * 32 + linear(32, 64))                   # output LayerNorm + Linear
    assert sum(p.numel() for p in model.parameters()) == expected


def test_residual_mlp_blocks_start_as_identity_and_are_conditioned_on_t_and_y():
    torch.manual_seed(0)
    model = D.ResidualMLPDenoiser(width=32, blocks=2)
    x = torch.randn(4, 1, 8, 8)
    t, y = torch.full((4,), 10), torch.zeros(4, dtype=torch.long)
    # fc2 starts at zero, so each block is the identity and the output ignores (t, y)
    assert torch.equal(model(x, t, y), model(x, t + 500, y + 3))
    for block in model.blocks:
        torch.nn.init.normal_(block.fc2.weight, std=0.1)
    base = model(x, t, y)
    assert not torch.allclose(base, model(x, t + 500, y)), "the output must depend on t"
    assert not torch.allclose(base, model(x, t, y + 3)), "the output must depend on the class"


def test_residual_mlp_rejects_bad_sizes():
    with pytest.raises(ValueError, match="ResidualMLPDenoiser needs positive sizes; got sample_size=8, in_channels=1, width=0"):
        D.ResidualMLPDenoiser(width=0)


def test_residual_mlp_works_with_predict_noise_and_sample():
    model = D.ResidualMLPDenoiser(width=16, blocks=1)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([0, 10, 999]), torch.tensor([1, 2, 3])
    assert torch.equal(D.predict_noise(model, x, t, y), model(x, t, y))
    samples = D.sample(model, D.make_scheduler("linear", kind="ddim"), torch.arange(4), num_inference_steps=3)
    assert samples.shape == (4, 1, 8, 8) and float(samples.abs().max()) <= 1.0


def test_residual_mlp_learns_digits_in_a_few_hundred_steps(linear):
    split = load_digits(size=8, seed=0)
    x, y = split.x_train * 2 - 1, split.y_train
    x_test, y_test = split.x_test * 2 - 1, split.y_test
    torch.manual_seed(0)
    model = D.ResidualMLPDenoiser(width=64, blocks=2)
    before = D.denoising_loss(model, linear, x_test, y_test, seed=0, repeats=1)
    D.train_diffusion(model, linear, x, y, steps=200, batch_size=128, lr=2e-3, seed=0)
    after = D.denoising_loss(model, linear, x_test, y_test, seed=0, repeats=1)
    # predicting zero noise gives 1.0; a model that learned the digits goes well below it
    assert before > 0.8 and after < 0.3, (before, after)


# ------------------------------------------------------------------ the EMA
def test_update_ema_follows_the_warm_up_formula():
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
    D.update_ema(ema, model, decay=0.999, step=0)      # d = min(0.999, 1/10) = 0.1
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.9))
    D.update_ema(ema, model, decay=0.5, step=1000)     # d = min(0.5, 1001/1010) = 0.5
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.95))


def test_train_diffusion_keeps_an_ema_and_evaluates_it(linear):
    x, y = torch.randn(32, 1, 8, 8).clamp(-1, 1), torch.randint(0, 10, (32,))
    seen = []
    model = D.ResidualMLPDenoiser(width=16, blocks=1)
    history = D.train_diffusion(model, linear, x, y, steps=6, batch_size=8, seed=0, eval_every=3, ema_decay=0.9,
                                evaluate=lambda m, step: seen.append(m) or step)
    assert history.ema is not None and all(m is history.ema for m in seen) and len(seen) == 3
    assert not any(p.requires_grad for p in history.ema.parameters())
    differs = [not torch.equal(a, b) for a, b in zip(history.ema.parameters(), model.parameters())]
    assert any(differs), "the average must lag the trained weights"
    assert D.train_diffusion(model, linear, x, y, steps=2, batch_size=8).ema is None


def test_train_diffusion_rejects_a_bad_ema_decay(linear):
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must lie in \[0, 1\)"):
        D.train_diffusion(D.ResidualMLPDenoiser(width=8, blocks=1), linear, x, y, steps=1, ema_decay=1.0)
