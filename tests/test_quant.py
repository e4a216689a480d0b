"""Tests of effnb.quant: exact matches with torch's fake-quantize ops, properties over random tensors,
STE and LSQ gradients against hand and NumPy references, the observer, the layer wrappers inside
diffusers models, per-time-step routing, torch's int8 kernels, and every error message."""
from __future__ import annotations

import copy
import warnings

import diffusers
import numpy as np
import pytest
import torch
from torch import nn

from effnb import quant as Q
from effnb.measure import cpu_instruction_sets


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: one thread (conftest.py)


BITS = [2, 4, 8, 16]


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def broadcast(qp, x):
    shape = [1] * x.dim()
    if qp.axis is not None:
        shape[qp.axis] = -1
    return qp.scale.reshape(shape), qp.zero_point.float().reshape(shape)


# ---------------------------------------------------------------------------- conventions
def test_qrange_of_both_grids():
    assert Q.qrange(8, True) == (-128, 127) and Q.qrange(8, False) == (0, 255)
    assert Q.qrange(2, True) == (-2, 1) and Q.qrange(16, False) == (0, 65535)


def test_the_docstring_worked_example():
    x = torch.tensor([-1.0, 0.5, 2.0])
    qp = Q.choose_qparams(x)
    assert float(qp.scale) == pytest.approx(3 / 255) and int(qp.zero_point) == 85
    assert Q.quantize(x, qp).tolist() == [0, 127, 255]               # 0.5/s = 42.5 rounds to 42 (half to even)
    assert Q.fake_quantize(x, qp)[1].item() == pytest.approx(42 * 3 / 255)


def test_symmetric_convention_keeps_both_ends_and_zero_exact():
    x = torch.tensor([-0.5, 0.0, 1.27])
    qp = Q.choose_qparams(x, bits=8, symmetric=True)
    assert float(qp.scale) == pytest.approx(1.27 / 127) and int(qp.zero_point) == 0
    assert Q.quantize(x, qp).tolist() == [-50, 0, 127]
    assert Q.fake_quantize(-x[2:], qp).item() == pytest.approx(-1.27)    # -max|x| is code -127, not clipped


def test_zero_is_exact_and_constant_tensors_do_not_divide_by_zero():
    for x in (torch.zeros(5), torch.full((5,), 3.0), torch.full((5,), -2.0)):
        for symmetric in (True, False):
            qp = Q.choose_qparams(x, 4, symmetric)
            assert float(qp.scale) > 0
            out = Q.fake_quantize(torch.cat([x, torch.zeros(1)]), qp)
            assert out[-1].item() == 0.0 and torch.allclose(out[:-1], x, rtol=1e-6)


