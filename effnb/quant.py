r"""Uniform affine quantization: the primitives, an observer, quantized layers and a real int8 path.

A technique module (layer 4 of DESIGN.md): it imports :mod:`effnb.config` only and stands alone.
Read it top to bottom in five parts:

1. the primitive trio ``choose_qparams → quantize → dequantize`` and ``fake_quantize``, whose one
   granularity argument ``axis`` is ``None`` for per-tensor or ``k`` for one scale per slice along dim ``k``;
2. :class:`LSQQuantizer`, a learnable step size (Esser et al. 2020);
3. :class:`Quantizer`, a fake quantizer with an observer (running min/max and a seeded reservoir);
4. :class:`QuantLinear` / :class:`QuantConv2d` and the model-level functions that swap, calibrate,
   switch, report and restore them (optionally one activation quantizer per diffusion time step);
5. :func:`int8_linear`, torch's int8 CPU kernels for a measured speed and size.

Conventions. An integer grid :math:`[q_{min}, q_{max}]` of ``bits`` bits is
``symmetric``: :math:`[-2^{b-1}, 2^{b-1}-1]`, zero point 0, :math:`s = \max|x| / (2^{b-1}-1)` (so ±max|x|
are both exact and the code :math:`-2^{b-1}` is only reached by clipping); or asymmetric:
:math:`[0, 2^b-1]`, :math:`s = (\max - \min)/(q_{max} - q_{min})` with min ≤ 0 ≤ max (so 0 is exact),
:math:`z = \mathrm{clamp}(\mathrm{round}(q_{min} - \min/s))`. A scale is never below float32's eps
(an all-zero tensor). Rounding is half-to-even and :math:`x/s` is computed as :math:`x \cdot (1/s)`,
as torch's kernels do, so :func:`fake_quantize` equals ``torch.fake_quantize_per_*_affine`` bit for bit.
Introduced in Chapter 5.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnb.config import check_choice, check_count

__all__ = [
    "LSQQuantizer", "METHODS", "QParams", "SEARCH_PERCENTILES", "QuantConv2d", "QuantLinear", "Quantizer",
    "StaticInt8Linear",
    "calibrate", "choose_qparams", "dequantize", "fake_quantize", "format_report", "grad_scale",
    "int8_bytes", "int8_engine", "int8_linear", "qrange", "quantization_report", "quantize",
    "quantize_model", "restore_float", "round_ste", "set_quantization", "set_timestep_index",
    "timestep_index",
]

METHODS: tuple[str, ...] = ("minmax", "percentile", "mse", "percentile_search")
#: The quantile levels PTQ4DiT's and Q-Diffusion's code search for their "mse" range (``quant_layer.py``).
SEARCH_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
_EPS = torch.finfo(torch.float32).eps


# ============================================================================ 1. the primitives
def _check_bits(bits: object) -> None:
    message = f"bits={bits!r} must be a whole number in 2..16, e.g. bits=8."
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(message)
    if not 2 <= bits <= 16:
        raise ValueError(message)


def _check_axis(axis: int | None, ndim: int) -> int | None:
    """``axis`` made non-negative; raises for one outside ``-ndim..ndim-1``."""
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis!r} is out of range for a {ndim}-D tensor; use an axis in "
                         f"{-ndim}..{ndim - 1}, or axis=None for one scale per tensor.")
    return axis % ndim


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)``: ``(-2^(b-1), 2^(b-1)-1)`` symmetric, ``(0, 2^b-1)`` not.

    ``qrange(8, True) == (-128, 127)``; ``qrange(4, False) == (0, 15)``. Introduced in Chapter 5.
    """
    _check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


@dataclass(frozen=True, eq=False)
class QParams:
    """Scale and zero point of one quantizer: 0-d tensors per tensor, ``(C,)`` along ``axis``.

    ``zero_point`` holds int32 values (torch's per-channel kernel needs int32); it is 0 when
    ``symmetric``. Introduced in Chapter 5.
    """

    scale: Tensor
    zero_point: Tensor
    bits: int
    symmetric: bool
    axis: int | None

    def __post_init__(self) -> None:
        _check_bits(self.bits)

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return qrange(self.bits, self.symmetric)[1]


