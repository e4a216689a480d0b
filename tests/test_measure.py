import re
import warnings

import pytest
import torch
from torch import nn

from effnb import measure


def test_count_parameters_and_bytes():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert measure.count_parameters(model) == 10 * 20 + 20 + 20 * 5 + 5
    assert measure.model_bytes(model, bits=32) == 325 * 4
    assert measure.model_bytes(model, bits=4) == 325 / 2
    model[0].weight.requires_grad_(False)
    assert measure.count_parameters(model, trainable_only=True) == 325 - 200


def test_shared_parameters_count_once():
    layer = nn.Linear(4, 4)
    assert measure.count_parameters(nn.Sequential(layer, layer)) == 20


@pytest.mark.parametrize("bits", [0, -1, 65])
def test_bad_bit_width(bits):
    with pytest.raises(ValueError, match=r"must lie in \(0, 64\]"):
        measure.model_bytes(nn.Linear(2, 2), bits=bits)


def test_flops_match_hand_count():
    linear = nn.Linear(64, 32)
    assert measure.count_flops(linear, torch.zeros(8, 64)) == 2 * 8 * 64 * 32
    conv = nn.Conv2d(3, 16, 3, padding=1)
    # Each output element: 3·3·3 multiply-adds; 16 channels × 10 × 10 positions × batch 2.
    assert measure.count_flops(conv, torch.zeros(2, 3, 10, 10)) == 2 * 2 * 16 * 10 * 10 * 27


def test_latency_is_median_of_repeats(monkeypatch):
    # A scripted clock: the five timed calls last 5, 1, 3, 100 and 2 s, so the median is 3 s
    # (the mean would be 22.2 s, the minimum 1 s); warm-up calls are not timed.
    durations = [5.0, 1.0, 3.0, 100.0, 2.0]
    ticks = iter([t for i, d in enumerate(durations) for t in (10.0 * i, 10.0 * i + d)])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    calls = []
    assert measure.latency(lambda: calls.append(1), warmup=2, repeats=5) == 3.0
    assert len(calls) == 7
    monkeypatch.undo()
    with pytest.raises(ValueError, match="need warmup >= 0 and repeats >= 1"):
        measure.latency(lambda: None, repeats=0)


def test_latency_rounds_interleave_the_functions(monkeypatch):
    order = []
    monkeypatch.setattr(measure, "latency", lambda fn, warmup, repeats, device: (fn(), float(len(order)))[1])
    times = measure.latency_rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=3)
    assert order == ["a", "b"] * 3 and times == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}
    with pytest.raises(ValueError, match="at least 2 rounds"):
        measure.latency_rounds({"a": lambda: None}, rounds=1)
    with pytest.raises(ValueError, match="at least one function"):
        measure.latency_rounds({})


def test_peak_memory_counts_live_tensors():
    def three_buffers():
        a = torch.ones(1000, 250)  # 1 MB
        b = torch.ones(1000, 250)
        c = a + b
        return c

    assert measure.peak_memory(three_buffers) == 3 * 1_000_000


def test_peak_memory_sees_freed_tensors_go():
    def sequential():
        for _ in range(5):
            t = torch.ones(250_000)  # 1 MB, freed before the next
            del t

    assert measure.peak_memory(sequential) == 1_000_000


def test_machine_roofline_is_positive_and_consistent():
    machine = measure.measure_machine(matmul_size=256, copy_numel=1 << 20)
    assert machine.peak_flops > 1e8 and machine.bandwidth > 1e8
    assert machine.attainable(1e-3) == pytest.approx(1e-3 * machine.bandwidth)
    assert machine.attainable(1e6) == machine.peak_flops
    assert machine.attainable(machine.ridge) == pytest.approx(machine.peak_flops)


def test_matmul_intensity_formula():
    _, intensity = measure.measure_matmul(64, repeats=1)
    assert intensity == pytest.approx(2 * 64**3 / (3 * 64 * 64 * 4))