# ---------------------------------------------------------------------------- exact match with torch
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_torch_per_tensor(bits, symmetric):
    for seed, method in enumerate(Q.METHODS):
        x = randn(7, 33, seed=seed + bits, scale=3.0) + 0.5
        qp = Q.choose_qparams(x, bits, symmetric, method=method)
        ref = torch.fake_quantize_per_tensor_affine(x, float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax)
        assert torch.equal(Q.fake_quantize(x, qp), ref)
        assert torch.equal(Q.dequantize(Q.quantize(x, qp), qp), ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_fake_quantize_equals_torch_per_channel(bits, symmetric, axis):
    x = randn(6, 5, 4, seed=bits) * randn(6, 5, 1, seed=1).abs()
    for method in Q.METHODS:
        qp = Q.choose_qparams(x, bits, symmetric, axis=axis, method=method)
        assert qp.scale.shape == (x.shape[axis],) and qp.zero_point.dtype == torch.int32
        ref = torch.fake_quantize_per_channel_affine(x, qp.scale, qp.zero_point, axis % 3, qp.qmin, qp.qmax)
        assert torch.equal(Q.fake_quantize(x, qp), ref)


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_equals_torch_for_arbitrary_scales_and_zero_points(bits):
    qmin, qmax = Q.qrange(bits, False)
    x = randn(5, 40, seed=3, scale=2.0)
    scale = torch.rand(5, generator=torch.Generator().manual_seed(4)) * 0.2 + 0.01
    zero = torch.randint(qmin, qmax + 1, (5,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    qp = Q.QParams(scale, zero, bits, False, axis=0)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zero, 0, qmin, qmax)
    assert torch.equal(Q.fake_quantize(x, qp), ref)
    codes = Q.quantize(x, qp)
    assert codes.dtype == torch.int32 and int(codes.min()) >= qmin and int(codes.max()) <= qmax


# ---------------------------------------------------------------------------- properties
SHAPES = [(8, 16), (4, 3, 5), (32, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_error_bound_idempotence_and_16_bit_identity(shape, seed):
    x = randn(*shape, seed=seed) * randn(shape[0], *[1] * (len(shape) - 1), seed=seed + 10).abs() * 4
    for bits in (3, 8):
        for symmetric in (True, False):
            qp = Q.choose_qparams(x, bits, symmetric, axis=0)
            s, z = broadcast(qp, x)
            x_hat = Q.fake_quantize(x, qp)
            # z is rounded, so [min, max] may overhang the grid by up to half a step, no more.
            reach = s * (0.5 + 1e-4)
            inside = (x >= s * (qp.qmin - z) - reach) & (x <= s * (qp.qmax - z) + reach)
            assert bool(inside.all())                                    # min-max covers every value
            assert bool(((x_hat - x).abs() <= s / 2 * (1 + 1e-5) + 1e-7).all())
            assert torch.equal(Q.fake_quantize(x_hat, qp), x_hat)        # quantize∘dequantize is idempotent
    for symmetric in (True, False):
        x_hat = Q.fake_quantize(x, Q.choose_qparams(x, 16, symmetric))
        assert float((x_hat - x).abs().max()) <= 1e-4 * float(x.max() - x.min())


def _official_percentile_search(x):
    """PTQ4DiT's quant_layer.py, UniformAffineQuantizer.init_quantization_scale, scale_method 'mse', replayed."""
    best_score, delta, zero_point = 1e10, None, None
    for pct in [0.999, 0.9999, 0.99999]:
        new_max, new_min = torch.quantile(x.reshape(-1), pct), torch.quantile(x.reshape(-1), 1.0 - pct)
        d = (new_max - new_min) / (2 ** 4 - 1)
        z = (-new_min / d).round()
        x_q = (torch.clamp(torch.round(x / d) + z, 0, 2 ** 4 - 1) - z) * d
        score = (x - x_q).abs().pow(2).mean()
        if score < best_score:
            best_score, delta, zero_point = score, d, z
    return delta, zero_point


def test_percentile_search_is_ptq4dits_mse_range():
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(5, 20_000, generator=g) * torch.linspace(0.5, 2, 5)[:, None] + 0.1
        x[:, :3] *= 40 * (seed % 3)                                      # planted outliers in some cases
        qp = Q.choose_qparams(x, 4, False, axis=0, method="percentile_search")
        for c in range(5):
            delta, zero = _official_percentile_search(x[c])
            assert abs(float(qp.scale[c]) - float(delta)) <= 1e-5 * float(delta), (seed, c)
            assert int(qp.zero_point[c]) == int(zero), (seed, c)
    big = torch.randn(1, 1 << 24 | 5, generator=torch.Generator().manual_seed(9))   # past torch.quantile's limit
    assert float(Q.choose_qparams(big, 8, method="percentile_search").scale) > 0


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_never_loses_to_min_max_per_channel(symmetric):
    for seed in range(3):
        x = randn(6, 500, seed=seed) * torch.linspace(0.1, 3, 6)[:, None]
        for bits in (2, 4, 8):
            errors = {m: (Q.fake_quantize(x, Q.choose_qparams(x, bits, symmetric, axis=0, method=m)) - x).pow(2).sum(1)
                      for m in ("minmax", "mse")}
            assert bool((errors["mse"] <= errors["minmax"]).all())
            if bits <= 4:                               # Gaussian tails: clipping a little helps at low bits
                assert bool((errors["mse"] < errors["minmax"]).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_clips_a_planted_outlier(symmetric):
    x = randn(4, 1000, seed=7)
    x[2, 17] = 50.0
    minmax = Q.choose_qparams(x, 8, symmetric, axis=0)
    clipped = Q.choose_qparams(x, 8, symmetric, axis=0, method="percentile", percentile=99.0)
    assert float(minmax.scale[2]) > 5 * float(minmax.scale[0])
    assert float(clipped.scale[2]) < float(minmax.scale[2]) / 5
    assert float(clipped.scale[2]) < 1.5 * float(clipped.scale[[0, 1, 3]].max())
    full = Q.choose_qparams(x, 8, symmetric, axis=0, method="percentile", percentile=100)
    assert torch.equal(full.scale, minmax.scale)


# ---------------------------------------------------------------------------- gradients
def test_ste_gradient_mask_matches_numpy_and_torch():
    s, z, qmin, qmax = 0.1, 5, 0, 15                           # representable: [-0.5, 1.0], plus half a step
    x = torch.linspace(-1.5, 2.0, 351, requires_grad=True)
    qp = Q.QParams(torch.tensor(s), torch.tensor(z, dtype=torch.int32), 4, False, None)
    Q.fake_quantize(x, qp).sum().backward()
    xs = x.detach().numpy()
    codes = np.round(xs * (np.float32(1) / np.float32(s))) + z            # NumPy rounds half to even too
    mask = ((codes >= qmin) & (codes <= qmax)).astype(np.float32)
    np.testing.assert_allclose(x.grad.numpy(), mask, rtol=1e-6, atol=0)  # s·(1/s) may be 1 ulp off 1
    assert 0 < mask.sum() < len(mask)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x_ref, s, z, qmin, qmax).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=0)


def test_ste_gradient_mask_per_channel_matches_torch():
    x = randn(3, 50, seed=2, scale=3.0)
    qp = Q.choose_qparams(x, 4, False, axis=0, method="percentile", percentile=90)
    mine, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (Q.fake_quantize(mine, qp) * torch.arange(50.0)).sum().backward()
    (torch.fake_quantize_per_channel_affine(ref, qp.scale, qp.zero_point, 0, qp.qmin, qp.qmax)
     * torch.arange(50.0)).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-6, atol=0)   # zeros exact, the rest to 1 ulp
    assert bool((mine.grad == 0).any())


def test_lsq_step_gradient_on_a_hand_example():
    lsq = Q.LSQQuantizer(bits=3, symmetric=True)                 # grid -4..3
    lsq.init_from(torch.ones(4))
    with torch.no_grad():
        lsq.step.fill_(0.2)
    x = torch.tensor([-1.0, 0.12, 0.46, 3.0], requires_grad=True)   # x/s = -5, 0.6, 2.3, 15
    out = lsq(x)
    assert torch.allclose(out, torch.tensor([-0.8, 0.2, 0.4, 0.6]))
    out.sum().backward()
    # d x̂/ds: clipped low -> qmin = -4; 0.6 -> -0.6 + 1; 2.3 -> -2.3 + 2; clipped high -> qmax = 3;
    # scaled by g = 1/sqrt(N qmax) = 1/sqrt(4 · 3).
    assert lsq.step.grad.item() == pytest.approx((-4 + 0.4 - 0.3 + 3) / np.sqrt(12), rel=1e-5)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_lsq_per_channel_gradient_matches_the_formula_in_numpy():
    x = randn(3, 64, seed=5, scale=2.0)
    lsq = Q.LSQQuantizer(bits=4, symmetric=True, axis=0).init_from(x)
    assert torch.equal(lsq.step.detach(), Q.choose_qparams(x, 4, True, axis=0).scale)
    with torch.no_grad():
        lsq.step.mul_(0.6)                                        # so that some values clip
    lsq(x).sum().backward()
    v = x.numpy() / lsq.step.detach().numpy()[:, None]
    qmin, qmax = -8, 7
    d = np.where(v <= qmin, qmin, np.where(v >= qmax, qmax, np.round(np.clip(v, qmin, qmax)) - v))
    np.testing.assert_allclose(lsq.step.grad.numpy(), d.sum(1) / np.sqrt(64 * qmax), rtol=1e-4)
    assert bool((np.abs(v) > qmax).any())


# ---------------------------------------------------------------------------- observer
def test_quantizer_observes_min_max_and_matches_choose_qparams():
    q = Q.Quantizer(bits=8, axis=1)
    q.observing, q.enabled = True, False
    batches = [randn(4, 3, 5, 5, seed=i, scale=i + 1.0) for i in range(3)]
    for b in batches:
        assert torch.equal(q(b), b)                               # passes through while disabled
    both = torch.cat(batches)
    assert torch.equal(q.min_val, both.amin((0, 2, 3))) and torch.equal(q.max_val, both.amax((0, 2, 3)))
    assert q.reservoir.numel() == 0 and q.seen == 300              # min-max keeps no samples
    qp = q.compute_qparams()
    ref = Q.choose_qparams(both, 8, axis=1)
    assert torch.equal(qp.scale, ref.scale) and torch.equal(qp.zero_point, ref.zero_point)
    q.enabled = True
    assert torch.equal(q(both), Q.fake_quantize(both, ref))


def test_percentile_quantizer_keeps_every_row_under_the_cap():
    q = Q.Quantizer(bits=8, axis=1, method="percentile")
    q.observing, q.enabled = True, False
    for i in range(3):
        q(randn(4, 3, 5, 5, seed=i))
    assert q.reservoir.shape == (300, 3) and q.seen == 300


def test_reservoir_is_capped_seeded_and_uniform_over_batches():
    def fill(seed):
        q = Q.Quantizer(reservoir_size=1000, seed=seed, method="percentile")
        for i in range(10):
            q.observe(torch.full((2000,), float(i)))
        return q

    a, b, c = fill(0), fill(0), fill(1)
    assert a.reservoir.shape == (1000, 1) and a.seen == 20_000
    assert torch.equal(a.reservoir, b.reservoir) and not torch.equal(a.reservoir, c.reservoir)
    assert abs(float(a.reservoir.mean()) - 4.5) < 0.4            # each batch equally likely to stay
    assert len(torch.unique(a.reservoir)) == 10


def test_percentile_quantizer_uses_the_reservoir():
    q = Q.Quantizer(bits=8, symmetric=True, method="percentile", percentile=99.0)
    q.observing, q.enabled = True, False
    x = randn(5000, seed=3)
    x[0] = 100.0
    q(x)
    qp = q.compute_qparams()
    assert float(qp.scale) < 4 / 127 and float(qp.scale) > 1.5 / 127


# ---------------------------------------------------------------------------- wrappers in diffusers models
@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    g = torch.Generator().manual_seed(1)
    calib = (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 1000, (16,), generator=g),
             torch.randint(0, 10, (16,), generator=g))
    test = (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g),
            torch.randint(0, 10, (8,), generator=g))
    return model, calib, test


