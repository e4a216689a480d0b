"""Tests of effnb.binary: the estimators' gradients against NumPy formulas, the ReActNet modules,
the binary layers, bit packing, the XNOR-popcount matmul (both backends, exact against A @ B.T),
the compiled kernel's cache, the packed inference path, byte and operation counts, and every
error message. Nothing here measures a speed."""
from __future__ import annotations

import re
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import skip_or_fail
from effnb import binary as B


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: one thread (conftest.py)


@pytest.fixture
def fresh_kernel():
    """Forget the loaded kernel before and after a test that changes how it is found."""
    B._kernel.cache_clear()
    yield
    B._kernel.cache_clear()


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def plus_minus_one(*shape, seed=0):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


def needs_compiled():
    if B.binary_backend() != "compiled":
        skip_or_fail(f"the compiled XNOR-popcount kernel is not available ({B._kernel()[1]})")


# ---------------------------------------------------------------------------- binarizers
@pytest.mark.parametrize("binarize", [B.sign_ste, B.approx_sign])
def test_forward_is_sign_with_sign_of_zero_plus_one(binarize):
    x = torch.tensor([-2.0, -1.0, -1e-30, 0.0, -0.0, 1e-30, 0.5, 3.0])
    assert binarize(x).tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    assert binarize(randn(100, seed=1)).abs().eq(1).all()


def upstream(n):
    return torch.linspace(0.5, 2.0, n)                                 # a non-uniform incoming gradient


def test_sign_ste_gradient_is_the_clipped_identity_mask():
    x = torch.linspace(-2.0, 2.0, 401, requires_grad=True)             # holds -1, 0 and 1 exactly
    (B.sign_ste(x) * upstream(401)).sum().backward()
    xs = x.detach().numpy()
    mask = (np.abs(xs) <= 1).astype(np.float32)
    np.testing.assert_array_equal(x.grad.numpy(), mask * upstream(401).numpy())
    assert mask[[100, 200, 300]].tolist() == [1.0, 1.0, 1.0]           # |x| = 1 and x = 0 pass the gradient


def test_approx_sign_gradient_is_bi_real_polynomial():
    x = torch.linspace(-2.0, 2.0, 401, requires_grad=True)
    (B.approx_sign(x) * upstream(401)).sum().backward()
    xs = x.detach().numpy().astype(np.float64)
    ref = np.where(np.abs(xs) < 1, 2 - 2 * np.abs(xs), 0.0) * upstream(401).numpy()
    np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert x.grad[200].item() == pytest.approx(2 * upstream(401)[200].item())   # peak 2 at x = 0
    assert x.grad[[100, 300]].tolist() == [0.0, 0.0]                   # 0 at |x| = 1