def test_last_level_cache_is_the_largest_cache_sysfs_lists(monkeypatch, tmp_path):
    files = []
    for i, text in enumerate(["48K", "2048K", "300M", "junk"]):
        (tmp_path / f"index{i}").write_text(text + "\n")
        files.append(str(tmp_path / f"index{i}"))
    monkeypatch.setattr(measure.glob, "glob", lambda pattern: files)
    assert measure.last_level_cache_bytes() == 300 * 2**20
    monkeypatch.setattr(measure.glob, "glob", lambda pattern: [])
    assert measure.last_level_cache_bytes() is None


# ------------------------------------------------------------------ attention: hand counts
# Hand counts (a multiply-add = 2 FLOPs) for batch B, L query and S key tokens, width E, H heads
# of size E/H, as torch's own formulas count them:
#   projection of n tokens by an E×E weight:   2·n·E·E
#   scaled dot-product attention:              2·B·H·L·S·(E/H) for Q·Kᵀ + the same for P·V = 4·B·L·S·E
# A causal mask or an attention mask does not change the count: it is the dense cost, as torch's
# formulas for the GPU kernels count it (a kernel may skip masked blocks; the count does not).
B, L, E, H, FF = 2, 5, 16, 2, 32


def _mha_hand_count(b=B, l=L, s=L, e=E):
    in_proj = 2 * b * l * e * e + 2 * 2 * b * s * e * e  # Q from the L queries, K and V from the S keys
    attention = 4 * b * l * s * e
    out_proj = 2 * b * l * e * e
    return in_proj + attention + out_proj


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_flops_match_hand_count(train_mode, need_weights):
    mha = nn.MultiheadAttention(E, H, batch_first=True).train(train_mode)
    x = torch.randn(B, L, E)
    assert measure.count_flops(mha, x, x, x, need_weights=need_weights) == _mha_hand_count()


def test_cross_attention_with_a_mask_flops_match_hand_count():
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    q, kv = torch.randn(B, L, E), torch.randn(B, 7, E)
    mask = torch.rand(L, 7) > 0.5
    mask[:, 0] = False  # every query keeps one key
    assert measure.count_flops(mha, q, kv, kv, attn_mask=mask, need_weights=False) == _mha_hand_count(s=7)


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
def test_transformer_encoder_layer_flops_match_hand_count(train_mode):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=FF, batch_first=True).train(train_mode)
    feed_forward = 2 * B * L * E * FF + 2 * B * L * FF * E  # Linear(E→FF), then Linear(FF→E)
    assert measure.count_flops(layer, torch.randn(B, L, E)) == _mha_hand_count() + feed_forward


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"attn_mask": torch.ones(L, 7, dtype=torch.bool)}],
                         ids=["plain", "causal", "mask"])
def test_scaled_dot_product_attention_flops_match_hand_count(kwargs):
    q, k, v = torch.randn(B, H, L, 8), torch.randn(B, H, 7, 8), torch.randn(B, H, 7, 8)
    if kwargs.get("is_causal"):
        k, v = k[:, :, :L], v[:, :, :L]
    s = k.shape[2]
    flops = measure.count_flops(nn.functional.scaled_dot_product_attention, q, k, v, **kwargs)
    assert flops == 2 * B * H * L * s * 8 + 2 * B * H * L * s * 8  # Q·Kᵀ, then P·V


def test_counting_leaves_the_fast_path_setting_as_it_was():
    for setting in (True, False):
        torch.backends.mha.set_fastpath_enabled(setting)
        mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
        measure.count_flops(mha, *[torch.randn(B, L, E)] * 3)
        assert torch.backends.mha.get_fastpath_enabled() is setting
    torch.backends.mha.set_fastpath_enabled(True)


def test_an_uncounted_matrix_op_warns_and_element_wise_ones_do_not():
    a, v = torch.randn(8, 4), torch.randn(4)
    with pytest.warns(UserWarning, match=r"count_flops: aten\.mv does matrix work but has no FLOP formula, "
                                         r"so it counts 0; pass custom_mapping=\{torch\.ops\.aten\.mv: formula\}"):
        assert measure.count_flops(torch.mv, a, v) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure.count_flops(lambda x: torch.relu(x).sum() + x @ x.T, a)  # counted or element-wise: silent


