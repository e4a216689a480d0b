r"""The roofline model of LLM inference: OPs, bytes and time of every operator.

An operator that performs :math:`O` operations and moves :math:`M` bytes runs, on hardware with
peak :math:`\pi` (OP/s) and memory bandwidth :math:`\beta` (bytes/s), in

.. math:: t = \max\left(\frac{O}{\pi}, \frac{M}{\beta}\right),

memory-bound when its arithmetic intensity :math:`I = O / M` is below the ridge point
:math:`\pi / \beta`. This module counts :math:`O` and :math:`M` for each operator of a decoder-only
transformer (one small function per operator kind, parametrised by the number of query tokens,
so prefill and decode share every formula), sums them per layer and per model, and adds the
memory footprint and a whole generation.

Two modes: ``compat="llm-viewer"`` reproduces LLM-Viewer (Yuan et al. 2024, arXiv 2402.16363,
github.com/hahnyuan/LLM-Viewer) figure for figure, quirks included; the default ``"effnb"`` fixes
them (see :data:`QUIRKS`). Command line: ``python -m effnb.roofline --help``.
Introduced in Chapter 1.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

from effnb.config import check_choice

__all__ = [
    "BIT_WIDTHS", "COMPAT_MODES", "HARDWARE", "MODELS", "QUIRKS", "STAGES",
    "Analysis", "Generation", "Hardware", "ModelShape", "OperatorCost", "Settings",
    "analyze", "attention_costs", "elementwise_cost", "footprint_bytes", "fused_attention_cost", "generation",
    "get_hardware", "get_model", "hardware_from_measurement", "head_cost", "layer_costs", "linear_cost", "main",
    "plot_roofline", "register_hardware", "shape_from_config",
]

Stage = Literal["prefill", "decode"]
Compat = Literal["effnb", "llm-viewer"]
STAGES: tuple[str, ...] = ("prefill", "decode")
COMPAT_MODES: tuple[str, ...] = ("effnb", "llm-viewer")
BIT_WIDTHS: tuple[int, ...] = (2, 3, 4, 8, 16, 32)

QUIRKS: dict[str, str] = {
    "prefill_qk_loads": "prefill qk_matmul loads Q as if it had the KV heads' size, and as KV cache",
    "mlp_act_width": "the MLP activation counts hidden_size elements instead of intermediate_size",
    "lm_head": "lm_head OPs lack the factor 2 and its activations ignore the batch size",
    "fused_attention": "fused attention ignores grouped-query attention (streams K and V with all "
                       "query heads) and writes the output twice, sized like the score matrix (q x s) "
                       "rather than q x d",
    "opt_gate": "OPT is costed with a gate projection it does not have",
    "int8_peak": "the INT8 peak is used only when weights, activations and KV are all <= 8 bit, "
                 "even where it is below the FP16 peak (V100)",
    "generation_steps": "a generation of G tokens counts G decode steps after prefill; "
                        "prefill already yields the first token, so G - 1 are needed",
    "footprint": "the memory footprint omits the embedding and lm_head weights",
}


def _positive_int(name: str, value: object) -> None:
    """One sentence for a size that must be a positive integer (``bool`` is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {name}=1.")


# ----------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    """One accelerator: ``bandwidth`` (bytes/s), ``fp16_ops`` and ``int8_ops`` (dense OP/s),
    ``onchip_buffer`` (bytes of SRAM, registers + shared memory, over the whole chip).

    Introduced in Chapter 1.
    """

    name: str
    bandwidth: float
    fp16_ops: float
    int8_ops: float
    onchip_buffer: float

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (OP/byte) where the FP16 roof turns flat: ``fp16_ops / bandwidth``.

        The same name and form as :attr:`effnb.measure.MachineRoofline.ridge`. Introduced in Chapter 1.
        """
        return self.fp16_ops / self.bandwidth

    @property
    def ridge_int8(self) -> float:
        """The ridge of the INT8 roof: ``int8_ops / bandwidth``. Introduced in Chapter 1."""
        return self.int8_ops / self.bandwidth


# LLM-Viewer's table (hardwares/hardware_params.py): dense peaks = sparse peaks / 2.
HARDWARE: dict[str, Hardware] = {h.name: h for h in [
    Hardware("nvidia_V100", 900e9, 112e12, 62e12, 20480e3),  # no INT8 tensor cores
    Hardware("nvidia_A6000", 768e9, 309.677e12 / 2, 309.7e12, 21504e3),
    Hardware("nvidia_A100", 1555e9, 312e12, 624e12, 27648e3),  # the 40 GB card
    Hardware("nvidia_A100_40G", 1555e9, 312e12, 624e12, 27648e3),
    Hardware("nvidia_A100_80G", 2039e9, 312e12, 624e12, 27648e3),
    Hardware("nvidia_A40", 696e9, 149.7e12, 299.3e12, 21504e3),  # LLM-Viewer lists the A40's dense peaks
    Hardware("nvidia_H100", 3072e9, 1979e12 / 2, 3958e12 / 2, 33792e3),  # SXM
    Hardware("nvidia_H100_SXM", 3072e9, 1979e12 / 2, 3958e12 / 2, 33792e3),
    Hardware("nvidia_H100_PCIe", 2048e9, 1513e12 / 2, 3026e12 / 2, 29184e3),
    Hardware("nvidia_L40", 864e9, 181e12, 362e12, 36352e3),
]}


def register_hardware(hardware: Hardware) -> Hardware:
    """Add (or replace) ``hardware`` in :data:`HARDWARE` so names can find it. Introduced in Chapter 1."""
    numbers = (hardware.bandwidth, hardware.fp16_ops, hardware.int8_ops, hardware.onchip_buffer)
    if not all(math.isfinite(v) and v > 0 for v in numbers):
        raise ValueError(f"{hardware.name}: bandwidth, peaks and on-chip buffer must be finite and positive, "
                         f"got {hardware}.")
    HARDWARE[hardware.name] = hardware
    return hardware


def get_hardware(name: str | Hardware) -> Hardware:
    """Look ``name`` up in :data:`HARDWARE`; a :class:`Hardware` passes through. Introduced in Chapter 1."""
    if isinstance(name, Hardware):
        return name
    check_choice("hardware", name, sorted(HARDWARE))
    return HARDWARE[name]


def hardware_from_measurement(peak_flops: float, bandwidth: float, name: str = "this machine",
                              onchip_buffer: float = 1e6) -> Hardware:
    """A :class:`Hardware` from a measured matmul peak (FLOP/s) and bandwidth (bytes/s).

    The measured peak serves for every bit width (a CPU has no faster low-bit path in torch).
    Raises ``ValueError`` unless all three numbers are finite and positive. Introduced in Chapter 1.
    """
    for key, value in (("peak_flops", peak_flops), ("bandwidth", bandwidth), ("onchip_buffer", onchip_buffer)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key}={value!r} must be a finite positive number (a measurement), e.g. {key}=1e10.")
    return Hardware(name, float(bandwidth), float(peak_flops), float(peak_flops), float(onchip_buffer))


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that the cost model needs.

    ``gated_mlp``: SwiGLU (gate, up, down) as in Llama, else two layers (fc1, fc2) as in OPT.
    ``tied_embeddings``: the lm_head reuses the embedding matrix (stored once).
    Introduced in Chapter 1.
    """

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_heads", "num_kv_heads", "num_layers", "intermediate_size", "vocab_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {key}={value!r} must be a positive integer; "
                                 "every size of a model is a count of at least 1.")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} must divide into "
                             f"{self.num_heads} heads, and heads into {self.num_kv_heads} KV heads.")

    @property
    def head_dim(self) -> int:
        """d = hidden_size / num_heads."""
        return self.hidden_size // self.num_heads


MODELS: dict[str, ModelShape] = {m.name: m for m in [
    ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
    ModelShape("llama-2-13b", 5120, 40, 40, 40, 13824, 32000),
    ModelShape("llama-2-70b", 8192, 64, 8, 80, 28672, 32000),  # grouped-query attention
    ModelShape("opt-1.3b", 2048, 32, 32, 24, 8192, 50272, gated_mlp=False, tied_embeddings=True),
    ModelShape("opt-6.7b", 4096, 32, 32, 32, 16384, 50272, gated_mlp=False, tied_embeddings=True),
]}
_UNGATED_TYPES = ("opt", "gpt2", "gpt_neox", "gptj", "bloom", "falcon", "phi")


def get_model(name: str | ModelShape) -> ModelShape:
    """Look ``name`` up in :data:`MODELS`; a :class:`ModelShape` passes through. Introduced in Chapter 1."""
    if isinstance(name, ModelShape):
        return name
    check_choice("model", name, sorted(MODELS))
    return MODELS[name]


def shape_from_config(config, name: str | None = None) -> ModelShape:
    """A :class:`ModelShape` from a ``transformers`` decoder config (built locally, never fetched).

    Reads ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads`` (default: the heads),
    ``num_hidden_layers``, ``intermediate_size`` (OPT: ``ffn_dim``) and ``vocab_size``.
    Introduced in Chapter 1.
    """
    def read(*keys: str):
        for key in keys:
            if getattr(config, key, None) is not None:
                return getattr(config, key)
        raise TypeError(f"{type(config).__name__} has no {' or '.join(keys)}; "
                        "pass a decoder config such as LlamaConfig or OPTConfig.")

    heads = read("num_attention_heads")
    model_type = getattr(config, "model_type", "")
    return ModelShape(
        name=name or getattr(config, "name_or_path", "") or model_type or "custom",
        hidden_size=read("hidden_size"), num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        num_layers=read("num_hidden_layers"), intermediate_size=read("intermediate_size", "ffn_dim"),
        vocab_size=read("vocab_size"), gated_mlp=model_type not in _UNGATED_TYPES,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """One inference step to cost: ``stage``, ``batch`` sequences of ``seq_len`` tokens
    (prefill: the prompt; decode: the keys the new token attends to), bit widths of weights,
    activations and KV cache (``kv_bit=None`` means ``a_bit``), fused (flash) attention, and the mode.

    Introduced in Chapter 1.
    """

    stage: Stage = "decode"
    batch: int = 1
    seq_len: int = 1024
    w_bit: int = 16
    a_bit: int = 16
    kv_bit: int | None = None
    flash: bool = False
    compat: Compat = "effnb"

    def __post_init__(self) -> None:
        if self.kv_bit is None:
            object.__setattr__(self, "kv_bit", self.a_bit)
        check_choice("stage", self.stage, STAGES)
        check_choice("compat", self.compat, COMPAT_MODES)
        for key in ("w_bit", "a_bit", "kv_bit"):
            check_choice(key, getattr(self, key), BIT_WIDTHS)
        for key in ("batch", "seq_len"):
            _positive_int(key, getattr(self, key))

    @property
    def query_tokens(self) -> int:
        """Tokens per sequence that pass through the layers: the prompt, or one new token."""
        return self.seq_len if self.stage == "prefill" else 1

    @property
    def compat_llm_viewer(self) -> bool:
        """True when LLM-Viewer's formulas, quirks included, are used."""
        return self.compat == "llm-viewer"


# ----------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class OperatorCost:
    r"""One operator on one roofline: OPs, bytes moved by kind, and the peak it runs against.

    ``count`` is how often it runs per model step (``num_layers`` for layer operators).
    ``time`` = max(ops / peak, bytes / bandwidth) seconds. Introduced in Chapter 1.
    """

    name: str
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0
    peak: float = field(default=0.0, repr=False)  # OP/s this operator can reach
    bandwidth: float = field(default=0.0, repr=False)  # bytes/s
    count: int = 1

    @property
    def bytes(self) -> float:
        """Bytes moved to and from off-chip memory."""
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    @property
    def arithmetic_intensity(self) -> float:
        """OPs per byte moved."""
        return self.ops / self.bytes if self.bytes else math.inf

    @property
    def bound(self) -> str:
        """``"memory"`` below the ridge point ``peak / bandwidth``, else ``"compute"``."""
        return "memory" if self.arithmetic_intensity < self.peak / self.bandwidth else "compute"

    @property
    def time(self) -> float:
        """Seconds on the roofline: bytes / bandwidth when memory-bound, else ops / peak."""
        return self.bytes / self.bandwidth if self.bound == "memory" else self.ops / self.peak

    def row(self) -> dict:
        """A JSON-ready dict of this operator's numbers."""
        out = {k: v for k, v in asdict(self).items() if k not in ("peak", "bandwidth")}
        out.update(bytes=self.bytes, arithmetic_intensity=self.arithmetic_intensity,
                   bound=self.bound, time=self.time)
        return out


# Each cost function returns (name, ops, traffic): traffic holds bytes by kind; tokens = batch x query tokens.
def linear_cost(name: str, d_in: int, d_out: int, tokens: int, w_byte: float, a_byte: float,
                out_byte: float | None = None, to_kv_cache: bool = False) -> tuple[str, float, dict]:
    r"""A matmul ``(tokens, d_in) @ (d_in, d_out)``: :math:`O = 2\,d_{in} d_{out} n`, weights read once.

    ``to_kv_cache``: the output is stored in the KV cache at ``out_byte`` bytes per element.
    Introduced in Chapter 1.
    """
    out_byte = a_byte if out_byte is None else out_byte
    stored = d_out * tokens * out_byte
    return name, 2.0 * d_in * d_out * tokens, dict(
        load_weight=d_in * d_out * w_byte, load_act=d_in * tokens * a_byte,
        store_act=0.0 if to_kv_cache else stored, store_kv=stored if to_kv_cache else 0.0)


def elementwise_cost(name: str, elements: float, ops_per_element: float, a_byte: float,
                     inputs: int = 1) -> tuple[str, float, dict]:
    """Norm (7 OPs/element), residual add (1), activation (2 with the gate): read ``inputs``
    tensors of ``elements`` values, write one. Introduced in Chapter 1."""
    return name, ops_per_element * elements, dict(
        load_act=inputs * elements * a_byte, store_act=elements * a_byte)


def attention_costs(m: ModelShape, batch: int, q: int, s: int, a_byte: float, kv_byte: float,
                    compat: bool) -> list[tuple[str, float, dict]]:
    r"""Unfused attention for ``q`` query tokens over ``s`` keys per sequence, ``batch`` sequences.

    qk: :math:`S = QK^T`, :math:`O = 2 b H q s d`; softmax: 5 OPs per score; sv: :math:`SV`.
    Q and outputs use all ``H`` heads, K and V only the ``KVH`` heads (grouped-query attention).
    Introduced in Chapter 1.
    """
    H, KVH, d = m.num_heads, m.num_kv_heads, m.head_dim
    scores = batch * H * q * s
    qk_traffic = dict(load_act=batch * q * H * d * a_byte, store_act=scores * a_byte,
                      load_kv=batch * s * KVH * d * kv_byte)
    if compat and q > 1:  # LLM-Viewer's prefill loads Q with the KV heads, as cache
        qk_traffic.update(load_act=0.0, load_kv=batch * s * KVH * d * 2 * kv_byte)
    return [
        ("qk_matmul", 2.0 * scores * d, qk_traffic),
        ("softmax", 5.0 * scores, dict(load_act=scores * a_byte, store_act=scores * a_byte)),
        ("sv_matmul", 2.0 * scores * d, dict(load_act=scores * a_byte, load_kv=batch * s * KVH * d * kv_byte,
                                             store_act=batch * q * H * d * a_byte)),
    ]


def fused_attention_cost(m: ModelShape, batch: int, q: int, s: int, a_byte: float, kv_byte: float,
                         onchip_buffer: float, compat: bool) -> tuple[str, float, dict]:
    r"""FlashAttention-2: scores stay on chip; K and V are streamed once per block of query rows.

    Block rows :math:`B_r = \min(\lceil M / (kv\_byte \cdot d) \rceil, d)` for on-chip buffer
    :math:`M`, so K and V are read :math:`\lceil q / B_r \rceil` times. Introduced in Chapter 1.
    """
    H, KVH, d = m.num_heads, m.num_kv_heads, m.head_dim
    ops = sum(cost[1] for cost in attention_costs(m, batch, q, s, a_byte, kv_byte, compat))
    block_rows = min(math.ceil(onchip_buffer / (kv_byte * d)), d)
    passes = math.ceil(q / block_rows)
    if compat:  # LLM-Viewer: K and V with all H heads, output sized like the scores, written twice
        return "fused_attention", ops, dict(load_act=batch * q * H * d * a_byte,
                                            store_act=2 * batch * q * s * H * a_byte,
                                            load_kv=passes * batch * s * H * d * 2 * kv_byte)
    return "fused_attention", ops, dict(load_act=batch * q * H * d * a_byte,
                                        store_act=batch * q * H * d * a_byte,
                                        load_kv=passes * batch * s * KVH * d * 2 * kv_byte)


def layer_costs(m: ModelShape, st: Settings, onchip_buffer: float) -> list[tuple[str, float, dict]]:
    """Every operator of one decoder layer, in execution order. Introduced in Chapter 1."""
    w, a, kv = st.w_bit / 8, st.a_bit / 8, st.kv_bit / 8
    q, s, compat = st.query_tokens, st.seq_len, st.compat_llm_viewer
    n, h, kv_width = st.batch * q, m.hidden_size, m.num_kv_heads * m.head_dim
    gated = m.gated_mlp or compat  # LLM-Viewer costs a gate for OPT too
    act_width = h if compat else m.intermediate_size
    costs = [
        elementwise_cost("attn_norm", n * h, 7, a),
        linear_cost("q_proj", h, h, n, w, a),
        linear_cost("k_proj", h, kv_width, n, w, a, kv, to_kv_cache=True),
        linear_cost("v_proj", h, kv_width, n, w, a, kv, to_kv_cache=True),
    ]
    if st.flash:
        costs.append(fused_attention_cost(m, st.batch, q, s, a, kv, onchip_buffer, compat))
    else:
        costs += attention_costs(m, st.batch, q, s, a, kv, compat)
    costs += [linear_cost("out_proj", h, h, n, w, a), elementwise_cost("attn_add", n * h, 1, a),
              elementwise_cost("mlp_norm", n * h, 7, a)]
    if gated:
        costs += [linear_cost("gate_proj", h, m.intermediate_size, n, w, a),
                  linear_cost("up_proj", h, m.intermediate_size, n, w, a),
                  elementwise_cost("mlp_act", n * act_width, 2, a, inputs=2),
                  linear_cost("down_proj", m.intermediate_size, h, n, w, a)]
    else:
        costs += [linear_cost("fc1", h, m.intermediate_size, n, w, a),
                  elementwise_cost("mlp_act", n * act_width, 1, a),
                  linear_cost("fc2", m.intermediate_size, h, n, w, a)]
    return costs + [elementwise_cost("mlp_add", n * h, 1, a)]


def head_cost(m: ModelShape, st: Settings) -> tuple[str, float, dict]:
    """The lm_head, applied to the last token of each sequence (the only logits generation needs).
    Introduced in Chapter 1."""
    w, a, h, V = st.w_bit / 8, st.a_bit / 8, m.hidden_size, m.vocab_size
    if st.compat_llm_viewer:  # no factor 2; activations of one sequence only
        return "lm_head", 1.0 * st.batch * h * V, dict(load_weight=h * V * w, load_act=h * a, store_act=V * a)
    return linear_cost("lm_head", h, V, st.batch, w, a)


def _operand_bits(name: str, st: Settings) -> tuple[int, ...]:
    if st.compat_llm_viewer:
        return (st.w_bit, st.a_bit, st.kv_bit)
    if name in ("qk_matmul", "sv_matmul", "fused_attention"):
        return (st.a_bit, st.kv_bit)
    return (st.w_bit, st.a_bit) if name.endswith(("proj", "fc1", "fc2", "lm_head")) else (st.a_bit,)


def _peak(name: str, hw: Hardware, st: Settings) -> float:
    """INT8 peak when every operand is <= 8 bit (effnb mode: never below the FP16 peak)."""
    if max(_operand_bits(name, st)) > 8:
        return hw.fp16_ops
    return hw.int8_ops if st.compat_llm_viewer else max(hw.int8_ops, hw.fp16_ops)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Analysis:
    """The costed step: ``operators`` (one decoder layer's, ``count = num_layers``, then the
    lm_head), totals over the model, and the memory footprint in bytes. Introduced in Chapter 1."""

    model: ModelShape
    hardware: Hardware
    settings: Settings
    operators: list[OperatorCost]
    weight_bytes: float
    kv_cache_bytes: float
    activation_bytes: float

    def total(self, key: str) -> float:
        """Sum of ``count * getattr(op, key)`` over all operators (``"time"``, ``"ops"``, ``"bytes"``...)."""
        return sum(op.count * getattr(op, key) for op in self.operators)

    @property
    def time(self) -> float:
        """Seconds for the whole step."""
        return self.total("time")

    @property
    def memory_footprint(self) -> float:
        """Bytes held: weights + KV cache + one layer's activations."""
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def find(self, name: str) -> OperatorCost:
        """The operator called ``name``."""
        names = [op.name for op in self.operators]
        check_choice("operator", name, names)
        return self.operators[names.index(name)]

    def to_dict(self) -> dict:
        """The CLI's JSON: ``operators`` rows and ``total`` (time s, ops, bytes, memory_footprint)."""
        return {"model": self.model.name, "hardware": self.hardware.name, "settings": asdict(self.settings),
                "operators": [op.row() for op in self.operators],
                "total": {"time": self.time, "ops": self.total("ops"), "bytes": self.total("bytes"),
                          "memory_footprint": self.memory_footprint, "weights": self.weight_bytes,
                          "kv_cache": self.kv_cache_bytes, "activations": self.activation_bytes}}


def footprint_bytes(m: ModelShape, st: Settings, layer: list[OperatorCost],
                    head: OperatorCost) -> tuple[float, float, float]:
    r"""``(weights, kv_cache, activations)`` in bytes: what must sit in memory for this step.

    Weights: every layer's weight bytes (effnb: plus the embedding table and an untied lm_head);
    KV cache: :math:`2 L b s H_{kv} d\,kv_B`; activations: one layer's outputs, a rough upper
    estimate of the live peak. Introduced in Chapter 1.
    """
    kv_cache = 2.0 * m.num_layers * st.batch * st.seq_len * m.num_kv_heads * m.head_dim * st.kv_bit / 8
    weights = m.num_layers * sum(op.load_weight for op in layer)
    activations = sum(op.store_act for op in layer)
    if not st.compat_llm_viewer:  # embedding table, plus an untied lm_head
        weights += (1 if m.tied_embeddings else 2) * m.vocab_size * m.hidden_size * st.w_bit / 8
        activations += head.store_act
    return weights, kv_cache, activations


def analyze(model: str | ModelShape, hardware: str | Hardware, stage: Stage = "decode", batch: int = 1,
            seq_len: int = 1024, w_bit: int = 16, a_bit: int = 16, kv_bit: int | None = None,
            flash: bool = False, compat: Compat = "effnb") -> Analysis:
    """Cost one prefill or decode step of ``model`` on ``hardware``; see :class:`Settings`.

    Introduced in Chapter 1.
    """
    m, hw = get_model(model), get_hardware(hardware)
    st = Settings(stage, batch, seq_len, w_bit, a_bit, kv_bit, flash, compat)

    def place(cost: tuple[str, float, dict], count: int) -> OperatorCost:
        name, ops, traffic = cost
        return OperatorCost(name, ops, **traffic, peak=_peak(name, hw, st), bandwidth=hw.bandwidth, count=count)

    layer = [place(c, m.num_layers) for c in layer_costs(m, st, hw.onchip_buffer)]
    head = place(head_cost(m, st), 1)
    return Analysis(m, hw, st, layer + [head], *footprint_bytes(m, st, layer, head))


@dataclass(frozen=True)
class Generation:
    """A whole generation: prefill of the prompt, then decode steps; times in seconds.
    Introduced in Chapter 1."""

    prompt: int
    new_tokens: int
    prefill_time: float
    decode_time: float
    decode_steps: int

    @property
    def time(self) -> float:
        """Seconds from prompt to the last new token."""
        return self.prefill_time + self.decode_time


def generation(model: str | ModelShape, hardware: str | Hardware, prompt: int, new_tokens: int,
               **settings) -> Generation:
    """Prefill ``prompt`` tokens, then decode until ``new_tokens`` exist.

    effnb: prefill yields token 1, decode steps attend to P+1, ..., P+G-1 keys (G-1 steps).
    llm-viewer: G decode steps at P, ..., P+G-1 keys. Other keywords go to :func:`analyze`.
    Introduced in Chapter 1.
    """
    _positive_int("prompt", prompt)
    _positive_int("new_tokens", new_tokens)
    settings = {k: v for k, v in settings.items() if k not in ("stage", "seq_len")}
    prefill = analyze(model, hardware, "prefill", seq_len=prompt, **settings)
    start = prompt if prefill.settings.compat_llm_viewer else prompt + 1
    lengths = range(start, prompt + new_tokens)
    decode = sum(analyze(model, hardware, "decode", seq_len=s, **settings).time for s in lengths)
    return Generation(prompt, new_tokens, prefill.time, decode, len(lengths))


# ----------------------------------------------------------------------------- plot
def plot_roofline(analysis: Analysis, ax=None, label_top: int = 4):
    """Draw ``analysis.hardware``'s roofline (log-log) with each operator placed on it.

    Operators at (nearly) the same point share one label; the ``label_top`` groups that take
    longest are labelled in a column at the lower right (under the roof, where no point can
    sit), each joined to its point by a thin line. The legend lists only the kinds of operator
    the plot shows.
    Returns the axes. Introduced in Chapter 1.
    """
    import numpy as np
    from effnb import plot

    if ax is None:
        _, ax = plot.new_figure()
    hw, ops = analysis.hardware, analysis.operators
    peak = max(op.peak for op in ops)
    ai = np.logspace(-1, 5, 200)
    ax.loglog(ai, np.minimum(ai * hw.bandwidth, peak), color="black", lw=1.2, label=f"{hw.name} roof")
    groups: dict[tuple[int, int], list[OperatorCost]] = {}
    for op in ops:
        key = (round(4 * math.log10(op.arithmetic_intensity)), round(4 * math.log10(op.ops / op.time)))
        groups.setdefault(key, []).append(op)
    for role in ("memory", "compute"):
        mine = [op for op in ops if op.bound == role]
        if mine:
            ax.scatter([op.arithmetic_intensity for op in mine], [op.ops / op.time for op in mine],
                       color=plot.color(role), s=18, zorder=3, label=f"{role}-bound operator")
    ranked = sorted(groups.values(), key=lambda g: -sum(o.count * o.time for o in g))[:label_top]
    # Labels in a column below the roof (empty there), highest point first, so the arrows do not cross.
    for i, group in enumerate(sorted(ranked, key=lambda g: -g[0].arithmetic_intensity)):
        first, names = group[0], [o.name for o in group]
        text = ", ".join(names) if len(names) <= 2 else f"{names[0]} +{len(names) - 1} more"
        ax.annotate(text, (first.arithmetic_intensity, first.ops / first.time), fontsize=7,
                    xytext=(0.7, 0.64 - 0.08 * i), textcoords="axes fraction", va="center",
                    arrowprops=dict(arrowstyle="-", color="grey", lw=0.6, relpos=(0, 0.5), shrinkA=2, shrinkB=3))
    ax.set(xlabel="arithmetic intensity (OP/byte)", ylabel="attained performance (OP/s)",
           title=f"{analysis.model.name}, {analysis.settings.stage}, batch {analysis.settings.batch}")
    ax.legend(loc="lower right")
    return ax


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m effnb.roofline",
                                description="Roofline cost of one LLM inference step, as JSON or a table.")
    p.add_argument("--model", default="llama-2-7b", help=f"one of {', '.join(sorted(MODELS))}")
    p.add_argument("--hardware", default="nvidia_A100", help=f"one of {', '.join(sorted(HARDWARE))}")
    p.add_argument("--stage", default="decode", help="prefill or decode")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024, help="prompt length (prefill) or keys attended (decode)")
    for key in ("w", "a", "kv"):
        p.add_argument(f"--{key}-bit", type=int, default=None if key == "kv" else 16)
    p.add_argument("--flash", action="store_true", help="fused (flash) attention")
    p.add_argument("--compat", default="effnb", help="effnb (fixed) or llm-viewer (its figures, quirks included)")
    p.add_argument("--generate-tokens", type=int, default=None, help="also cost a generation of G new tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with one sentence on stderr for bad input).
    Introduced in Chapter 1."""
    args = _parser().parse_args(argv)
    kwargs = dict(batch=args.batch, w_bit=args.w_bit, a_bit=args.a_bit, kv_bit=args.kv_bit,
                  flash=args.flash, compat=args.compat)
    try:
        result = analyze(args.model, args.hardware, args.stage, seq_len=args.seq_len, **kwargs)
        gen = None if args.generate_tokens is None else generation(
            args.model, args.hardware, args.seq_len, args.generate_tokens, **kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = result.to_dict()
    if gen is not None:
        out["generation"] = dict(asdict(gen), time=gen.time)
    if args.json:
        print(json.dumps(out))
        return 0
    for row in out["operators"]:
        print(f"{row['name']:>16} x{row['count']:<3} {row['ops']:11.3e} OPs {row['bytes']:11.3e} B "
              f"AI {row['arithmetic_intensity']:8.2f} {row['bound']:>7}  {row['time'] * 1e6:10.3f} us")
    total = out["total"]
    print(f"total {total['time'] * 1e3:.3f} ms, memory footprint {total['memory_footprint'] / 1e9:.2f} GB")
    if gen is not None:
        print(f"generation of {gen.new_tokens} tokens: {gen.time * 1e3:.1f} ms "
              f"(prefill {gen.prefill_time * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
