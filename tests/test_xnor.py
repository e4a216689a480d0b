"""Tests of effnb.xnor, the deployed binary engine: its compiled packing equals effnb.binary.pack_bits
bit for bit (odd K, strided inputs, NaN, -0.0), its popcount GEMM equals A @ B.T exactly, its packed
layers equal the float binary layers, the torch fallback equals the compiled path, deploy() swaps
every binary layer and nothing else, and every error message. Nothing here measures a speed."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import skip_or_fail
from effnb import binary as B
from effnb import xnor as X

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_binary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def plus_minus_one(*shape, seed=0):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


@pytest.fixture
def compiled():
    if X.engine() != "compiled":
        skip_or_fail(f"the compiled binary engine is not available ({X._library()[1]})")


@pytest.fixture
def fallback(monkeypatch):
    """Every function takes its plain-torch path, as on a machine without g++."""
    monkeypatch.setattr(X, "_compiled", lambda *tensors: None)


# ---------------------------------------------------------------------------- packing
@pytest.mark.parametrize("k", [1, 17, 63, 64, 65, 127, 128, 1000])
def test_compiled_packing_equals_pack_bits_with_nan_and_negative_zero(compiled, k):
    x = randn(9, k, seed=k)
    x[0, 0], x[1, -1], x[2, k // 2] = -0.0, float("nan"), 0.0
    beta = randn(k, seed=k + 1, scale=0.1)
    packed = X.pack_signs(x, beta)
    assert torch.equal(packed, B.pack_bits(x - beta))
    assert torch.equal(X.pack_signs(x), B.pack_bits(x))
    bits = B.unpack_bits(X.pack_signs(x), k)
    assert bits[0, 0] == 1 and bits[2, k // 2] == 1, "sign(-0.0) = sign(0) = +1"
    assert bits[1, -1] == -1, "NaN packs as -1: every comparison with NaN is false"


def test_packing_accepts_strided_and_half_inputs(compiled):
    x = randn(300, 70, seed=3).T                                   # (70, 300), column-major
    assert not x.is_contiguous()
    assert torch.equal(X.pack_signs(x), B.pack_bits(x))
    assert torch.equal(X.pack_signs(x[::2, ::3]), B.pack_bits(x[::2, ::3]))
    half = randn(5, 130, seed=4).half()
    assert torch.equal(X.pack_signs(half), B.pack_bits(half.float()))


def test_packing_splits_large_inputs_across_threads(compiled):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:                                                           # 300 · 1000 >= 2^18: the OpenMP loop runs
        x = randn(300, 1000, seed=5)
        assert torch.equal(X.pack_signs(x), B.pack_bits(x))
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------- the GEMM
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (5, 9, 70), (13, 17, 300), (64, 33, 1024), (3, 8, 4096)])
def test_popcount_gemm_is_exact(compiled, m, n, k):
    a, b = plus_minus_one(m, k, seed=m), plus_minus_one(n, k, seed=n + 100)
    weights = X.interleave(X.pack_signs(b))
    assert weights.shape == (-(-n // 8), -(-k // 64), 8)
    assert torch.equal(X.popcount_gemm(X.pack_signs(a), weights, n, k), (a @ b.T).int())


def test_popcount_gemm_fuses_scale_and_bias_and_lays_out_nchw(compiled):
    a, b = plus_minus_one(12, 100, seed=1), plus_minus_one(10, 100, seed=2)
    scale, bias = randn(10, seed=3).abs(), randn(10, seed=4)
    weights, packed = X.interleave(X.pack_signs(b)), X.pack_signs(a)
    expected = (a @ b.T) * scale + bias                             # (12, 10)
    assert torch.allclose(X.popcount_gemm(packed, weights, 10, 100, scale, bias), expected, atol=1e-5)
    nchw = X.popcount_gemm(packed, weights, 10, 100, scale, bias, rows_per_batch=6)   # 2 images of 6 positions
    assert nchw.shape == (2, 10, 6)
    assert torch.allclose(nchw, expected.view(2, 6, 10).transpose(1, 2), atol=1e-5)


def test_fallback_equals_the_compiled_engine_bit_for_bit(compiled, monkeypatch):
    a, b = plus_minus_one(21, 200, seed=6), plus_minus_one(19, 200, seed=7)
    scale = randn(19, seed=8).abs()
    x = randn(2, 70, 7, 6, seed=9)
    conv = B.BinaryConv2d(70, 9, 3, stride=2, padding=2, dilation=2)
    conv.input_binarizer.beta.data = randn(70, seed=10, scale=0.3)
    layer = X.PackedBinaryConv2d(conv)
    compiled_out = (X.pack_signs(a), X.popcount_gemm(X.pack_signs(a), X.interleave(X.pack_signs(b)), 19, 200, scale),
                    layer.pack_input(x))
    monkeypatch.setattr(X, "_compiled", lambda *tensors: None)
    torch_out = (X.pack_signs(a), X.popcount_gemm(X.pack_signs(a), X.interleave(X.pack_signs(b)), 19, 200, scale),
                 layer.pack_input(x))
    for ours, theirs in zip(compiled_out, torch_out):
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------- packed layers
@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("in_features, bias", [(70, True), (384, False), (1, True)])
def test_packed_linear_equals_the_float_layer(request, path, in_features, bias):
    request.getfixturevalue(path)
    layer = B.BinaryLinear(in_features, 13, bias=bias)
    layer.input_binarizer.beta.data = randn(in_features, seed=1, scale=0.1)
    x = randn(2, 5, in_features, seed=2)
    with torch.no_grad():
        expected = layer(x)
    packed = X.PackedBinaryLinear(layer)
    assert torch.allclose(packed(x), expected, atol=1e-4)
    assert torch.allclose(packed.multiply(packed.pack_input(x)).view(2, 5, 13), expected, atol=1e-4)


CONVS = [dict(c=16, o=16, k=3, stride=1, padding=1, dilation=1), dict(c=16, o=16, k=3, stride=1, padding=4, dilation=4),
         dict(c=3, o=5, k=3, stride=2, padding=1, dilation=1), dict(c=130, o=9, k=5, stride=2, padding=2, dilation=1),
         dict(c=64, o=8, k=1, stride=1, padding=0, dilation=1), dict(c=5, o=4, k=3, stride=1, padding=1, dilation=1,
                                                                     padding_mode="reflect"),
         dict(c=7, o=6, k=(3, 1), stride=(1, 2), padding=(1, 0), dilation=1, bias=False)]


@pytest.mark.parametrize("path", ["compiled", "fallback"])
@pytest.mark.parametrize("settings", CONVS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_packed_conv_equals_the_float_layer(request, path, settings):
    request.getfixturevalue(path)
    s = dict(settings)
    conv = B.BinaryConv2d(s.pop("c"), s.pop("o"), s.pop("k"), **s)
    conv.input_binarizer.beta.data = randn(conv.in_channels, seed=1, scale=0.3)
    x = randn(2, conv.in_channels, 11, 9, seed=2)
    with torch.no_grad():
        expected = conv(x)
    packed = X.PackedBinaryConv2d(conv)
    out = packed(x)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-4)
    assert torch.allclose(packed(x[:1]), expected[:1], atol=1e-4)           # a second input shape


def test_deploy_swaps_every_binary_layer_and_nothing_else(compiled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                          B.BinaryConv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          B.BinaryConv2d(16, 16, 1, binarize_input=False), nn.Flatten(),
                          B.BinaryLinear(16 * 8 * 8, 10)).eval()
    deployed = X.deploy(model)
    kinds = [type(m).__name__ for m in deployed]
    assert kinds == ["Conv2d", "BatchNorm2d", "PackedBinaryConv2d", "BatchNorm2d", "BinaryConv2d", "Flatten",
                     "PackedBinaryLinear"]
    assert type(model[2]) is B.BinaryConv2d, "the model itself is not changed"
    x = randn(3, 3, 8, 8, seed=1)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-3)
    assert X.weight_bytes(deployed) < X.weight_bytes(model) / 3
    packed = deployed[2]
    assert packed.weight_bits.dtype == torch.int64 and packed.weight_bits.shape == (2, 3, 8)   # 144 bits: 3 words


def test_weight_bytes_counts_parameters_and_buffers_once():
    layer = nn.Linear(10, 4)
    model = nn.Sequential(layer, nn.BatchNorm1d(4), layer)
    assert X.weight_bytes(model) == (44 + 4 * 4) * 4 + 8                # BN: weight, bias, mean, var; the count


# ---------------------------------------------------------------------------- error messages
def test_error_messages():
    with pytest.raises(ValueError, match=re.escape("pack_signs needs a 2-D (M, K) tensor, got (2, 3, 4); reshape it "
                                                   "first, e.g. x.reshape(-1, x.shape[-1]).")):
        X.pack_signs(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=re.escape("x must be a float tensor, got a torch.int64 tensor.")):
        X.pack_signs(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape("beta has 2 values, but the input has 3 channels; pass one "
                                                   "threshold per channel.")):
        X.pack_signs(torch.zeros(2, 3), torch.zeros(2))
    packed = X.pack_signs(torch.zeros(4, 100))
    with pytest.raises(ValueError, match=re.escape("weights of shape (1, 1, 8) do not hold 5 interleaved rows of 2 "
                                                   "words; build them with interleave(pack_signs(w)).")):
        X.popcount_gemm(packed, X.interleave(X.pack_signs(torch.zeros(5, 64))), 5, 100)
    weights = X.interleave(X.pack_signs(torch.zeros(5, 100)))
    with pytest.raises(ValueError, match=re.escape("rows_per_batch=3 does not divide the 4 rows; pass the number of "
                                                   "output positions per image (H' * W'), or 0 for a row-major (M, n) "
                                                   "result.")):
        X.popcount_gemm(packed, weights, 5, 100, torch.ones(5), rows_per_batch=3)


def test_layer_and_deploy_error_messages():
    with pytest.raises(ValueError, match="PackedBinaryLinear needs a layer built with binarize_input=True"):
        X.PackedBinaryLinear(B.BinaryLinear(4, 3, binarize_input=False))
    with pytest.raises(TypeError, match=re.escape("PackedBinaryConv2d takes a BinaryConv2d, got Conv2d.")):
        X.PackedBinaryConv2d(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=re.escape("PackedBinaryConv2d supports groups=1 only, got groups=2; keep this "
                                                   "layer as a BinaryConv2d, or build it with groups=1.")):
        X.PackedBinaryConv2d(B.BinaryConv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=re.escape("x of shape (1, 5, 8, 8) must be (B, 4, H, W).")):
        X.PackedBinaryConv2d(B.BinaryConv2d(4, 4, 3))(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match=re.escape("x of shape (2, 5) must end in in_features=4.")):
        X.PackedBinaryLinear(B.BinaryLinear(4, 3))(torch.zeros(2, 5))
    with pytest.raises(TypeError, match=re.escape("deploy takes an nn.Module, got Tensor.")):
        X.deploy(torch.zeros(3))
    with pytest.raises(ValueError, match=re.escape("deploy found no BinaryLinear or BinaryConv2d with "
                                                   "binarize_input=True in the model; build it with effnb.binary's "
                                                   "layers first.")):
        X.deploy(nn.Sequential(nn.Linear(3, 3)))


def test_a_missing_compiler_falls_back_and_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_CACHE", str(tmp_path))
    monkeypatch.setattr(X.shutil, "which", lambda name: None)
    X._library.cache_clear()
    try:
        assert X.engine() == "torch"
        assert X._library()[1] == ("g++ was not found, so the compiled binary engine cannot be built; install g++ "
                                   "(e.g. apt-get install g++) to run binary layers fast (results are the same without).")
        x = randn(3, 70, seed=1)
        assert torch.equal(X.pack_signs(x), B.pack_bits(x))
    finally:
        X._library.cache_clear()
    assert not list(tmp_path.rglob("*.so"))


# ---------------------------------------------------------------------------- the benchmark script
def test_bench_script_writes_the_ratios_and_the_machine(tmp_path, capsys):
    a, b = bench_binary.operands(4, 3, 100)
    assert a.shape == (4, 100) and b.shape == (3, 100) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert bench_binary.agree(a, b)
    out = tmp_path / "bench.json"
    assert bench_binary.main(["--k", "64", "130", "--m", "4", "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"cpu", "instruction_sets", "popcount", "engine", "threads"} <= set(record)
    assert [row["k"] for row in record["rows"]] == [64, 130]
    for row in record["rows"]:
        assert {"fp32_ms", "binary_ms", "pack_a_ms", "whole_ms", "popcount_ratio", "whole_path_ratio"} <= set(row)
        assert row["equal"] and row["popcount_ratio"] == pytest.approx(row["fp32_ms"] / row["binary_ms"])
        assert row["whole_path_ratio"] == pytest.approx(row["fp32_ms"] / row["whole_ms"])
    assert f"CPU: {record['cpu']}" in capsys.readouterr().out


@pytest.mark.parametrize("march", ["skylake-avx512", "x86-64-v3", "x86-64"], ids=["avx512-without-vpopcntdq", "avx2", "portable"])
def test_the_avx2_and_portable_builds_give_the_same_bits(compiled, monkeypatch, tmp_path, march):
    """The AVX-512 path runs here; the kernels the other CPUs take are built for them and checked too."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the -march targets are x86's")
    if march == "skylake-avx512" and "avx512f" not in (B._cpu_flags() or ()):
        pytest.skip("this CPU cannot run AVX-512 code")
    flags = tuple(f"-march={march}" if f == "-march=native" else f for f in X.FLAGS)
    lib = X.ctypes.CDLL(str(X.build_library(tmp_path, flags)))
    for name, args in X._SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    x, b = randn(7, 200, seed=1), plus_minus_one(11, 200, seed=2)
    x[0, 0], x[1, 1] = -0.0, float("nan")
    conv = B.BinaryConv2d(70, 9, 3, padding=1)
    conv.input_binarizer.beta.data = randn(70, seed=3, scale=0.3)
    image = randn(2, 70, 6, 5, seed=4)
    run = lambda: (X.pack_signs(x), X.popcount_gemm(X.pack_signs(x), X.interleave(X.pack_signs(b)), 11, 200),
                   X.PackedBinaryConv2d(conv)(image))
    native = run()
    monkeypatch.setattr(X, "_library", lambda: (lib, ""))
    for ours, theirs in zip(run(), native):
        assert torch.equal(ours, theirs)