def _broadcast(qp: QParams, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` shaped to broadcast against ``x``; raises for a mismatch."""
    axis = _check_axis(qp.axis, x.dim())
    channels = 1 if axis is None else x.shape[axis]
    if qp.scale.numel() != channels or qp.zero_point.numel() != channels:
        where = "per tensor" if axis is None else f"along axis {qp.axis}"
        raise ValueError(f"the qparams hold {qp.scale.numel()} scale(s) but x of shape {tuple(x.shape)} needs "
                         f"{channels} {where}; compute them with choose_qparams(x, axis={qp.axis}).")
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = channels
    s = qp.scale.to(x.device, torch.float32).reshape(shape)
    return s, qp.zero_point.to(x.device, torch.float32).reshape(shape)


def round_ste(v: Tensor) -> Tensor:
    r"""Round half to even in the forward pass, identity in the backward pass (straight-through):
    :math:`\partial\,\mathrm{round\_ste}(v)/\partial v = 1`. Introduced in Chapter 5."""
    return v + (v.round() - v).detach()


def quantize(x: Tensor, qp: QParams) -> Tensor:
    r"""Integer codes :math:`q = \mathrm{clamp}(\mathrm{round}(x/s) + z,\ q_{min}, q_{max})`, int32,
    the shape of x.

    Introduced in Chapter 5.
    """
    s, z = _broadcast(qp, x)
    return torch.clamp(torch.round(x * (1.0 / s)) + z, qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: Tensor, qp: QParams) -> Tensor:
    r"""Float values :math:`\hat x = s\,(q - z)` of integer codes ``q`` (any shape). Introduced in Chapter 5."""
    s, z = _broadcast(qp, q)
    return (q.to(torch.float32) - z) * s


def fake_quantize(x: Tensor, qp: QParams) -> Tensor:
    r"""``dequantize(quantize(x))`` computed in float, differentiable by the straight-through estimator.

    .. math:: \hat x = s\,(\mathrm{clamp}(\mathrm{round}(x/s) + z,\ q_{min}, q_{max}) - z), \qquad
              \partial \hat x / \partial x = 1 \text{ inside the range, } 0 \text{ outside (clipped)}.

    (In float the 1 is s · (1/s), which can be one ulp off.) Any shape; ``qp.axis`` picks the dim
    its scales run along. Introduced in Chapter 5.
    """
    s, z = _broadcast(qp, x)
    q = torch.clamp(round_ste(x * (1.0 / s)) + z, qp.qmin, qp.qmax)  # clamp's gradient is the range mask
    return (q - z) * s


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """``x`` as ``(C, M)``: one row per channel along ``axis`` (``C = 1`` per tensor)."""
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, axis: int | None) -> QParams:
    """QParams covering ``[lo, hi]`` (each ``(C,)``) by the module's conventions."""
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)                     # 0 must be exact
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=_EPS)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    if axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    return QParams(scale.float(), zero, bits, symmetric, axis)


def _percentile_range(rows: Tensor, percentile: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Nearest-rank percentile per row of ``(C, M)``: of |x| if symmetric, else of each tail."""
    k = min(max(math.ceil(percentile / 100 * rows.shape[1]), 1), rows.shape[1])
    if symmetric:
        a = rows.abs().kthvalue(k, dim=1).values
        return -a, a
    return -(-rows).kthvalue(k, dim=1).values, rows.kthvalue(k, dim=1).values


def _mse_range(rows: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool,
               grid: int) -> tuple[Tensor, Tensor]:
    """Shrink ``[lo, hi]`` by the factor in {1, (G-1)/G, ..., 1/G} with the least squared error, per row.

    Factors are tried in chunks (all rows at once, ~16M values per chunk); among equal errors the
    widest range (the first factor tried) wins, so min-max itself is kept unless beaten strictly.
    """
    alphas = torch.arange(grid, 0, -1, dtype=torch.float32, device=rows.device) / grid   # 1 first
    chunk = max(1, (1 << 24) // max(1, rows.numel()))
    errors = []
    for a in alphas.split(chunk):
        k, C = len(a), len(rows)
        qp = _qparams_from_range((a[:, None] * lo).flatten(), (a[:, None] * hi).flatten(), bits, symmetric, axis=0)
        tiled = rows.repeat(k, 1)                                      # (k*C, M)
        errors.append((fake_quantize(tiled, qp) - tiled).pow(2).sum(dim=1).view(k, C))
    best = torch.cat(errors).argmin(dim=0)                             # first minimum = widest range
    return alphas[best] * lo, alphas[best] * hi


def _quantiles(rows: Tensor, levels: list[float]) -> Tensor:
    """Each row's quantiles at ``levels``, ``(len(levels), C)``, by ``torch.quantile``'s rule (linear interpolation
    between the sorted values, ``lerp`` as it does), without its limit of 2^24 values. Extreme levels, which the
    percentile search asks for, need only the few smallest and largest values: those come from ``topk``."""
    n = rows.shape[1]
    q = torch.tensor(levels, dtype=rows.dtype, device=rows.device)
    ranks = q * (n - 1)
    below = ranks.floor().long()
    above = ranks.ceil().long().clamp(max=n - 1)
    k = int(torch.maximum(torch.where(q <= 0.5, above + 1, 0), torch.where(q > 0.5, n - below, 0)).max())
    if 4 * k < n:                                                    # order statistics from both ends only
        ends = torch.cat([rows.topk(k, dim=1, largest=False).values, rows.topk(k, dim=1).values.flip(1)], 1)
        position = lambda i: torch.where(i < k, i, i - (n - 2 * k))  # noqa: E731  (index into `ends`)
        ordered, below_at, above_at = ends, position(below), position(above)
    else:
        ordered, below_at, above_at = rows.sort(dim=1).values, below, above
    weights = (ranks - below.to(rows.dtype))[:, None]
    return torch.lerp(ordered[:, below_at].T, ordered[:, above_at].T, weights)


def _percentile_search_range(rows: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The range among the quantile pairs ``(1 - p, p)``, p in :data:`SEARCH_PERCENTILES` (of |x| when
    symmetric), with the least squared error per row; on a tie the first p tried wins, as in the official
    code's strict ``score < best_score``."""
    ps = list(SEARCH_PERCENTILES)
    if symmetric:
        his = _quantiles(rows.abs(), ps)
        los = -his
    else:
        q = _quantiles(rows, [1.0 - p for p in ps] + ps)
        los, his = q[:len(ps)], q[len(ps):]
    best_err, best_lo, best_hi = None, None, None
    for lo, hi in zip(los, his):
        err = (fake_quantize(rows, _qparams_from_range(lo, hi, bits, symmetric, axis=0)) - rows).pow(2).sum(1)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _check_method(method: str, percentile: float, grid: int) -> None:
    check_choice("method", method, METHODS)
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile!r} must lie in (0, 100], e.g. percentile=99.9.")
    check_count("grid", grid, 80)


def _choose(rows: Tensor, lo: Tensor, hi: Tensor, bits: int, symmetric: bool, axis: int | None,
            method: str, percentile: float, grid: int) -> QParams:
    """QParams from ``rows`` (C, M) of samples and the running range ``[lo, hi]`` (each (C,))."""
    if method == "percentile":
        lo, hi = _percentile_range(rows, percentile, symmetric)
    elif method == "mse":
        lo, hi = _mse_range(rows, lo, hi, bits, symmetric, grid)
    elif method == "percentile_search":
        lo, hi = _percentile_search_range(rows, bits, symmetric)
    return _qparams_from_range(lo, hi, bits, symmetric, axis)


def choose_qparams(x: Tensor, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                   method: str = "minmax", percentile: float = 99.9, grid: int = 80) -> QParams:
    r"""Scale and zero point for ``x`` (any shape), per tensor or along ``axis``.

    ``method``: ``"minmax"`` covers [min, max]; ``"percentile"`` clips at that nearest-rank
    percentile of |x| (symmetric) or of each tail; ``"mse"`` shrinks [min, max] by the factor among
    ``grid`` points in (0, 1] that gives the least :math:`\sum (\hat x - x)^2` (per channel), so its
    error is never above min-max's (factor 1); ``"percentile_search"`` is what PTQ4DiT's and Q-Diffusion's
    code call "mse": of the ranges from the quantiles (1 - p, p), p in {0.999, 0.9999, 0.99999}
    (``torch.quantile``, linear interpolation; of |x| if symmetric), the one with the least squared
    error. Like every method here it widens the range to hold 0 (the official code does not), so the two
    differ only on a tensor whose values all lie on one side of 0. Rounding z can move the grid by up to s/2, so min or max may lie just outside it; their
    error is still at most s/2.

    Worked example, asymmetric 8-bit min-max of x = [-1.0, 0.5, 2.0]: s = (2 - (-1)) / 255 = 0.011765,
    z = round(0 + 1/s) = round(85.0) = 85; 0.5 → q = round(42.5) + 85 = 42 + 85 = 127 (half to even),
    x̂ = s (127 - 85) = 0.4941. Raises for bits outside 2..16, a bad axis, method or percentile.
    Introduced in Chapter 5.
    """
    _check_bits(bits)
    _check_method(method, percentile, grid)
    axis = _check_axis(axis, x.dim())
    rows = _rows(x.detach().float(), axis)                            # (C, M)
    return _choose(rows, rows.amin(1), rows.amax(1), bits, symmetric, axis, method, percentile, grid)


# ============================================================================ 2. learned step size
def grad_scale(v: Tensor, g: float) -> Tensor:
    """``v`` in the forward pass, its gradient multiplied by ``g`` in the backward pass (LSQ).
    Introduced in Chapter 5."""
    return (v - v * g).detach() + v * g


class LSQQuantizer(nn.Module):
    r"""Learned step size quantization (Esser et al. 2020, "LSQ"): the step ``s`` is a parameter.

    .. math:: \hat x = \mathrm{round}(\mathrm{clamp}(x/s, q_{min}, q_{max}))\,s, \qquad
              \partial \hat x/\partial s = \begin{cases} -x/s + \mathrm{round}(x/s) & \text{inside} \\
              q_{min} \text{ or } q_{max} & \text{clipped below / above} \end{cases}

    and the step's gradient is scaled by :math:`g = 1/\sqrt{N q_{max}}`, N the elements per
    step in the call (for activations this counts the batch too). ``symmetric=False`` is LSQ's
    unsigned grid [0, 2^b-1] for non-negative inputs, with no zero point. Call :meth:`init_from`
    before training. Any input shape. Introduced in Chapter 5.
    """

    def __init__(self, bits: int = 4, symmetric: bool = True, axis: int | None = None) -> None:
        super().__init__()
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.step = nn.Parameter(torch.ones(()))
        self.initialized = False

    def init_from(self, x: Tensor, method: str = "minmax") -> LSQQuantizer:
        """Set the step to :func:`choose_qparams`' scale for ``x`` (unsigned: for ``x`` clamped at 0)."""
        source = x if self.symmetric else x.clamp(min=0)
        qp = choose_qparams(source, self.bits, self.symmetric, self.axis, method)
        self.step = nn.Parameter(qp.scale.clone())
        self.initialized = True
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.initialized:
            raise RuntimeError("LSQQuantizer has no step yet; call quantizer.init_from(x) first.")
        g = 1.0 / math.sqrt(x.numel() / self.step.numel() * self.qmax)
        s = grad_scale(self.step, g)
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        s = s.reshape(shape)
        return round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s


# ============================================================================ 3. observer + fake quantizer
def _reservoir_add(reservoir: Tensor, seen: int, rows: Tensor, cap: int, gen: torch.Generator) -> Tensor:
    """Algorithm R over rows: the i-th row seen replaces a uniform slot with probability cap / i."""
    fill = min(cap - len(reservoir), len(rows))
    reservoir = torch.cat([reservoir, rows[:fill].cpu()])
    rest, n = rows[fill:], seen + fill
    if len(rest) == 0:
        return reservoir
    i = n + torch.arange(1, len(rest) + 1, dtype=torch.float64)
    slot = (torch.rand(len(rest), generator=gen, dtype=torch.float64) * i).long()
    keep = torch.nonzero(slot < cap).squeeze(1)
    winner = torch.full((cap,), -1, dtype=torch.long)
    winner.scatter_reduce_(0, slot[keep], keep, reduce="amax")        # a later row wins a shared slot
    hit = torch.nonzero(winner >= 0).squeeze(1)
    reservoir[hit] = rest[winner[hit].to(rows.device)].cpu()
    return reservoir


class Quantizer(nn.Module):
    """A fake quantizer with an observer; ``bits`` is what the memory accounting reads.

    States: ``observing`` records each input's running min/max (per channel along ``axis``) and a
    seeded reservoir of at most ``reservoir_size`` values (rows of C values when per-channel) for
    percentile/MSE; ``enabled`` fake-quantizes (else passes through); ``qparams`` is None until
    :meth:`compute_qparams` or :meth:`compute_qparams_from`. To observe by hand, set
    ``observing=True, enabled=False``. Input and output: any shape. Introduced in Chapter 5.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, axis: int | None = None, method: str = "minmax",
                 percentile: float = 99.9, grid: int = 80, reservoir_size: int = 65_536, seed: int = 0) -> None:
        super().__init__()
        _check_bits(bits)
        _check_method(method, percentile, grid)
        check_count("reservoir_size", reservoir_size, 65_536)
        self.bits, self.symmetric, self.axis, self.method = bits, symmetric, axis, method
        self.percentile, self.grid, self.reservoir_size, self.seed = percentile, grid, reservoir_size, seed
        self.observing, self.enabled = False, True
        self.qparams: QParams | None = None
        self.step: nn.Parameter | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the observed statistics (the qparams stay)."""
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self.reservoir = torch.empty(0, 0)
        self.seen = 0
        self.generator = torch.Generator().manual_seed(self.seed)

    def observe(self, x: Tensor) -> None:
        """Add ``x``'s values to the running min/max and (for percentile and MSE ranges) the reservoir."""
        rows = _rows(x.detach().float(), _check_axis(self.axis, x.dim())).T      # (M, C)
        lo, hi = rows.amin(0).cpu(), rows.amax(0).cpu()
        if self.min_val is not None and lo.shape != self.min_val.shape:
            raise ValueError(f"this quantizer observed {self.min_val.numel()} channels before and now "
                             f"{lo.numel()}; use one quantizer per input shape.")
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        if self.method != "minmax":                                   # min-max needs no samples
            cap = max(1, self.reservoir_size // rows.shape[1])
            start = self.reservoir if self.seen else rows.new_empty(0, rows.shape[1]).cpu()
            self.reservoir = _reservoir_add(start, self.seen, rows, cap, self.generator)
        self.seen += len(rows)

    def compute_qparams(self) -> QParams:
        """QParams from what was observed (min/max for ``"minmax"``, the reservoir otherwise)."""
        if self.min_val is None:
            raise RuntimeError("this quantizer has observed nothing; run calibrate(model, run) first.")
        self.qparams = _choose(self.reservoir.T, self.min_val, self.max_val, self.bits, self.symmetric,
                               self.axis, self.method, self.percentile, self.grid)
        self._restart_step()
        return self.qparams

    def _restart_step(self) -> None:
        """A learned step (if any) restarts from newly computed qparams."""
        if self.step is not None:
            with torch.no_grad():
                self.step.copy_(self.qparams.scale)

    def compute_qparams_from(self, x: Tensor) -> QParams:
        """QParams straight from a tensor (a weight): :func:`choose_qparams` with this quantizer's settings."""
        self.qparams = choose_qparams(x, self.bits, self.symmetric, self.axis, self.method,
                                      self.percentile, self.grid)
        self._restart_step()
        return self.qparams

    def learn_step(self) -> nn.Parameter:
        r"""Make the step size trainable: a Parameter ``step`` starting at the calibrated scale, used
        (clamped at float32's eps) in place of ``qparams.scale`` from now on; the zero point stays fixed.

        Through :func:`fake_quantize`'s straight-through estimator its gradient is LSQ's (without
        LSQ's gradient scaling): :math:`\partial\hat x/\partial s = \mathrm{round}(x/s) - x/s` inside
        the range, :math:`q_{max} - z` or :math:`q_{min} - z` where clipped. Returns the Parameter
        (the same one on a second call). Introduced in Chapter 6.
        """
        if self.qparams is None:
            raise RuntimeError("this quantizer has no qparams to start the step from; calibrate first with "
                               "calibrate(model, run) or quantizer.compute_qparams_from(tensor).")
        if self.step is None:
            self.step = nn.Parameter(self.qparams.scale.detach().clone())
        return self.step

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        if self.qparams is None:
            raise RuntimeError("this quantizer has no qparams yet; calibrate first with calibrate(model, run) "
                               "or quantizer.compute_qparams_from(tensor).")
        qp = self.qparams if self.step is None else replace(self.qparams, scale=self.step.clamp(min=_EPS))
        return fake_quantize(x, qp)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, axis={self.axis}, method={self.method!r}"


# ============================================================================ 4. quantized layers
class _QuantLayer(nn.Module):
    """Shared by QuantLinear and QuantConv2d: the float layer's own Parameters, a per-output-channel
    weight quantizer and optional activation quantizers (one, or one per time step)."""

    def __init__(self, layer: nn.Module, weight_bits: int = 8, act_bits: int | None = 8, *,
                 weight_symmetric: bool = False, weight_method: str = "mse", act_symmetric: bool = False,
                 act_method: str = "minmax", timesteps: int | None = None, name: str = "") -> None:
        super().__init__()
        if timesteps is not None:
            check_count("timesteps", timesteps, 10)
            if act_bits is None:
                raise ValueError(f"timesteps={timesteps} needs act_bits: per-time-step quantizers "
                                 "quantize activations.")
        object.__setattr__(self, "_float_module", layer)   # kept out of the module tree: no duplicate state
        self.weight, self.bias, self.name = layer.weight, layer.bias, name
        self.weight_quantizer = Quantizer(weight_bits, weight_symmetric, axis=0, method=weight_method)
        self.weight_quantizer.compute_qparams_from(self.weight.detach())

        def make() -> Quantizer:
            return Quantizer(act_bits, act_symmetric, None, act_method)

        per_step = act_bits is not None and timesteps is not None
        self.input_quantizer = make() if act_bits is not None and not per_step else None
        self.input_quantizers = nn.ModuleList(make() for _ in range(timesteps)) if per_step else None
        self.timestep_index: int | None = None
        self.enabled = True

    @classmethod
    def from_float(cls, layer: nn.Module, weight_bits: int = 8, act_bits: int | None = 8,
                   **kwargs: object) -> _QuantLayer:
        """Wrap ``layer`` (its weight and bias Parameters are shared, not copied)."""
        return cls(layer, weight_bits, act_bits, **kwargs)

    @property
    def float_module(self) -> nn.Module:
        """The original float layer (same Parameters)."""
        return self._float_module

    @property
    def weight_bits(self) -> int:
        """Bits of the weight codes."""
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        """Bits of the activation codes, None when activations stay float."""
        q = self.input_quantizer or (self.input_quantizers[0] if self.input_quantizers is not None else None)
        return None if q is None else q.bits

    def input_quantizer_list(self) -> list[Quantizer]:
        """Every activation quantizer of this layer (0, 1 or one per time step)."""
        return [self.input_quantizer] if self.input_quantizer is not None else list(self.input_quantizers or [])

    def active_input_quantizer(self) -> Quantizer | None:
        """The activation quantizer for this call: the single one, or the one at ``timestep_index``."""
        if self.input_quantizers is None:
            return self.input_quantizer
        if self.timestep_index is None:
            raise RuntimeError(f"layer {self.name!r} has {len(self.input_quantizers)} per-time-step activation "
                               "quantizers but no time-step index; call set_timestep_index(model, i) or use "
                               "`with timestep_index(model, i):` first.")
        return self.input_quantizers[self.timestep_index]

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self._layer_forward(x, self.weight)              # exactly the float layer
        q = self.active_input_quantizer()
        if q is not None and q.enabled and q.qparams is None:
            raise RuntimeError(f"layer {self.name!r} has no activation qparams yet; run calibrate(model, run) "
                               "first, or quantize with act_bits=None.")
        return self._layer_forward(x if q is None else q(x), self.weight_quantizer(self.weight))

    def extra_repr(self) -> str:
        steps = f", per_timestep={len(self.input_quantizers)}" if self.input_quantizers is not None else ""
        bits = f"W{self.weight_bits}A{self.act_bits or 'fp'}"
        return f"{self._float_module.extra_repr()}, {bits}{steps}, enabled={self.enabled}"


class QuantLinear(_QuantLayer):
    """``nn.Linear`` with fake-quantized weight (per output channel, default asymmetric MSE as in
    PTQ4DiT) and input (per tensor, default asymmetric min-max; ``act_bits=None`` keeps it float).
    Input (..., D_in) → output (..., D_out). Build with :meth:`from_float`. Introduced in Chapter 5.
    """

    in_features = property(lambda self: self._float_module.in_features)
    out_features = property(lambda self: self._float_module.out_features)

    def _layer_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantConv2d(_QuantLayer):
    """``nn.Conv2d`` with fake-quantized weight and input, as :class:`QuantLinear`.
    Input (B, C_in, H, W) → output (B, C_out, H', W'). Introduced in Chapter 5.
    """

    in_channels = property(lambda self: self._float_module.in_channels)
    out_channels = property(lambda self: self._float_module.out_channels)

    def _layer_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._float_module._conv_forward(x, weight, self.bias)  # keeps padding_mode, stride, groups


_WRAPPERS = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def _matches(name: str, rule: Callable[[str], bool] | Collection[str]) -> bool:
    """The one naming rule: a callable decides; a collection matches a layer named by an entry or
    inside a module named by one (``"blocks.0"`` matches ``"blocks.0.attn.to_q"``, not ``"blocks.01"``)."""
    if callable(rule):
        return bool(rule(name))
    return any(name == entry or name.startswith(entry + ".") for entry in rule)


def _check_rule(label: str, rule: object) -> None:
    if isinstance(rule, str):
        raise TypeError(f"{label}={rule!r} must be a collection of names such as [{rule!r}] or a callable.")


def _layers(model: nn.Module) -> list[tuple[str, _QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def quantize_model(model: nn.Module, weight_bits: int, act_bits: int | None, *,
                   include: Callable[[str], bool] | Collection[str] | None = None,
                   exclude: Callable[[str], bool] | Collection[str] = (), timesteps: int | None = None,
                   weight_method: str = "mse", act_method: str = "minmax", weight_symmetric: bool = False,
                   act_symmetric: bool = False) -> list[str]:
    """Swap, in place, every layer of type exactly ``nn.Linear`` / ``nn.Conv2d`` (not ``model`` itself,
    nor subclasses such as ``nn.MultiheadAttention``'s ``out_proj``, whose forward never runs) that
    ``include`` takes and ``exclude`` does not for :class:`QuantLinear` / :class:`QuantConv2d`,
    computing weight qparams at once; activations need :func:`calibrate`. Returns the swapped names.

    Both filters follow one rule: a callable ``name -> bool``, or a collection of qualified names,
    each naming a layer or a module whose layers all match (``exclude=["proj_out_2", "transformer_blocks.0"]``).
    ``include=None`` takes all. Raises if nothing matches. Introduced in Chapter 5.
    """
    _check_rule("include", include)
    _check_rule("exclude", exclude)
    chosen = [(n, m) for n, m in model.named_modules() if n and type(m) in _WRAPPERS
              and (include is None or _matches(n, include)) and not _matches(n, exclude)]
    if not chosen:
        raise ValueError(f"quantize_model found no nn.Linear or nn.Conv2d to swap with include={include!r}, "
                         f"exclude={exclude!r}; list the names with [n for n, _ in model.named_modules()].")
    for name, layer in chosen:
        _swap(model, name, _WRAPPERS[type(layer)](
            layer, weight_bits, act_bits, weight_symmetric=weight_symmetric, weight_method=weight_method,
            act_symmetric=act_symmetric, act_method=act_method, timesteps=timesteps, name=name))
    return [name for name, _ in chosen]


def restore_float(model: nn.Module) -> list[str]:
    """Put the original float layers (same Parameters) back in place of every wrapper; returns their names.

    Introduced in Chapter 5.
    """
    layers = _layers(model)
    for name, layer in layers:
        _swap(model, name, layer.float_module)
    return [name for name, _ in layers]


def _quantized_layers(model: nn.Module, what: str) -> list[tuple[str, _QuantLayer]]:
    layers = _layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no quantized layers; call quantize_model(model, ...) first.")
    return layers


def set_timestep_index(model: nn.Module, index: int | None) -> None:
    """Route every wrapper's activations to its quantizer number ``index`` (None clears it).

    Introduced in Chapter 5.
    """
    for name, layer in _quantized_layers(model, "set_timestep_index"):
        count = len(layer.input_quantizers) if layer.input_quantizers is not None else None
        if index is not None and count is not None and not (isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"index={index!r} is out of range for layer {name!r}'s {count} per-time-step "
                             f"quantizers; use 0..{count - 1}.")
        layer.timestep_index = index


@contextmanager
def timestep_index(model: nn.Module, index: int) -> Iterator[None]:
    """``with timestep_index(model, i):`` sets the index as :func:`set_timestep_index` and restores
    each layer's previous one afterwards. Introduced in Chapter 5."""
    previous = [(layer, layer.timestep_index) for _, layer in _quantized_layers(model, "timestep_index")]
    set_timestep_index(model, index)
    try:
        yield
    finally:
        for layer, old in previous:
            layer.timestep_index = old


def _observe_input(layer: _QuantLayer, args: tuple) -> None:
    """Forward pre-hook: hand the layer's input (args[0]) to the active activation quantizer."""
    layer.active_input_quantizer().observe(args[0])


def calibrate(model: nn.Module, run: Callable[[], object]) -> None:
    """Compute every activation quantizer's qparams from the inputs its layer sees while ``run()``
    calls the model under ``torch.no_grad()``.

    Observation uses a forward pre-hook on each wrapper, removed afterwards even if ``run()`` raises;
    statistics start afresh, activations pass through in float meanwhile (weights stay as they are).
    With per-time-step quantizers, ``run()`` sets the index (:func:`timestep_index`) and each index
    must see data. Introduced in Chapter 5.
    """
    layers = [(n, m) for n, m in _quantized_layers(model, "calibrate") if m.input_quantizer_list()]
    if not layers:
        raise ValueError("calibrate: no layer quantizes activations; "
                         "call quantize_model with act_bits=8, not None.")
    quantizers = [q for _, layer in layers for q in layer.input_quantizer_list()]
    was_enabled = [q.enabled for q in quantizers]
    handles = []
    try:
        for q in quantizers:
            q.reset()
            q.enabled = False
        handles = [layer.register_forward_pre_hook(_observe_input) for _, layer in layers]
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
        for q, enabled in zip(quantizers, was_enabled):
            q.enabled = enabled
    for name, layer in layers:
        for i, q in enumerate(layer.input_quantizer_list()):
            if q.seen == 0 and layer.input_quantizers is not None:
                raise RuntimeError(f"calibrate: layer {name!r} time-step quantizer {i} saw no input; "
                                   f"make run() call the model with set_timestep_index(model, {i}).")
            if q.seen == 0:
                raise RuntimeError(f"calibrate: layer {name!r} activation quantizer saw no input; make run() "
                                   f"call the model, or leave the layer out with exclude=[{name!r}].")
            q.compute_qparams()


def set_quantization(model: nn.Module, enabled: bool,
                     names: Callable[[str], bool] | Collection[str] | None = None) -> list[str]:
    """Switch weight and activation quantization on or off for all wrappers, or those ``names`` selects
    (the rule of :func:`quantize_model`); off gives exactly the float layer's output. Returns the names.

    Introduced in Chapter 5.
    """
    _check_rule("names", names)
    layers = _quantized_layers(model, "set_quantization")
    chosen = [(n, m) for n, m in layers if names is None or _matches(n, names)]
    if not chosen:
        raise ValueError(f"set_quantization: names={names!r} matches no quantized layer.")
    for _, layer in chosen:
        layer.enabled = bool(enabled)
    return [n for n, _ in chosen]


def quantization_report(model: nn.Module) -> list[dict]:
    """One row per wrapper: name, kind, in_features, out_features (channels for Conv2d), weight_bits,
    act_bits (None = float), per_timestep (number of time-step quantizers, 0 if none), enabled.

    Introduced in Chapter 5.
    """
    rows = []
    for name, layer in _layers(model):
        linear = isinstance(layer, QuantLinear)
        rows.append({"name": name, "kind": "Linear" if linear else "Conv2d",
                     "in_features": layer.in_features if linear else layer.in_channels,
                     "out_features": layer.out_features if linear else layer.out_channels,
                     "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
                     "per_timestep": len(layer.input_quantizers) if layer.input_quantizers is not None else 0,
                     "enabled": layer.enabled})
    return rows


def format_report(rows: list[dict]) -> str:
    """:func:`quantization_report`'s rows as a plain text table, one line per layer. Introduced in Chapter 5."""
    if not rows:
        return "(no quantized layers)"
    keys = list(rows[0])
    cells = [keys] + [["fp" if r[k] is None else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# ============================================================================ 5. torch's int8 CPU kernels
@contextmanager
def _no_ao_deprecation() -> Iterator[None]:
    # torch.ao.quantization and quantized tensors (quint8/qint8) are deprecated in torch 2.13, and say
    # so once per process; the book's stored outputs must stay free of warnings, so hide exactly those.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated", category=UserWarning)
        yield


def int8_engine() -> str:
    """The quantized CPU engine torch uses here (``torch.backends.quantized.engine``: x86 by default,
    which runs fbgemm or oneDNN kernels; qnnpack on ARM). Introduced in Chapter 5."""
    return torch.backends.quantized.engine


class StaticInt8Linear(nn.Module):
    """Static int8 Linear: quantize the input per tensor with fixed qparams (quint8), run torch's
    ``quantized.Linear`` (int8 weights, output requantized), dequantize. (B, D_in) → (B, D_out) float.

    Introduced in Chapter 5.
    """

    def __init__(self, qlinear: nn.Module, input_scale: float, input_zero_point: int) -> None:
        super().__init__()
        self.qlinear, self.input_scale, self.input_zero_point = qlinear, input_scale, input_zero_point

    def forward(self, x: Tensor) -> Tensor:
        with _no_ao_deprecation():
            xq = torch.quantize_per_tensor(x, self.input_scale, self.input_zero_point, torch.quint8)
            return self.qlinear(xq).dequantize()


def _int8_weight(weight: Tensor) -> tuple[Tensor, QParams]:
    """Per-output-channel symmetric int8 weight as a torch quantized tensor, and its QParams."""
    qp = choose_qparams(weight.detach(), bits=8, symmetric=True, axis=0)
    with _no_ao_deprecation():
        qw = torch.quantize_per_channel(weight.detach(), qp.scale.double(), qp.zero_point.long(), 0,
                                        torch.qint8)
    return qw, qp


def int8_linear(linear: nn.Linear, mode: str = "dynamic", input_qparams: QParams | None = None,
                example_input: Tensor | None = None, reduce_range: bool | None = None) -> nn.Module:
    """``linear`` on torch's int8 CPU kernels with per-output-channel symmetric int8 weights.

    ``"dynamic"``: ``torch.ao.nn.quantized.dynamic.Linear`` quantizes activations on the fly.
    ``"static"``: :class:`StaticInt8Linear`, with input qparams ``input_qparams`` (per tensor, ≤ 8
    bits, shifted onto quint8's [0, 255]) or min-max of ``example_input`` (B, D_in), which also
    fixes the output's qparams and so is required. ``reduce_range`` (default: on for the x86/fbgemm
    engines, as torch's default qconfig) uses 7-bit inputs, so fbgemm's 16-bit accumulation cannot
    saturate (on a CPU without VNNI it adds pairs of u8·s8 products in int16, which 8-bit inputs can
    overflow: tests/test_quant.py); with it on, ``input_qparams`` of more than 7 bits raise ``ValueError``. ``reduce_range=False`` is safe on CPUs with VNNI or AMX.
    torch.ao.quantization is deprecated; its successor is torchao. Introduced in Chapter 5.
    """
    check_choice("mode", mode, ("dynamic", "static"))
    if type(linear) is not nn.Linear:
        raise TypeError(f"int8_linear needs an nn.Linear, not {type(linear).__name__}; "
                        "for a QuantLinear pass layer.float_module.")
    qw, _ = _int8_weight(linear.weight)
    bias = None if linear.bias is None else linear.bias.detach()
    with _no_ao_deprecation():
        from torch.ao.nn import quantized as nnq
        from torch.ao.nn.quantized import dynamic as nnqd
        if mode == "dynamic":
            module = nnqd.Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
            module.set_weight_bias(qw, bias)
            return module
        if example_input is None:
            raise ValueError("mode='static' needs example_input (B, D_in) to fix the output's qparams; "
                             "pass a few calibration rows.")
        reduce_range = int8_engine() in ("x86", "fbgemm") if reduce_range is None else reduce_range
        x = example_input.detach().float()
        qp_in = choose_qparams(x, bits=7 if reduce_range else 8) if input_qparams is None else input_qparams
        if qp_in.axis is not None or qp_in.bits > 8:
            raise ValueError("input_qparams must be per tensor (axis=None) with bits <= 8.")
        if reduce_range and qp_in.bits > 7:
            raise ValueError(f"input_qparams has {qp_in.bits} bits, but with reduce_range the {int8_engine()} "
                             "engine takes 7-bit inputs (its 16-bit accumulation can saturate on 8-bit ones "
                             "without VNNI); choose them with bits=7, or pass reduce_range=False on a CPU with VNNI.")
        qp_out = choose_qparams(F.linear(x, linear.weight.detach(), bias), bits=8)
        module = nnq.Linear(linear.in_features, linear.out_features, dtype=torch.qint8)
        module.set_weight_bias(qw, bias)
        module.scale, module.zero_point = float(qp_out.scale), int(qp_out.zero_point)
    return StaticInt8Linear(module, float(qp_in.scale), int(qp_in.zero_point) - qp_in.qmin)


def int8_bytes(module: nn.Module) -> int:
    """Bytes a runtime stores for the int8 Linears in ``module``: 1 per weight, a float32 scale per
    output channel (zero points are 0 for these symmetric weights) and 4 per bias value.

    Introduced in Chapter 5.
    """
    total, found = 0, False
    with _no_ao_deprecation():
        from torch.ao.nn import quantized as nnq
        for m in module.modules():
            if isinstance(m, nnq.Linear):                       # the dynamic Linear is a subclass
                w, b = m.weight(), m.bias()
                scales = 1 if w.qscheme() == torch.per_tensor_affine else w.q_per_channel_scales().numel()
                total += w.numel() + 4 * scales + (0 if b is None else 4 * b.numel())
                found = True
    if not found:
        raise ValueError("int8_bytes found no torch int8 Linear; build one with int8_linear(layer).")
    return total
