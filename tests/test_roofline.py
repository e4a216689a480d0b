"""Tests of effnb.roofline: hand-computed costs, LLM-Viewer's own figures, properties, errors, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from effnb import roofline as rl
from effnb.roofline import analyze, generation

A100 = rl.HARDWARE["nvidia_A100"]
MODES = ("effnb", "llm-viewer")


# ----------------------------------------------------------------------------- LLM-Viewer's figures
def test_worked_example_q_proj_matches_llm_viewer():
    step = analyze("llama-2-7b", "nvidia_A100", "decode", batch=1, seq_len=1024, compat="llm-viewer")
    q = step.find("q_proj")
    assert q.ops == 33_554_432  # 2 * 4096 * 4096
    assert q.bytes == 33_570_816  # 4096*4096*2 + 4096*2 + 4096*2
    assert q.bound == "memory"
    assert q.time * 1e6 == pytest.approx(21.589, abs=5e-4)


def test_worked_example_decode_step_is_8_854_ms():
    step = analyze("llama-2-7b", "nvidia_A100", "decode", batch=1, seq_len=1024, compat="llm-viewer")
    assert step.time * 1e3 == pytest.approx(8.854, abs=5e-4)


@pytest.mark.parametrize("tokens, ms", [(576, 27.3), (32, 8.7)])
def test_prumerge_prefill_figures(tokens, ms):
    # PruMerge quotes LLM-Viewer: Llama-2-7B prefill on A100, FP16.
    step = analyze("llama-2-7b", "nvidia_A100", "prefill", seq_len=tokens, compat="llm-viewer")
    assert round(step.time * 1e3, 1) == ms


def test_compat_quirks_by_hand():
    m = rl.MODELS["llama-2-7b"]
    pre = analyze(m, A100, "prefill", seq_len=1024, compat="llm-viewer")
    qk = pre.find("qk_matmul")
    assert qk.load_act == 0 and qk.load_kv == 1024 * 128 * 32 * 2 * 2  # Q counted as KV cache
    act = pre.find("mlp_act")
    assert act.ops == 1024 * 4096 * 2  # hidden, not intermediate
    head = pre.find("lm_head")
    assert head.ops == 4096 * 32000 and head.load_act == 4096 * 2  # no factor 2, one token


# LLM-Viewer's flash-attention branch (model_analyzer.py, ModelAnalyzer.analyze, `if use_flashattention`),
# Llama-2-7B (h = 4096, H = KVH = 32, d = 128, L = 32), A100 (hardware_params.py: 1555e9 B/s, 312e12 OP/s FP16,
# onchip_buffer 27648e3 B), batch 1, seqlen 1024, W16A16KV16, so a_byte = kv_byte = 2:
#   block_size_r = min(ceil(onchip_buffer / (kv_byte * d)), d) = min(ceil(27648e3 / 256), 128) = 128
#   n_blocks_r   = ceil(1 / 128) = 1 (decode);  ceil(1024 / 128) = 8 (prefill)
#   load_act  = q_numel = q * d * b * H * a_byte                 (q = 1 decode, 1024 prefill)
#   store_act = 2 * o_numel, o_numel = q * seqlen * b * H * a_byte ("initialize O and save O")
#   load_kv   = n_blocks_r * seqlen * d * b * H * kv_byte * 2     (K and V, MHA heads)
#   OPs = qk + sv + softmax = 2 * (2 q s d H b) + 5 b H q s
# The step totals are LLM-Viewer's own output: its analyzer (commit 472f71f) run offline on a local
# Llama-2-7B config.json gave decode 8.851083606430868 ms, prefill 50.27339259728057 ms,
# memory_access 13,763,435,008 B (decode) and 30,142,437,888 B (prefill).
@pytest.mark.parametrize("stage, q, passes, step_ms, step_bytes", [
    ("decode", 1, 1, 8.851083606430868, 13_763_435_008),
    ("prefill", 1024, 8, 50.27339259728057, 30_142_437_888),
])
def test_flash_attention_matches_llm_viewer(stage, q, passes, step_ms, step_bytes):
    step = analyze("llama-2-7b", "nvidia_A100", stage, batch=1, seq_len=1024, flash=True, compat="llm-viewer")
    fused = step.find("fused_attention")
    assert fused.ops == 2 * (2 * q * 1024 * 128 * 32) + 5 * 32 * q * 1024
    assert fused.load_act == q * 128 * 32 * 2
    assert fused.store_act == 2 * (q * 1024 * 32 * 2)
    assert fused.load_kv == passes * 1024 * 128 * 32 * 2 * 2
    assert fused.bound == "memory"
    assert step.total("bytes") == step_bytes
    assert step.time * 1e3 == pytest.approx(step_ms, rel=1e-12)


def test_a40_peaks_are_llm_viewers():
    a40 = rl.HARDWARE["nvidia_A40"]  # hardware_params.py lists the A40's dense peaks directly
    assert (a40.bandwidth, a40.fp16_ops, a40.int8_ops, a40.onchip_buffer) == (696e9, 149.7e12, 299.3e12, 21504e3)


# ----------------------------------------------------------------------------- effnb mode, by hand
def test_effnb_fixes_by_hand():
    pre = analyze("llama-2-7b", A100, "prefill", batch=2, seq_len=512)
    qk = pre.find("qk_matmul")
    assert qk.load_act == 2 * 512 * 32 * 128 * 2  # Q: all heads, activation bytes
    assert qk.load_kv == 2 * 512 * 32 * 128 * 2  # K
    assert pre.find("mlp_act").ops == 2 * 512 * 11008 * 2
    head = pre.find("lm_head")
    assert head.ops == 2 * 4096 * 32000 * 2 and head.load_act == 2 * 4096 * 2
    assert pre.find("q_proj").ops == 2 * 4096 * 4096 * 2 * 512


def test_gqa_kv_heads_by_hand():
    step = analyze("llama-2-70b", "nvidia_H100", "decode", seq_len=4096)
    k = step.find("k_proj")
    assert k.ops == 2 * 8192 * 1024 and k.store_kv == 1024 * 2 and k.store_act == 0
    assert step.find("qk_matmul").load_kv == 4096 * 8 * 128 * 2
    assert step.kv_cache_bytes == 2 * 80 * 4096 * 8 * 128 * 2


def test_flash_attention_streams_k_and_v_with_kv_heads():
    step = analyze("llama-2-70b", "nvidia_H100", "prefill", seq_len=1024, flash=True)
    fused = step.find("fused_attention")
    passes = 1024 // 128  # block rows = head_dim = 128
    assert fused.load_kv == passes * 1024 * 8 * 128 * 2 * 2
    assert fused.store_act == 1024 * 64 * 128 * 2
    names = [op.name for op in step.operators]
    assert "qk_matmul" not in names and "softmax" not in names


def test_opt_has_no_gate_in_effnb_mode_but_has_one_in_compat():
    names = [op.name for op in analyze("opt-1.3b", A100).operators]
    assert "fc1" in names and "gate_proj" not in names
    assert "gate_proj" in [op.name for op in analyze("opt-1.3b", A100, compat="llm-viewer").operators]


def test_memory_footprint_by_hand():
    step = analyze("llama-2-7b", A100, "decode", seq_len=1024)
    layer_weights = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2
    assert step.weight_bytes == 32 * layer_weights + 2 * 32000 * 4096 * 2
    assert step.kv_cache_bytes == 2 * 32 * 1024 * 4096 * 2
    compat = analyze("llama-2-7b", A100, "decode", seq_len=1024, compat="llm-viewer")
    assert compat.weight_bytes == 32 * layer_weights
    assert step.memory_footprint == step.weight_bytes + step.kv_cache_bytes + step.activation_bytes


def test_decode_linear_memory_bound_prefill_compute_bound_on_a100():
    linears = ("q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj")
    decode = analyze("llama-2-7b", A100, "decode", batch=1, seq_len=1024)
    prefill = analyze("llama-2-7b", A100, "prefill", batch=1, seq_len=1024)
    assert all(decode.find(n).bound == "memory" for n in linears)
    assert all(prefill.find(n).bound == "compute" for n in linears)


def test_int8_peak_choice():
    v100 = rl.HARDWARE["nvidia_V100"]
    w8a8 = dict(w_bit=8, a_bit=8, kv_bit=16, stage="prefill")
    assert analyze("llama-2-7b", A100, **w8a8).find("q_proj").peak == A100.int8_ops
    assert analyze("llama-2-7b", A100, compat="llm-viewer", **w8a8).find("q_proj").peak == A100.fp16_ops
    all8 = dict(w_bit=8, a_bit=8, kv_bit=8)
    assert analyze("llama-2-7b", v100, compat="llm-viewer", **all8).find("q_proj").peak == v100.int8_ops
    assert analyze("llama-2-7b", v100, **all8).find("q_proj").peak == v100.fp16_ops


def test_generation_counts_steps():
    for mode, steps in (("effnb", 9), ("llm-viewer", 10)):
        gen = generation("llama-2-7b", A100, prompt=128, new_tokens=10, compat=mode)
        assert gen.decode_steps == steps
        assert gen.time == pytest.approx(gen.prefill_time + gen.decode_time)
        assert gen.prefill_time == pytest.approx(analyze("llama-2-7b", A100, "prefill", seq_len=128,
                                                         compat=mode).time)


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", rl.STAGES)
@pytest.mark.parametrize("flash", [False, True])
def test_time_never_falls_as_sequence_or_batch_grows(mode, stage, flash):
    for model in ("llama-2-7b", "llama-2-70b", "opt-1.3b"):
        kw = dict(stage=stage, flash=flash, compat=mode)
        by_seq = [analyze(model, A100, seq_len=s, **kw).time for s in (1, 16, 128, 129, 1024, 4096)]
        by_batch = [analyze(model, A100, batch=b, seq_len=256, **kw).time for b in (1, 2, 8, 64, 256)]
        assert by_seq == sorted(by_seq), (model, by_seq)
        assert by_batch == sorted(by_batch), (model, by_batch)


@pytest.mark.parametrize("mode", MODES)
def test_bytes_scale_with_bit_width(mode):
    base = analyze("llama-2-7b", A100, w_bit=16, a_bit=16, kv_bit=16, compat=mode)
    w4 = analyze("llama-2-7b", A100, w_bit=4, a_bit=16, kv_bit=16, compat=mode)
    kv4 = analyze("llama-2-7b", A100, w_bit=16, a_bit=16, kv_bit=4, compat=mode)
    assert w4.total("load_weight") == pytest.approx(base.total("load_weight") / 4)
    assert w4.total("load_act") == base.total("load_act")
    assert kv4.total("load_kv") == pytest.approx(base.total("load_kv") / 4)
    assert kv4.kv_cache_bytes == pytest.approx(base.kv_cache_bytes / 4)
    totals = [analyze("llama-2-7b", A100, w_bit=b, a_bit=b, compat=mode).total("bytes") for b in (4, 8, 16, 32)]
    assert totals == sorted(totals) and totals[1] == pytest.approx(totals[2] / 2)


@pytest.mark.parametrize("mode", MODES)
def test_roofline_time_is_bytes_over_bandwidth_or_ops_over_peak(mode):
    for stage in rl.STAGES:
        for op in analyze("llama-2-13b", "nvidia_L40", stage, seq_len=700, compat=mode).operators:
            if op.bound == "memory":
                assert op.time == pytest.approx(op.bytes / op.bandwidth)
                assert op.arithmetic_intensity < op.peak / op.bandwidth
            else:
                assert op.time == pytest.approx(op.ops / op.peak)
            assert op.time == pytest.approx(max(op.bytes / op.bandwidth, op.ops / op.peak))


# ----------------------------------------------------------------------------- shapes and hardware
def test_shape_from_llama_config_matches_bundled():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                         num_hidden_layers=80, intermediate_size=28672, vocab_size=32000)
    shape = rl.shape_from_config(config, name="llama-2-70b")
    assert shape == rl.MODELS["llama-2-70b"]
    assert shape.head_dim == 128


def test_shape_from_opt_config():
    from transformers import OPTConfig

    shape = rl.shape_from_config(OPTConfig(hidden_size=2048, num_attention_heads=32, num_hidden_layers=24,
                                           ffn_dim=8192, vocab_size=50272))
    assert shape.intermediate_size == 8192 and not shape.gated_mlp and shape.num_kv_heads == 32
    assert shape.tied_embeddings


def test_hardware_from_measurement_and_register():
    hw = rl.hardware_from_measurement(peak_flops=1e11, bandwidth=2e10)
    assert hw.name == "this machine" and hw.ridge == pytest.approx(5.0) and hw.ridge_int8 == pytest.approx(5.0)
    step = analyze("llama-2-7b", hw, w_bit=32, a_bit=32)
    assert step.find("q_proj").time == pytest.approx(step.find("q_proj").bytes / 2e10)
    custom = rl.register_hardware(rl.Hardware("my_card", 1e12, 1e14, 2e14, 1e7))
    try:
        assert rl.get_hardware("my_card") is custom
    finally:
        del rl.HARDWARE["my_card"]


def test_plot_roofline_places_every_operator():
    import matplotlib

    matplotlib.use("Agg")
    step = analyze("llama-2-7b", A100)
    ax = rl.plot_roofline(step)
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(step.operators)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    # decode at batch 1 has no compute-bound operator, so the legend must not promise one
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "memory-bound operator" in labels and "compute-bound operator" not in labels


# ----------------------------------------------------------------------------- error messages
@pytest.mark.parametrize("kwargs, match", [
    (dict(model="gpt-5"), r"model='gpt-5' is not valid; use one of .*'llama-2-7b'"),
    (dict(hardware="tpu"), r"hardware='tpu' is not valid; use one of .*'nvidia_A100'"),
    (dict(stage="train"), r"stage='train' is not valid; use one of 'prefill', 'decode'"),
    (dict(compat="vllm"), r"compat='vllm' is not valid; use one of 'effnb', 'llm-viewer'"),
    (dict(w_bit=5), r"w_bit=5 is not valid; use one of 2, 3, 4, 8, 16, 32"),
    (dict(a_bit=1), r"a_bit=1 is not valid"),
    (dict(kv_bit=12), r"kv_bit=12 is not valid"),
    (dict(batch=0), r"batch=0 must be a positive integer"),
    (dict(seq_len=-3), r"seq_len=-3 must be a positive integer"),
])
def test_error_messages(kwargs, match):
    args = dict(model="llama-2-7b", hardware="nvidia_A100") | kwargs
    with pytest.raises(ValueError, match=match):
        analyze(args.pop("model"), args.pop("hardware"), **args)


def test_other_error_messages():
    with pytest.raises(ValueError, match=r"new_tokens=0 must be a positive integer"):
        generation("llama-2-7b", A100, prompt=8, new_tokens=0)
    with pytest.raises(ValueError, match=r"operator='conv' is not valid; use one of 'attn_norm'"):
        analyze("llama-2-7b", A100).find("conv")
    with pytest.raises(ValueError, match=r"peak_flops=0 must be a finite positive number"):
        rl.hardware_from_measurement(peak_flops=0, bandwidth=1e9)
    with pytest.raises(ValueError, match=r"bandwidth, peaks and on-chip buffer must be finite and positive"):
        rl.register_hardware(rl.Hardware("bad", 0, 1, 1, 1))
    with pytest.raises(ValueError, match=r"bad: bandwidth, peaks and on-chip buffer must be finite"):
        rl.register_hardware(rl.Hardware("bad", 1e9, float("nan"), 1, 1))
    assert "bad" not in rl.HARDWARE
    with pytest.raises(ValueError, match=r"must divide into 3 heads"):
        rl.ModelShape("odd", 100, 3, 1, 1, 10, 10)
    with pytest.raises(TypeError, match=r"has no num_attention_heads; pass a decoder config"):
        rl.shape_from_config(object())


@pytest.mark.parametrize("field, value", [("num_heads", 0), ("num_kv_heads", 0), ("hidden_size", -4096),
                                          ("num_layers", -1), ("intermediate_size", 0), ("vocab_size", 2.5)])
def test_model_shape_rejects_non_positive_sizes(field, value):
    sizes = dict(hidden_size=4096, num_heads=32, num_kv_heads=32, num_layers=32, intermediate_size=11008,
                 vocab_size=32000) | {field: value}
    with pytest.raises(ValueError, match=rf"bad: {field}={value!r} must be a positive integer"):
        rl.ModelShape("bad", **sizes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(peak_flops=float("nan"), bandwidth=1e10), r"peak_flops=nan must be a finite positive number"),
    (dict(peak_flops=1e11, bandwidth=float("inf")), r"bandwidth=inf must be a finite positive number"),
    (dict(peak_flops=1e11, bandwidth=-2e10), r"bandwidth=-20000000000.0 must be a finite positive number"),
    (dict(peak_flops=1e11, bandwidth=1e10, onchip_buffer=float("nan")), r"onchip_buffer=nan must be"),
])
def test_hardware_from_measurement_rejects_non_finite_or_non_positive(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rl.hardware_from_measurement(**kwargs)


@pytest.mark.parametrize("prompt", [0, -5, 1.5, True])
def test_generation_names_prompt_in_its_error(prompt):
    with pytest.raises(ValueError, match=rf"^prompt={prompt!r} must be a positive integer"):
        generation("llama-2-7b", A100, prompt=prompt, new_tokens=4)


def test_ridge_is_a_property_like_measure_machine_roofline():
    from effnb.measure import MachineRoofline

    assert isinstance(vars(rl.Hardware)["ridge"], property)
    assert isinstance(vars(MachineRoofline)["ridge"], property)
    assert A100.ridge == pytest.approx(312e12 / 1555e9) and A100.ridge_int8 == pytest.approx(624e12 / 1555e9)
    assert not hasattr(rl.Hardware, "ridge_point")


# ----------------------------------------------------------------------------- command line
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "effnb.roofline", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_json_worked_example():
    out = _cli("--model", "llama-2-7b", "--hardware", "nvidia_A100", "--stage", "decode", "--batch", "1",
               "--seq-len", "1024", "--w-bit", "16", "--a-bit", "16", "--kv-bit", "16",
               "--compat", "llm-viewer", "--generate-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    q = next(row for row in result["operators"] if row["name"] == "q_proj")
    assert set(q) >= {"name", "ops", "bytes", "arithmetic_intensity", "bound", "time"}
    assert q["time"] * 1e6 == pytest.approx(21.589, abs=5e-4) and q["bound"] == "memory"
    assert result["total"]["time"] * 1e3 == pytest.approx(8.854, abs=5e-4)
    assert set(result["total"]) >= {"time", "ops", "bytes", "memory_footprint"}
    assert result["generation"]["decode_steps"] == 4


def test_cli_unknown_hardware_is_one_sentence_without_traceback():
    out = _cli("--hardware", "nvidia_B200", "--json")
    assert out.returncode != 0 and out.stdout == ""
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: hardware='nvidia_B200' is not valid; use one of")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, match", [
    (["--model", "llama-3"], "model='llama-3' is not valid"),
    (["--w-bit", "5"], "w_bit=5 is not valid"),
    (["--stage", "train"], "stage='train' is not valid"),
    (["--compat", "x"], "compat='x' is not valid"),
    (["--generate-tokens", "0"], "new_tokens=0 must be a positive integer"),
])
def test_cli_errors_in_process(args, match, capsys):
    assert rl.main(args + ["--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and match in captured.err and len(captured.err.strip().splitlines()) == 1


def test_cli_table_output(capsys):
    assert rl.main(["--model", "opt-1.3b", "--flash", "--stage", "prefill", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "fused_attention" in text and "fc1" in text and "total" in text