def run_dit(model, batch):
    x, t, y = batch
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def quantized_dit(dit, weight_bits, act_bits, **kwargs):
    model, calib, test = dit
    model = copy.deepcopy(model)
    names = Q.quantize_model(model, weight_bits, act_bits, **kwargs)
    if act_bits is not None:
        Q.calibrate(model, lambda: run_dit(model, calib))
    return model, names


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def test_dit_quantized_8_8_is_close_4_8_worse_and_off_is_exact(dit):
    model, _, test = dit
    ref = run_dit(model, test)
    q88, names = quantized_dit(dit, 8, 8)
    q48, _ = quantized_dit(dit, 4, 8)
    assert len(names) == 21 and "pos_embed.proj" in names and "proj_out_2" in names
    e88, e48 = rel_error(run_dit(q88, test), ref), rel_error(run_dit(q48, test), ref)
    assert 0 < e88 < 0.05 and e48 > 2 * e88
    Q.set_quantization(q88, False)
    assert torch.equal(run_dit(q88, test), ref)
    Q.set_quantization(q88, True, names=["proj_out_2"])
    assert 0 < rel_error(run_dit(q88, test), ref) < e88


def test_wrappers_share_parameters_keep_state_dict_keys_and_restore(dit):
    model, _, test = dit
    ref = run_dit(model, test)
    fresh = copy.deepcopy(model)
    keys, weight = list(fresh.state_dict()), fresh.proj_out_1.weight
    Q.quantize_model(fresh, 8, 8)
    assert isinstance(fresh.proj_out_1, Q.QuantLinear) and fresh.proj_out_1.weight is weight
    assert isinstance(fresh.pos_embed.proj, Q.QuantConv2d)
    assert list(fresh.state_dict()) == keys
    restored = Q.restore_float(fresh)
    assert len(restored) == 21 and type(fresh.proj_out_1) is nn.Linear and fresh.proj_out_1.weight is weight
    assert torch.equal(run_dit(fresh, test), ref)