def test_packed_conv_takes_strided_inputs_and_reads_nan_as_minus_one(compiled):
    conv = B.BinaryConv2d(20, 8, 3, padding=1)
    conv.input_binarizer.beta.data = randn(20, seed=1, scale=0.3)
    packed = X.PackedBinaryConv2d(conv)
    x = randn(2, 20, 7, 6, seed=2)
    with torch.no_grad():
        expected = conv(x)
    assert torch.allclose(packed(x.to(memory_format=torch.channels_last)), expected, atol=1e-4)
    assert torch.allclose(packed(x.transpose(2, 3).contiguous().transpose(2, 3)), expected, atol=1e-4)
    holed = x.clone()
    holed[0, 3, 2, 2] = float("nan")
    as_minus_one = x.clone()
    as_minus_one[0, 3, 2, 2] = conv.input_binarizer.beta[3] - 1              # any value below beta: sign -1
    with torch.no_grad():
        assert torch.isnan(conv(holed)).any(), "the float forward's straight-through term propagates NaN"
        assert torch.allclose(packed(holed), conv(as_minus_one), atol=1e-4), "the packed path reads NaN as -1"


def test_validation_of_the_gemm_and_the_layers():
    packed, weights = X.pack_signs(torch.zeros(4, 100)), X.interleave(X.pack_signs(torch.zeros(9, 100)))
    with pytest.raises(TypeError, match=re.escape("a_packed must be a 2-D int64 tensor from pack_signs, got "
                                                  "torch.int32 of shape (4, 2).")):
        X.popcount_gemm(packed.int(), weights, 9, 100)
    with pytest.raises(ValueError, match=re.escape("a_packed has 2 words per row, but k=200 needs ceil(k/64) = 4; pass "
                                                   "the K it was packed from.")):
        X.popcount_gemm(packed, weights, 9, 200)
    with pytest.raises(ValueError, match=re.escape("scale has 3 values for n=9 outputs; pass one per output.")):
        X.popcount_gemm(packed, weights, 9, 100, torch.ones(3))
    with pytest.raises(ValueError, match=re.escape("bias needs a scale: pass scale=torch.ones(n) for a bias alone.")):
        X.popcount_gemm(packed, weights, 9, 100, bias=torch.ones(9))
    scale = torch.arange(18.0, dtype=torch.float64)[::2]                    # float64 and strided: converted
    assert torch.equal(X.popcount_gemm(packed, weights, 9, 100, scale), 100.0 * scale.float().expand(4, 9))
    conv = X.PackedBinaryConv2d(B.BinaryConv2d(4, 4, 3))
    with pytest.raises(ValueError, match=re.escape("x of shape (4, 8, 8) must be (B, 4, H, W).")):
        conv(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=re.escape("x of shape (1, 4, 2, 5) is smaller than the kernel (3, 3) with its "
                                                   "padding and dilation; pass an input of at least that size.")):
        conv(torch.zeros(1, 4, 2, 5))
    with pytest.raises(ValueError, match=re.escape("batch=3 does not divide the 8 patches; pass the batch size of the "
                                                   "input that pack_input packed.")):
        conv.multiply(conv.pack_input(torch.zeros(2, 4, 4, 4)), 3)
    with pytest.raises(ValueError, match=re.escape("deploy cannot pack the grouped binary convolutions ['1']; build them "
                                                   "with groups=1, or pack the other layers by hand with "
                                                   "PackedBinaryConv2d / PackedBinaryLinear.")):
        X.deploy(nn.Sequential(B.BinaryConv2d(4, 4, 3), B.BinaryConv2d(4, 4, 3, groups=2)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_packed_layer_keeps_its_float32_buffers_whatever_its_dtype(compiled, dtype):
    layer = B.BinaryLinear(70, 9)
    layer.input_binarizer.beta.data = randn(70, seed=1, scale=0.1)
    x = randn(3, 70, seed=2)
    with torch.no_grad():
        expected = layer(x)
    packed = X.PackedBinaryLinear(layer).to(dtype)
    assert packed.alpha.dtype == packed.beta.dtype == packed.bias.dtype == torch.float32
    assert torch.allclose(packed(x), expected, atol=1e-4)


def test_deploy_replaces_a_shared_layer_at_every_use(compiled):
    shared = B.BinaryLinear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    deployed = X.deploy(model)
    assert type(deployed[0]) is type(deployed[2]) is X.PackedBinaryLinear and deployed[0] is deployed[2]
    x = randn(2, 8, seed=1)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_forward_equals_the_fallback_bit_for_bit(compiled, monkeypatch, threads):
    """Both layers' whole forward, on inputs large enough that every OpenMP loop runs on 2 threads."""
    conv = B.BinaryConv2d(70, 24, 3, padding=1)
    conv.input_binarizer.beta.data = randn(70, seed=1, scale=0.3)
    linear = B.BinaryLinear(300, 40)
    linear.input_binarizer.beta.data = randn(300, seed=2, scale=0.1)
    image, tokens = randn(3, 70, 33, 31, seed=3), randn(900, 300, seed=4)
    layers = [(X.PackedBinaryConv2d(conv), image), (X.PackedBinaryLinear(linear), tokens)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled_out = [layer(x) for layer, x in layers]
        patches = layers[0][0].pack_input(image)
        monkeypatch.setattr(X, "_compiled", lambda *tensors: None)
        fallback_out = [layer(x) for layer, x in layers]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(patches, layers[0][0].pack_input(image))
    for ours, theirs in zip(compiled_out, fallback_out):
        assert torch.equal(ours, theirs)