def test_a_custom_formula_counts_an_op_without_one():
    def mv_flops(a_shape, v_shape, *args, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1]

    flops = measure.count_flops(torch.mv, torch.randn(8, 4), torch.randn(4),
                                custom_mapping={torch.ops.aten.mv: mv_flops})
    assert flops == 2 * 8 * 4


@pytest.mark.parametrize("n, error", [(0, ValueError), (-4, ValueError), (2.5, TypeError)])
def test_matmul_size_must_be_a_whole_number(n, error):
    with pytest.raises(error, match=rf"n={n!r} must be a whole number >= 1, e\.g\. n=1024\."):
        measure.measure_matmul(n)


@pytest.mark.parametrize("numel", [0, -1])
def test_bandwidth_size_must_be_a_whole_number(numel):
    with pytest.raises(ValueError, match=rf"numel={numel!r} must be a whole number >= 1"):
        measure.measure_bandwidth(numel)


def test_cpu_instruction_sets_reads_the_flags_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu sse4_2 fma avx2 avx avx512_vnni_x amx_int8\n"
                    "processor\t: 1\nflags\t\t: avx512f\n")
    # Known sets in the module's fixed order; a look-alike (avx512_vnni_x) and the second core's line are ignored.
    assert measure.cpu_instruction_sets(str(fake)) == ["sse4_2", "avx", "avx2", "fma", "amx_int8", "torch:AVX2"]
    arm = tmp_path / "cpuinfo_arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm\n")
    assert measure.cpu_instruction_sets(str(arm)) == ["asimd", "asimddp", "sve", "i8mm", "torch:AVX2"]
    assert measure.cpu_instruction_sets(str(tmp_path / "missing")) == []


# ----------------------------------------------------------------------------- torch's quantized engines
def test_quantized_engines_are_torch_s_list_without_none():
    engines = measure.quantized_engines()
    assert engines == [e for e in torch.backends.quantized.supported_engines if e != "none"]
    assert "none" not in engines and set(engines) <= set(measure.QUANTIZED_ENGINES)


def test_quantized_engine_switches_and_restores_even_after_an_error():
    before = torch.backends.quantized.engine
    for engine in measure.quantized_engines():
        with measure.quantized_engine(engine) as name:
            assert name == engine and torch.backends.quantized.engine == engine
        assert torch.backends.quantized.engine == before
    with pytest.raises(RuntimeError, match="inside"):
        with measure.quantized_engine(measure.quantized_engines()[0]):
            raise RuntimeError("inside")
    assert torch.backends.quantized.engine == before


def test_quantized_engine_names_the_engines_on_offer():
    offered = ", ".join(map(repr, measure.quantized_engines()))
    with pytest.raises(ValueError, match=rf"^engine='tpu' is not valid; use one of {re.escape(offered)}\.$"):
        with measure.quantized_engine("tpu"):
            pass


@pytest.mark.parametrize("engine, sets, needed", [
    ("x86", ["sse4_2", "avx", "avx2", "fma"], True),                       # AVX2 only: vpmaddubsw saturates
    ("fbgemm", ["avx2", "avx512f", "avx512bw", "avx512vl"], True),        # AVX-512 without VNNI: still vpmaddubsw
    ("x86", ["avx2", "avx512f", "avx512_vnni"], False),
    ("fbgemm", ["avx2", "avx_vnni"], True),                               # FBGEMM has no AVX-VNNI kernels
    ("onednn", ["avx2", "avx_vnni"], False),                              # oneDNN has
    ("onednn", ["avx2", "amx_tile", "amx_int8"], False),
    ("onednn", ["sse4_2", "avx", "avx2"], True),                          # torch warns: accuracy issues without VNNI
    ("qnnpack", ["avx2"], False),                                         # 32-bit accumulation
    ("onednn", ["asimd", "asimddp", "torch:DEFAULT"], False),             # not x86: no vpmaddubsw
    ("x86", [], True),                                                    # flags unknown: the safe answer
    ("qnnpack", [], False),
])
def test_needs_reduce_range_follows_the_cpu_s_int8_instructions(engine, sets, needed):
    assert measure.needs_reduce_range(engine, sets) is needed