def test_include_and_exclude_follow_one_rule(dit):
    model = copy.deepcopy(dit[0])
    names = Q.quantize_model(model, 8, None, exclude=["transformer_blocks.0", "proj_out_2"])
    assert not any(n.startswith("transformer_blocks.0.") or n == "proj_out_2" for n in names)
    assert "transformer_blocks.1.attn1.to_q" in names and "proj_out_1" in names and len(names) == 11
    attn = Q.quantize_model(copy.deepcopy(dit[0]), 8, None, include=lambda n: ".attn1." in n)
    assert len(attn) == 8
    ff = Q.quantize_model(copy.deepcopy(dit[0]), 8, None, include=["transformer_blocks.1.ff"])
    assert ff == ["transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.2"]


def test_report_lists_the_swapped_layers(dit):
    model, names = quantized_dit(dit, 4, None, include=["proj_out_1", "pos_embed"])
    rows = Q.quantization_report(model)
    assert [r["name"] for r in rows] == ["pos_embed.proj", "proj_out_1"] == sorted(names)
    assert rows[0] == {"name": "pos_embed.proj", "kind": "Conv2d", "in_features": 1, "out_features": 32,
                       "weight_bits": 4, "act_bits": None, "per_timestep": 0, "enabled": True}
    assert rows[1]["kind"] == "Linear" and (rows[1]["in_features"], rows[1]["out_features"]) == (32, 64)
    text = Q.format_report(rows)
    assert text.splitlines()[0].split() == list(rows[0]) and "proj_out_1" in text and " fp " in text