@pytest.mark.parametrize("estimator", B.ESTIMATORS)
def test_rsign_thresholds_per_channel_and_beta_gets_the_gradient(estimator):
    rsign = B.RSign(3, estimator)
    with torch.no_grad():
        rsign.beta.copy_(torch.tensor([-0.5, 0.0, 0.7]))
    x = randn(4, 3, 5, 5, seed=2).requires_grad_(True)
    g = randn(4, 3, 5, 5, seed=3)
    y = rsign(x)
    (y * g).sum().backward()
    u = (x - rsign.beta.view(1, 3, 1, 1)).detach().numpy()
    assert np.array_equal(y.detach().numpy(), np.where(u >= 0, 1.0, -1.0))
    dq = (np.abs(u) <= 1) * 1.0 if estimator == "ste" else np.where(np.abs(u) < 1, 2 - 2 * np.abs(u), 0.0)
    np.testing.assert_allclose(x.grad.numpy(), dq * g.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rsign.beta.grad.numpy(), -(dq * g.numpy()).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert rsign.bits == 1


def test_rsign_on_channels_last_tokens():
    rsign = B.RSign(6, dim=-1)
    with torch.no_grad():
        rsign.beta.copy_(torch.linspace(-1, 1, 6))
    x = randn(2, 7, 6, seed=4)
    assert torch.equal(rsign(x), torch.where(x - rsign.beta >= 0, 1.0, -1.0))


@pytest.mark.parametrize("dim", [1, -1])
def test_rprelu_matches_its_formula(dim):
    act = B.RPReLU(4, dim=dim)
    assert act.slope.tolist() == [0.25] * 4 and act.gamma.abs().sum() == 0 and act.zeta.abs().sum() == 0
    with torch.no_grad():
        for p, seed in ((act.gamma, 5), (act.slope, 6), (act.zeta, 7)):
            p.copy_(randn(4, seed=seed))
    x = randn(3, 4, 5, 4, seed=8)
    shape = [1, 1, 1, 1]
    shape[dim] = 4
    gamma, slope, zeta = (p.detach().numpy().reshape(shape) for p in (act.gamma, act.slope, act.zeta))
    u = x.numpy() - gamma
    ref = np.where(u > 0, u, slope * u) + zeta
    np.testing.assert_allclose(act(x).detach().numpy(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- binary layers
def test_binarize_weight_scale_and_gradient():
    w = randn(5, 3, 2, 2, seed=9, scale=0.8).requires_grad_(True)
    alpha = w.detach().abs().mean(dim=(1, 2, 3))
    assert torch.equal(B.weight_scale(w), alpha)
    wb = B.binarize_weight(w)
    assert torch.equal(wb, alpha.view(5, 1, 1, 1) * torch.where(w >= 0, 1.0, -1.0))
    g = randn(5, 3, 2, 2, seed=10)
    (wb * g).sum().backward()
    ws = w.detach().numpy()
    ref = alpha.numpy().reshape(5, 1, 1, 1) * (np.abs(ws) <= 1) * g.numpy()   # α is a constant
    np.testing.assert_allclose(w.grad.numpy(), ref, rtol=1e-6, atol=0)


def test_binary_linear_forward_and_from_float():
    dense = nn.Linear(12, 5)
    layer = B.BinaryLinear.from_float(dense)
    assert layer.bits == 1 and torch.equal(layer.weight, dense.weight) and torch.equal(layer.bias, dense.bias)
    assert layer.weight is not dense.weight
    with torch.no_grad():
        layer.input_binarizer.beta.copy_(randn(12, seed=11, scale=0.3))
    x = randn(2, 3, 12, seed=12)
    xb = torch.where(x - layer.input_binarizer.beta >= 0, 1.0, -1.0)
    ref = F.linear(xb, B.weight_scale(dense.weight)[:, None] * torch.where(dense.weight >= 0, 1.0, -1.0), dense.bias)
    torch.testing.assert_close(layer(x), ref)
    plain = B.BinaryLinear(12, 5, bias=False, binarize_input=False, estimator="approx")
    assert plain.input_binarizer is None and plain(x).shape == (2, 3, 5)


def test_binary_conv_pads_the_real_input_then_binarizes():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = B.BinaryConv2d.from_float(conv)
    assert layer.bits == 1 and layer.padding == (1, 1) and torch.equal(layer.weight, conv.weight)
    with torch.no_grad():
        layer.input_binarizer.beta.copy_(torch.tensor([0.3, -0.2, 0.0]))
    x = randn(2, 3, 6, 6, seed=13)
    padded = F.pad(x, (1, 1, 1, 1))                                    # zeros, then sign(0 - β_c) = ∓1
    xb = torch.where(padded - layer.input_binarizer.beta.view(1, 3, 1, 1) >= 0, 1.0, -1.0)
    assert xb[0, 0, 0, 0] == -1 and xb[0, 1, 0, 0] == 1 and xb[0, 2, 0, 0] == 1
    ref = F.conv2d(xb, B.binarize_weight(conv.weight), conv.bias)
    torch.testing.assert_close(layer(x), ref)
    float_input = B.BinaryConv2d(3, 4, 3, padding=1, binarize_input=False)
    assert float_input(x).shape == (2, 4, 6, 6)


# ---------------------------------------------------------------------------- packing
def test_pack_bits_worked_example_and_sign_bit():
    assert B.pack_bits(torch.tensor([[1.0, -1.0, 0.0]])).tolist() == [[5]]
    top = torch.full((1, 64), -1.0)
    top[0, 63] = 1.0                                                   # only the sign bit of the word
    assert B.pack_bits(top).tolist() == [[-(1 << 63)]]
    assert B.pack_bits(torch.ones(2, 64)).tolist() == [[-1], [-1]]


@pytest.mark.parametrize("k", [1, 63, 64, 65, 1000, 4096])
def test_pack_unpack_round_trip(k):
    x = randn(5, k, seed=k)
    packed = B.pack_bits(x)
    assert packed.dtype == torch.int64 and packed.shape == (5, -(-k // 64))
    assert torch.equal(B.unpack_bits(packed, k), torch.where(x >= 0, 1.0, -1.0))
    if k % 64:
        assert bool(((packed[:, -1] >> (k % 64)) == 0).all())          # padding bits are 0


# ---------------------------------------------------------------------------- the XNOR-popcount matmul
SHAPES = [(3, 5), (37, 4), (8, 37), (17, 23)]


@pytest.mark.parametrize("k", [1, 63, 64, 65, 1000, 4096])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_binary_matmul_equals_float_matmul(k, backend):
    if backend == "compiled":
        needs_compiled()
    for i, (m, n) in enumerate(SHAPES):
        a, b = plus_minus_one(m, k, seed=i), plus_minus_one(n, k, seed=100 + i)
        out = B.binary_matmul(B.pack_bits(a), B.pack_bits(b), k, backend=backend)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out, (a @ b.T).to(torch.int32))


def test_compiled_equals_torch_and_auto_takes_compiled():
    needs_compiled()
    a, b = B.pack_bits(randn(29, 777, seed=1)), B.pack_bits(randn(31, 777, seed=2))
    compiled = B.binary_matmul(a, b, 777, backend="compiled")
    assert torch.equal(compiled, B.binary_matmul(a, b, 777, backend="torch"))
    assert torch.equal(compiled, B.binary_matmul(a, b, 777))
    assert torch.equal(B.binary_matmul(a, b.T.contiguous().T, 777), compiled)    # a strided view is copied


def test_compiled_kernel_splits_a_large_product_across_threads():
    needs_compiled()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:                                               # 70 · 64 · 16 words >= 65,536: the OpenMP loop runs
        a, b = plus_minus_one(70, 1000, seed=5), plus_minus_one(64, 1000, seed=6)
        out = B.binary_matmul(B.pack_bits(a), B.pack_bits(b), 1000, backend="compiled")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, (a @ b.T).int())


def test_torch_backend_chunks_rows_without_changing_the_result():
    a, b = plus_minus_one(100, 4096, seed=3), plus_minus_one(700, 4096, seed=4)
    # N·W = 700·64 words per row of A, so a chunk holds 2^21 // 44,800 = 46 rows: three chunks here.
    out = B.binary_matmul(B.pack_bits(a), B.pack_bits(b), 4096, backend="torch")
    assert torch.equal(out, (a @ b.T).int())


def test_popcount_support_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse popcnt avx2\n")
    assert B.popcount_support(str(info)) == {"popcnt": True, "avx512_vpopcntdq": False}
    assert B.popcount_support(str(tmp_path / "missing")) == {}
    assert set(B.popcount_support()) <= {"popcnt", "avx512_vpopcntdq"}


# ---------------------------------------------------------------------------- the compiled kernel's cache
def test_cache_key_changes_with_flags_and_cpu():
    key = B.cache_key()
    assert re.fullmatch(r"[0-9a-f]{16}", key) and key == B.cache_key(B.COMPILE_FLAGS)
    assert B.cache_key(("-O2", *B.COMPILE_FLAGS[1:])) != key
    assert B.cache_key(cpu_flags="fpu sse") != B.cache_key(cpu_flags="fpu sse avx512f")


def test_cache_dir_follows_effnb_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_CACHE", str(tmp_path))
    assert B.cache_dir() == tmp_path / "binary"
    monkeypatch.delenv("EFFNB_CACHE")
    assert B.cache_dir() == Path.home() / ".cache" / "effnb" / "binary"


def test_one_build_for_two_concurrent_callers_and_none_after(monkeypatch, tmp_path):
    if B.shutil.which("g++") is None:
        skip_or_fail("g++ is not installed")
    builds = []
    compile_once = B._compile

    def counted(flags, target):
        builds.append(target)
        time.sleep(0.2)                                                # let the second caller reach the lock
        compile_once(flags, target)

    monkeypatch.setattr(B, "_compile", counted)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(B.build_library(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(paths) == 2 and paths[0] == paths[1]
    path = paths[0]
    assert path.name == f"xnor_popcount-{B.cache_key()}.so" and path.exists()
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached kernel"))
    assert B.build_library(tmp_path) == path and path.stat().st_mtime_ns == stamp and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.lock"]   # no temp file left


def test_a_failed_build_says_so_and_leaves_nothing(tmp_path):
    if B.shutil.which("g++") is None:
        skip_or_fail("g++ is not installed")
    with pytest.raises(RuntimeError, match=r"^g\+\+ could not build the XNOR-popcount kernel \(.*\); install a "
                                           r"working g\+\+ with OpenMP or pass backend='torch'\.$"):
        B.build_library(tmp_path, flags=(*B.COMPILE_FLAGS, "-fno-such-flag-effnb"))
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_without_gxx_auto_falls_back_quietly_and_compiled_names_the_fix(monkeypatch, tmp_path, fresh_kernel):
    monkeypatch.setenv("EFFNB_CACHE", str(tmp_path))                 # an empty cache: nothing to load
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    a, b = plus_minus_one(4, 70, seed=1), plus_minus_one(3, 70, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.binary_backend() == "torch"
        assert torch.equal(B.binary_matmul(B.pack_bits(a), B.pack_bits(b), 70), (a @ b.T).int())
    message = ("g++ was not found, so the compiled XNOR-popcount kernel cannot be built; install g++ "
               "(e.g. apt-get install g++) or pass backend='torch'.")
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        B.binary_matmul(B.pack_bits(a), B.pack_bits(b), 70, backend="compiled")


# ---------------------------------------------------------------------------- the packed inference path
@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("in_features", [1, 70, 128])
def test_binary_linear_packed_equals_the_float_forward(backend, in_features):
    if backend == "compiled":
        needs_compiled()
    layer = B.BinaryLinear.from_float(nn.Linear(in_features, 9))
    with torch.no_grad():
        layer.input_binarizer.beta.copy_(randn(in_features, seed=1, scale=0.3))
    x = randn(2, 3, in_features, seed=2)
    ref = layer(x).detach()
    out = B.binary_linear_packed(x, layer, backend)
    assert out.shape == (2, 3, 9)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1, bias=False),
         dict(kernel_size=(2, 3), padding=(1, 2), dilation=(2, 1)), dict(kernel_size=3, padding="same"),
         dict(kernel_size=3, padding=1, padding_mode="reflect"), dict(kernel_size=1)]


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("settings", CONVS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_binary_conv2d_packed_equals_the_float_forward(backend, settings):
    if backend == "compiled":
        needs_compiled()
    torch.manual_seed(0)
    conv = B.BinaryConv2d(5, 6, **settings)
    with torch.no_grad():
        conv.input_binarizer.beta.copy_(randn(5, seed=3, scale=0.3))
    x = randn(2, 5, 9, 8, seed=4)
    ref = conv(x).detach()
    out = B.binary_conv2d_packed(x, conv, backend)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))


def test_packed_bytes_of_a_tensor_a_layer_and_a_model():
    assert B.packed_bytes(torch.zeros(10, 65)) == 10 * 2 * 8 + 10 * 4      # 65 bits → two words a row
    assert B.packed_bytes(torch.zeros(4, 3, 3, 3)) == 4 * 1 * 8 + 4 * 4
    big = B.BinaryLinear(4096, 4096, bias=False)
    ratio = big.weight.numel() * 4 / B.packed_bytes(big)
    assert 31 < ratio <= 32                                             # α and β cost a little
    model = nn.Sequential(nn.Linear(8, 4), B.BinaryLinear(64, 3))
    # float Linear (8·4 + 4)·4 = 144; binary weight 3 rows × 1 word × 8 + 3 α × 4 = 36; bias 12; β 64·4 = 256
    assert B.packed_bytes(model) == 144 + 36 + 12 + 256


def test_binary_ops_counts_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                                  # float stem
        B.BinaryConv2d(8, 16, 3, padding=1),                            # binary
        B.BinaryConv2d(16, 16, 1, binarize_input=False),                # binary weights, float input: float
        nn.Flatten(), B.BinaryLinear(16 * 64, 10), nn.Linear(10, 2))
    count = B.binary_ops(model, torch.randn(2, 3, 8, 8))
    stem, conv, float_in = 2 * 8 * 64 * 27, 2 * 16 * 64 * 72, 2 * 16 * 64 * 16
    fc_binary, fc_float = 2 * 10 * 1024, 2 * 2 * 10
    assert count.binary_macs == conv + fc_binary
    assert count.float_macs == stem + float_in + fc_float
    assert count.ops == stem + float_in + fc_float + (conv + fc_binary) / 64
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------- error messages
def test_error_messages():
    with pytest.raises(ValueError, match=re.escape("estimator='bnn' is not valid; use one of 'ste', 'approx'.")):
        B.RSign(4, "bnn")
    with pytest.raises(ValueError, match=re.escape("channels=0 must be a whole number >= 1, e.g. channels=64.")):
        B.RPReLU(0)
    with pytest.raises(ValueError, match=re.escape("RSign(channels=4) got x of shape (2, 3), which does not hold "
                                                   "4 channels along dim 1.")):
        B.RSign(4)(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=re.escape("BinaryLinear.from_float takes an nn.Linear, got Conv2d.")):
        B.BinaryLinear.from_float(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match=re.escape("BinaryConv2d.from_float takes an nn.Conv2d, got Linear.")):
        B.BinaryConv2d.from_float(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=re.escape("pack_bits needs a 2-D (M, K) tensor, got shape (3,); reshape it "
                                                   "first, e.g. x.reshape(-1, x.shape[-1]).")):
        B.pack_bits(torch.zeros(3))
    with pytest.raises(TypeError, match=re.escape("k=1.5 must be a whole number >= 1, e.g. k=64.")):
        B.unpack_bits(torch.zeros(1, 1, dtype=torch.int64), 1.5)


def test_binary_matmul_error_messages():
    a = B.pack_bits(torch.ones(2, 100))
    with pytest.raises(ValueError, match=re.escape("backend='cuda' is not valid; use one of 'auto', 'compiled', "
                                                   "'torch'.")):
        B.binary_matmul(a, a, 100, backend="cuda")
    with pytest.raises(TypeError, match=re.escape("a_packed must be a 2-D int64 tensor from pack_bits, got "
                                                  "torch.float32 of shape (2, 100).")):
        B.binary_matmul(torch.ones(2, 100), a, 100)
    with pytest.raises(TypeError, match=re.escape("b_packed must be a 2-D int64 tensor from pack_bits, got list.")):
        B.binary_matmul(a, [1, 2], 100)
    with pytest.raises(ValueError, match=re.escape("b_packed must be a 2-D int64 tensor from pack_bits, got "
                                                   "torch.int64 of shape (2,).")):
        B.binary_matmul(a, a[0], 100)
    with pytest.raises(ValueError, match=re.escape("a_packed is on cpu and b_packed on meta; put both on one "
                                                   "device.")):
        B.binary_matmul(a, a.to("meta"), 64 * 2)
    with pytest.raises(ValueError, match=re.escape("a_packed has 2 words per row, but k=200 needs ceil(k/64) = 4.")):
        B.binary_matmul(a, a, 200)
    with pytest.raises(ValueError, match=re.escape("a_packed has bits set past column k=70; pass the K it was packed "
                                                   "from (pack_bits leaves those bits 0).")):
        B.binary_matmul(a, a, 70)


def test_packed_path_and_byte_count_error_messages():
    with pytest.raises(ValueError, match=re.escape("binary_linear_packed needs a layer built with binarize_input=True:"
                                                   " the packed path multiplies ±1 activations.")):
        B.binary_linear_packed(torch.zeros(1, 4), B.BinaryLinear(4, 2, binarize_input=False))
    with pytest.raises(TypeError, match=re.escape("binary_conv2d_packed takes a BinaryConv2d, got Conv2d.")):
        B.binary_conv2d_packed(torch.zeros(1, 4, 3, 3), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=re.escape("x of shape (1, 5) must end in in_features=4.")):
        B.binary_linear_packed(torch.zeros(1, 5), B.BinaryLinear(4, 2))
    with pytest.raises(ValueError, match=re.escape("binary_conv2d_packed supports groups=1 only, got groups=2.")):
        B.binary_conv2d_packed(torch.zeros(1, 4, 3, 3), B.BinaryConv2d(4, 2, 1, groups=2))
    with pytest.raises(ValueError, match=re.escape("x of shape (1, 3, 3) must be (B, 4, H, W).")):
        B.binary_conv2d_packed(torch.zeros(1, 3, 3), B.BinaryConv2d(4, 2, 1))
    with pytest.raises(ValueError, match=re.escape("packed_bytes needs a weight of shape (N, ...) with 2 or more "
                                                   "dims, got shape (5,).")):
        B.packed_bytes(torch.zeros(5))
    with pytest.raises(TypeError, match=re.escape("packed_bytes takes an nn.Module or a weight Tensor, got int.")):
        B.packed_bytes(3)


def test_compiled_backend_refuses_other_devices():
    a = B.pack_bits(torch.ones(2, 10)).to("meta")
    with pytest.raises(ValueError, match=re.escape("backend='compiled' runs on CPU tensors, not meta; "
                                                   "use backend='torch'.")):
        B._matmul_compiled(a, a, 10)


def test_packed_conv_operands_compose_to_the_float_conv():
    torch.manual_seed(3)
    conv = B.BinaryConv2d(5, 4, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.input_binarizer.beta.normal_()
    x = torch.randn(2, 5, 7, 7)
    rows, weight = B.pack_conv2d_input(x, conv), B.pack_conv2d_weight(conv)
    assert rows.shape == (2 * 4 * 4, 1) and weight.shape == (4, 1)             # K = 45 fits one word
    dots = B.binary_matmul(rows, weight, 45, backend="torch").float() * B.weight_scale(conv.weight)
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)                   # batch-major, then row-major
    assert torch.allclose(dots, expected, atol=1e-5)
    with pytest.raises(ValueError, match=re.escape("pack_conv2d_input supports groups=1 only, got groups=2.")):
        B.pack_conv2d_input(torch.zeros(1, 4, 3, 3), B.BinaryConv2d(4, 2, 1, groups=2))
    with pytest.raises(TypeError, match=re.escape("pack_conv2d_weight takes a BinaryConv2d, got Conv2d.")):
        B.pack_conv2d_weight(nn.Conv2d(4, 2, 1))


# ---------------------------------------------------------------------------- dynamic binarizers (Chapter 8)
def test_dynamic_sign_uses_each_rows_own_threshold_and_scale():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-10.0, -10.0, -12.0, -8.0]])
    out = B.dynamic_sign(x)
    # row 0: tau 3, s = mean |x - 3| = (2 + 1 + 0 + 3) / 4 = 1.5; row 1: tau -10, s = 1
    assert torch.equal(out, torch.tensor([[-1.5, -1.5, 1.5, 1.5], [1.0, 1.0, -1.0, 1.0]]))
    shifted = B.dynamic_sign(x + 100.0)
    assert torch.equal(shifted, out), "a shift of the input changes nothing: the threshold moves with it"
    assert torch.allclose(B.dynamic_sign(3 * x), 3 * out), "the scale follows the input's magnitude"
    cols = B.dynamic_sign(x.T, dim=0)
    assert torch.equal(cols, out.T)


def test_dynamic_sign_passes_gradients_and_checks_its_estimator():
    x = torch.randn(3, 8, requires_grad=True)
    B.dynamic_sign(x, estimator="approx").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="estimator='exact' is not valid"):
        B.dynamic_sign(x, estimator="exact")


def test_binarize_attention_keeps_the_keys_above_the_row_mean():
    p = torch.softmax(torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), dim=-1)
    out = B.binarize_attention(p)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]))
    rows = torch.softmax(torch.randn(5, 7, 9), dim=-1)
    hard = B.binarize_attention(rows)
    assert torch.allclose(hard.sum(-1), torch.ones(5, 7)), "rows still sum to one"
    assert ((hard == 0) | torch.isclose(hard, hard.amax(-1, keepdim=True))).all(), "one value per row besides 0"
    p = rows.clone().requires_grad_(True)
    (B.binarize_attention(p) * torch.arange(9.0)).sum().backward()
    assert torch.allclose(p.grad, torch.arange(9.0).expand(5, 7, 9)), "straight-through gradient"