def test_needs_reduce_range_names_the_engines_it_knows():
    with pytest.raises(ValueError, match=r"^engine='mkldnn' is not valid; use one of 'x86', 'fbgemm', 'onednn', "
                                         r"'qnnpack'\.$"):
        measure.needs_reduce_range("mkldnn", ["avx2"])


def test_executed_primitives_reads_both_verbose_formats():
    log = ("onednn_verbose,v1,info,oneDNN v3.7.1\n"
           "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32 dst:u8,,256x1152,0.06\n"
           "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_vnni,undef,src:u8,,256x1152:1152x4608,2.1\n"
           "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_vnni,undef,src:u8,,256x1152:1152x4608,2.0\n"
           "dnnl_verbose,exec,cpu,inner_product,gemm:jit,forward_inference,src_u8,,mb16ic64oc32,0.01\n"
           "something else,exec\n")
    assert measure._executed_primitives(log) == ["matmul:brg_matmul:avx512_core_vnni", "inner_product:gemm:jit"]
    assert measure._executed_primitives("") == []


@pytest.mark.skipif("onednn" not in measure.quantized_engines(), reason="this torch build has no onednn engine")
def test_onednn_kernels_sees_a_onednn_int8_linear_and_nothing_in_a_float_add():
    from effnb import quant as Q

    linear, x = nn.Linear(64, 32), torch.randn(16, 64)
    with measure.quantized_engine("onednn"):
        module = Q.int8_linear(linear, "static", example_input=x, reduce_range=True)
        with torch.no_grad():
            kernels = measure.onednn_kernels(lambda: module(x))
            assert measure.int8_kernel("onednn", lambda: module(x)).endswith("(reported)")
    assert kernels and all(k.split(":")[0] in ("matmul", "inner_product") for k in kernels), kernels
    assert measure.onednn_kernels(lambda: x + 1) == []


@pytest.mark.parametrize("sets, isa", [(["avx2"], "avx2"), (["avx2", "avx512f", "avx512bw", "avx512vl"], "avx512"),
                                       (["avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"], "avx512_vnni")])
def test_int8_kernel_infers_fbgemm_s_kernel_family_from_the_flags(sets, isa):
    assert measure.int8_kernel("fbgemm", lambda: None, sets) == f"FBGEMM {isa} (inferred from CPU flags)"
    assert measure.int8_kernel("qnnpack", lambda: None, sets).startswith("QNNPACK")
    with pytest.raises(ValueError, match=r"^engine='cuda' is not valid; use one of 'x86'"):
        measure.int8_kernel("cuda", lambda: None)


def test_time_share_counts_the_time_inside_the_modules_once():
    ticks = iter(range(10_000))                            # a clock that advances 1 per reading
    clock = lambda: float(next(ticks))
    inner = nn.Linear(2, 2)
    outer = nn.Sequential(inner, nn.ReLU())
    model = nn.Sequential(outer, nn.Linear(2, 2))
    x = torch.zeros(1, 2)
    # per call: the outer clock reads start and stop (2 ticks), the hooks of `outer` read once each; `inner`
    # is nested inside it and reads nothing more
    share = measure.time_share(lambda: model(x), [outer, inner], repeats=10, clock=clock)
    assert share == pytest.approx(10 * 1 / (10 * 2 + 1))    # 10 spans of 1 tick, 21 ticks from start to stop
    assert not model[0]._forward_hooks and not inner._forward_pre_hooks, "no hook is left behind"
    with pytest.raises(ValueError, match=re.escape("time_share needs at least one module to time, e.g. [model.layer1].")):
        measure.time_share(lambda: model(x), [])
    with pytest.raises(ValueError, match=re.escape("repeats=0 must be a whole number >= 1, e.g. repeats=10.")):
        measure.time_share(lambda: model(x), [inner], repeats=0)