def test_unet_with_per_timestep_activation_quantizers():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    x, t = randn(4, 1, 8, 8, seed=1), torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        ref = unet(x, t).sample
    names = Q.quantize_model(unet, 8, 8, timesteps=2)
    assert any(isinstance(unet.get_submodule(n), Q.QuantConv2d) for n in names)

    def run():
        for i in range(2):
            with Q.timestep_index(unet, i):
                unet(x, t)

    Q.calibrate(unet, run)
    with Q.timestep_index(unet, 1), torch.no_grad():
        out = unet(x, t).sample
    assert 0 < rel_error(out, ref) < 0.1
    Q.set_quantization(unet, False)
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, ref)


# ---------------------------------------------------------------------------- time-step routing, calibration
def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_observations_land_in_the_indexed_quantizer():
    model, x = small_mlp(), randn(16, 4, seed=1)
    Q.quantize_model(model, 8, 8, timesteps=3)

    def run_0_and_2():
        with Q.timestep_index(model, 0):
            model(x)
        with Q.timestep_index(model, 2):
            model(10 * x)

    with pytest.raises(RuntimeError, match=r"calibrate: layer '0' time-step quantizer 1 saw no input; make run\(\) "
                                           r"call the model with set_timestep_index\(model, 1\)\."):
        Q.calibrate(model, run_0_and_2)
    first = model[0].input_quantizers
    assert first[0].seen == 64 and first[1].seen == 0 and first[2].seen == 64   # values, per tensor
    assert torch.allclose(first[2].max_val, 10 * first[0].max_val)

    def run_all():
        for i in range(3):
            with Q.timestep_index(model, i):
                model((i + 1) * x)

    Q.calibrate(model, run_all)
    scales = [float(q.qparams.scale) for q in first]
    assert scales == pytest.approx([scales[0], 2 * scales[0], 3 * scales[0]], rel=1e-5)
    assert model[0].timestep_index is None                       # the context manager restored it


def test_a_missing_or_bad_timestep_index_raises():
    model = small_mlp()
    Q.quantize_model(model, 8, 8, timesteps=3)
    with pytest.raises(RuntimeError, match=r"layer '0' has 3 per-time-step activation quantizers but no time-step "
                                           r"index; call set_timestep_index\(model, i\)"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"index=3 is out of range for layer '0''s 3 per-time-step quantizers; use 0\.\.2\."):
        Q.set_timestep_index(model, 3)
    Q.set_timestep_index(model, 2)
    assert model[2].timestep_index == 2


def test_calibrate_removes_its_hooks_even_when_run_raises():
    model = small_mlp()
    Q.quantize_model(model, 8, 8)

    def broken():
        model(torch.zeros(2, 4))
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        Q.calibrate(model, broken)
    for layer in (model[0], model[2]):
        assert len(layer._forward_pre_hooks) == 0 and layer.input_quantizer.enabled
    Q.calibrate(model, lambda: model(randn(8, 4, seed=2)))
    assert all(len(layer._forward_pre_hooks) == 0 for layer in (model[0], model[2]))
    assert model[0].input_quantizer.qparams is not None and model[0].input_quantizer.seen == 8 * 4


# ---------------------------------------------------------------------------- torch's int8 kernels
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_linear_is_close_to_float_and_holds_the_per_channel_weight(mode):
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), randn(128, 64, seed=1)
    with torch.no_grad():
        ref = linear(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # the book's outputs must stay warning-free
        module = Q.int8_linear(linear, mode, example_input=x if mode == "static" else None)
        out = module(x)
        qlinear = module if mode == "dynamic" else module.qlinear
        assert Q.int8_bytes(module) == 64 * 32 + 4 * 32 + 4 * 32
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.02
    weight_qp = Q.choose_qparams(linear.weight, 8, symmetric=True, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = qlinear.weight()
    assert torch.equal(weight.int_repr().int(), Q.quantize(linear.weight.detach(), weight_qp))
    assert torch.equal(weight.q_per_channel_scales().float(), weight_qp.scale)
    if mode == "dynamic" and Q.int8_engine() in ("x86", "fbgemm"):
        # fbgemm's dynamic Linear quantizes inputs per tensor to 7 bits (reduce_range): our simulation.
        x_hat = Q.fake_quantize(x, Q.choose_qparams(x, bits=7))
        sim = nn.functional.linear(x_hat, Q.fake_quantize(linear.weight.detach(), weight_qp), linear.bias.detach())
        assert float((out - sim).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("bits", [7, 8])
def test_static_int8_accepts_symmetric_input_qparams(bits):
    """Symmetric input qparams are shifted onto quint8 (zero point 2^(bits-1)); 8-bit ones only without
    reduce_range, which the CPUs without VNNI need (their 16-bit accumulation saturates)."""
    torch.manual_seed(0)
    linear, x = nn.Linear(16, 8), randn(64, 16, seed=2)
    if bits == 8 and Q.int8_engine() in ("x86", "fbgemm") and "avx512_vnni" not in cpu_instruction_sets():
        pytest.skip("8-bit inputs saturate the x86 engine's int16 accumulation on a CPU without VNNI")
    module = Q.int8_linear(linear, "static", input_qparams=Q.choose_qparams(x, bits, symmetric=True), example_input=x,
                           reduce_range=bits == 7)
    assert module.input_zero_point == 2 ** (bits - 1)
    with torch.no_grad():
        assert float((module(x) - linear(x)).abs().max() / linear(x).abs().max()) < 0.02


def test_static_int8_refuses_8_bit_inputs_under_reduce_range():
    linear, x = nn.Linear(16, 8), randn(64, 16, seed=2)
    with pytest.raises(ValueError, match=r"^input_qparams has 8 bits, but with reduce_range the .* engine takes "
                                         r"7-bit inputs .*; choose them with bits=7, or pass reduce_range=False"):
        Q.int8_linear(linear, "static", input_qparams=Q.choose_qparams(x, 8), example_input=x, reduce_range=True)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bits, error", [(1, ValueError), (17, ValueError), (8.0, TypeError), (True, TypeError)])
def test_bits_must_be_a_whole_number_in_2_to_16(bits, error):
    with pytest.raises(error, match=rf"bits={bits!r} must be a whole number in 2\.\.16, e\.g\. bits=8\."):
        Q.choose_qparams(torch.zeros(3), bits=bits)
    with pytest.raises(error, match="must be a whole number in 2..16"):
        Q.Quantizer(bits=bits)


def test_primitive_errors_name_the_fix():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"axis=2 is out of range for a 2-D tensor; use an axis in -2\.\.1, or axis=None"):
        Q.choose_qparams(x, axis=2)
    with pytest.raises(ValueError, match=r"axis=-3 is out of range"):
        Q.fake_quantize(x, Q.QParams(torch.ones(3), torch.zeros(3, dtype=torch.int32), 8, False, -3))
    with pytest.raises(ValueError, match="method='kl' is not valid; use one of 'minmax', 'percentile', 'mse', 'percentile_search'."):
        Q.choose_qparams(x, method="kl")
    for p in (0, 100.5, -1):
        with pytest.raises(ValueError, match=rf"percentile={p!r} must lie in \(0, 100\], e\.g\. percentile=99\.9\."):
            Q.choose_qparams(x, method="percentile", percentile=p)
    with pytest.raises(ValueError, match=r"grid=0 must be a whole number >= 1, e\.g\. grid=80\."):
        Q.choose_qparams(x, method="mse", grid=0)
    qp = Q.choose_qparams(torch.zeros(4, 5), axis=0)
    with pytest.raises(ValueError, match=r"the qparams hold 4 scale\(s\) but x of shape \(3, 4\) needs 3 along axis 0; "
                                         r"compute them with choose_qparams\(x, axis=0\)\."):
        Q.quantize(x, qp)
    with pytest.raises(ValueError, match="needs 1 per tensor"):
        Q.dequantize(x, Q.QParams(qp.scale, qp.zero_point, 8, False, None))


def test_state_errors_say_to_calibrate_first():
    with pytest.raises(RuntimeError, match=r"no qparams yet; calibrate first with calibrate\(model, run\)"):
        Q.Quantizer()(torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"has observed nothing; run calibrate\(model, run\) first"):
        Q.Quantizer().compute_qparams()
    with pytest.raises(RuntimeError, match=r"LSQQuantizer has no step yet; call quantizer.init_from\(x\) first\."):
        Q.LSQQuantizer()(torch.zeros(2))
    model = small_mlp()
    Q.quantize_model(model, 8, 8)
    with pytest.raises(RuntimeError, match=r"layer '0' has no activation qparams yet; run calibrate\(model, run\) first"):
        model(torch.zeros(1, 4))


def test_model_level_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"quantize_model found no nn.Linear or nn.Conv2d to swap with include=\['nope'\]"):
        Q.quantize_model(small_mlp(), 8, 8, include=["nope"])
    with pytest.raises(TypeError, match=r"exclude='2' must be a collection of names such as \['2'\] or a callable\."):
        Q.quantize_model(small_mlp(), 8, 8, exclude="2")
    with pytest.raises(ValueError, match="timesteps=4 needs act_bits: per-time-step quantizers quantize activations."):
        Q.quantize_model(small_mlp(), 8, None, timesteps=4)
    with pytest.raises(ValueError, match=r"set_timestep_index: the model has no quantized layers; call quantize_model"):
        Q.set_timestep_index(small_mlp(), 0)
    weights_only = small_mlp()
    Q.quantize_model(weights_only, 8, None)
    with pytest.raises(ValueError, match="calibrate: no layer quantizes activations; call quantize_model with act_bits=8"):
        Q.calibrate(weights_only, lambda: None)
    with pytest.raises(ValueError, match=r"set_quantization: names=\['9'\] matches no quantized layer\."):
        Q.set_quantization(weights_only, False, names=["9"])
    model = small_mlp()
    Q.quantize_model(model, 8, 8, include=["0"])
    with pytest.raises(RuntimeError, match=r"calibrate: layer '0' activation quantizer saw no input; make run\(\) call "
                                           r"the model, or leave the layer out with exclude=\['0'\]\."):
        Q.calibrate(model, lambda: None)


def test_int8_errors_name_the_fix():
    linear = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="mode='int4' is not valid; use one of 'dynamic', 'static'."):
        Q.int8_linear(linear, "int4")
    with pytest.raises(ValueError, match=r"mode='static' needs example_input \(B, D_in\)"):
        Q.int8_linear(linear, "static")
    wrapped = Q.QuantLinear.from_float(linear, 8, None)
    with pytest.raises(TypeError, match="int8_linear needs an nn.Linear, not QuantLinear; for a QuantLinear pass layer.float_module."):
        Q.int8_linear(wrapped)
    assert isinstance(Q.int8_linear(wrapped.float_module), nn.Module)
    with pytest.raises(ValueError, match=r"input_qparams must be per tensor \(axis=None\) with bits <= 8\."):
        Q.int8_linear(linear, "static", input_qparams=Q.choose_qparams(torch.randn(3, 4), 16), example_input=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"int8_bytes found no torch int8 Linear; build one with int8_linear\(layer\)\."):
        Q.int8_bytes(linear)


# ---------------------------------------------------------------------------- learned activation step (Chapter 6)
def test_learn_step_keeps_the_output_and_trains_with_the_lsq_gradient():
    q = Q.Quantizer(bits=3)                                         # asymmetric: codes 0..7
    x = torch.linspace(-3.0, 5.0, 161)
    q.compute_qparams_from(x[40:120])                               # range [-1, 3]: both tails clip
    before = q(x)
    step = q.learn_step()
    assert q.learn_step() is step and step.item() == q.qparams.scale.item()
    assert torch.equal(q(x), before)                                # same values until the step moves
    assert any(p is step for p in q.parameters())                   # an optimizer finds it
    q(x).sum().backward()
    s, z = float(q.qparams.scale), float(q.qparams.zero_point)
    v = np.round(x.numpy() / s) + z
    d = np.where(v > 7, 7 - z, np.where(v < 0, 0 - z, np.round(x.numpy() / s) - x.numpy() / s))
    assert step.grad.item() == pytest.approx(d.sum(), rel=1e-4)
    assert (v > 7).any() and (v < 0).any()


def test_learned_step_is_used_and_restarts_with_new_qparams():
    q = Q.Quantizer(bits=4)
    x = randn(200, seed=0)
    q.compute_qparams_from(x)
    step = q.learn_step()
    with torch.no_grad():
        step.mul_(2.0)
    doubled = Q.fake_quantize(x, Q.QParams(q.qparams.scale * 2, q.qparams.zero_point, 4, False, None))
    assert torch.allclose(q(x), doubled)
    with torch.no_grad():
        step.fill_(-1.0)                                            # a step below zero is clamped, not used
    assert torch.isfinite(q(x)).all()
    q.compute_qparams_from(x * 3)
    assert step.item() == q.qparams.scale.item()                    # restarts from the new range


def test_learn_step_needs_qparams():
    with pytest.raises(RuntimeError, match="no qparams to start the step from; calibrate first"):
        Q.Quantizer(bits=4).learn_step()


def test_per_step_quantizers_learn_their_own_steps():
    layer = Q.QuantLinear.from_float(nn.Linear(4, 3), 4, 4, timesteps=2)
    for i, scale in enumerate((1.0, 10.0)):
        layer.input_quantizers[i].compute_qparams_from(torch.tensor([-scale, scale]))
    steps = [q.learn_step() for q in layer.input_quantizer_list()]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with Q.timestep_index(nn.Sequential(layer), 1):
        layer(x).sum().backward()
    assert steps[0].grad is None and steps[1].grad is not None    # only step 1's quantizer ran


def test_reservoir_add_is_algorithm_r_row_by_row():
    """The vectorised reservoir equals Algorithm R run one row at a time with the same random draws."""
    from effnb.quant import _reservoir_add
    rows = torch.arange(500.0).reshape(250, 2)
    for cap, seen, start in ((40, 0, 0), (40, 60, 40), (7, 7, 7)):
        reservoir = torch.full((start, 2), -1.0)
        got = _reservoir_add(reservoir.clone(), seen, rows, cap, torch.Generator().manual_seed(3))
        fill = min(cap - start, len(rows))
        expected = torch.cat([reservoir, rows[:fill]])
        draws = torch.rand(len(rows) - fill, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        for k, row in enumerate(rows[fill:]):
            slot = int(draws[k] * (seen + fill + k + 1))
            if slot < cap:
                expected[slot] = row
        assert torch.equal(got, expected), (cap, seen, start)


def test_quantiles_equal_torch_quantile_bit_for_bit():
    from effnb.quant import _quantiles
    levels = [0.0, 0.001, 0.5, 0.9999, 0.99999, 1.0]
    for seed, n in enumerate((1, 2, 3, 1000, 65_537)):
        x = torch.randn(4, n, generator=torch.Generator().manual_seed(seed)) * 3
        assert torch.equal(_quantiles(x, levels), torch.quantile(x, torch.tensor(levels), dim=1)), n
