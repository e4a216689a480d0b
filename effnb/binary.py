r"""Binary networks: sign binarizers with their straight-through estimators, binary layers, bit
packing, an XNOR-popcount matrix product (compiled, or in plain torch) and the cost of a binary net.

A technique module (layer 4 of DESIGN.md): it imports :mod:`effnb.config` only and stands alone.
Read it top to bottom in six parts:

1. binarizers: :func:`sign_ste` (BNN / XNOR-Net), :func:`approx_sign` (Bi-Real Net) and the
   ReActNet pair :class:`RSign` (a learned threshold per channel) and :class:`RPReLU`;
2. layers: :class:`BinaryLinear` / :class:`BinaryConv2d`, weights :math:`\alpha\,\mathrm{sign}(W)`;
3. bit packing: :func:`pack_bits` / :func:`unpack_bits`, 64 signs to an int64 word;
4. :func:`binary_matmul`: :math:`A B^\top = K - 2\,\mathrm{popcount}(a \oplus b)` for ±1 rows, as a
   C++ kernel that g++ builds once and caches, or in plain torch (same result, bit for bit);
5. the packed inference path of the two layers and :func:`packed_bytes`, their deployed size;
6. :func:`binary_ops`, the operation count the binary-network papers report.

Conventions.

- :math:`\mathrm{sign}(0) = +1` everywhere (the binarizers, the layers and the packing), so a
  binary value is never 0.
- A packed row holds the sign of element ``k`` in bit ``k % 64`` of word ``k // 64`` (bit 1 for +1,
  bit 0 for -1); the last word is padded with 0 bits. Both operands of :func:`binary_matmul` are
  padded the same way, so padding bits never differ, never count as a mismatch, and
  :math:`K` need not be a multiple of 64.
- The weight scale :math:`\alpha = \mathrm{mean}|W|` per output channel (XNOR-Net) is treated as a
  constant in the backward pass, as ReActNet and Bi-Real Net do; the weight's own gradient is the
  clipped straight-through estimator.
- Zero padding and ±1 activations do not mix: a padded 0 is neither +1 nor -1. A
  :class:`BinaryConv2d` that binarizes its input therefore pads the *real* input (with zeros, or
  by its ``padding_mode``) and binarizes afterwards, so each padded position becomes
  :math:`\mathrm{sign}(0 - \beta_c)`, ±1 like every other entry. The float forward and the packed
  path both do this, and they agree.

Introduced in Chapter 7.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnb.config import check_choice, check_count

try:
    import fcntl
except ImportError:          # Windows: no file locks; a concurrent build there just wastes one compile
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BACKENDS", "BinaryConv2d", "BinaryLinear", "COMPILE_FLAGS", "ESTIMATORS", "OpCount", "RPReLU", "RSign",
    "approx_sign", "binarize_attention", "binarize_weight", "binary_backend", "binary_conv2d_packed", "binary_linear_packed",
    "binary_matmul", "binary_ops", "build_library", "cache_dir", "cache_key", "pack_bits", "pack_conv2d_input",
    "pack_conv2d_weight", "packed_bytes",
    "dynamic_sign", "popcount_support", "sign_ste", "unpack_bits", "weight_scale",
]

ESTIMATORS: tuple[str, ...] = ("ste", "approx")
BACKENDS: tuple[str, ...] = ("auto", "compiled", "torch")
COMPILE_FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


# ============================================================================ 1. binarizers
def _sign(x: Tensor) -> Tensor:
    """+1 where x >= 0 (so sign(0) = +1), else -1, in x's dtype; no gradient."""
    return (x >= 0).to(x.dtype) * 2 - 1


def sign_ste(x: Tensor) -> Tensor:
    r"""Sign with the clipped straight-through estimator (BNN, Hubara et al. 2016; XNOR-Net, Rastegari et al. 2016).

    .. math:: q(x) = \mathrm{sign}(x) = \begin{cases} +1 & x \ge 0 \\ -1 & x < 0 \end{cases}, \qquad
              \frac{\partial q}{\partial x} = 1_{|x| \le 1}

    sign(0) = +1. The gradient passes unchanged inside [-1, 1] and is clipped to 0 outside.
    Any shape. Introduced in Chapter 7.
    """
    clipped = x.clamp(-1.0, 1.0)                               # ∂clipped/∂x = 1{|x| ≤ 1}
    return _sign(x) + (clipped - clipped.detach())             # forward: sign(x) + 0 exactly


def approx_sign(x: Tensor) -> Tensor:
    r"""Sign with Bi-Real Net's piecewise polynomial estimator (Liu et al. 2018, "ApproxSign").

    .. math:: q(x) = \mathrm{sign}(x), \qquad
              \frac{\partial q}{\partial x} = \begin{cases} 2 - 2|x| & |x| < 1 \\ 0 & \text{otherwise} \end{cases}

    the derivative of :math:`F(x) = 2x - x|x|` on [-1, 1] (and ±1 outside), a closer fit to sign than
    the clipped identity. sign(0) = +1. Any shape. Introduced in Chapter 7.
    """
    clipped = x.clamp(-1.0, 1.0)
    poly = 2 * clipped - clipped * clipped.abs()               # F(x); ∂F/∂x = 2 - 2|x| inside, 0 outside
    return _sign(x) + (poly - poly.detach())


def _per_channel(v: Tensor, x: Tensor, dim: int, owner: str) -> Tensor:
    """The ``(C,)`` parameter ``v`` shaped to broadcast along ``x``'s dim ``dim``; raises for a mismatch."""
    if not -x.dim() <= dim < x.dim() or x.shape[dim] != v.numel():
        raise ValueError(f"{owner}(channels={v.numel()}) got x of shape {tuple(x.shape)}, which does not "
                         f"hold {v.numel()} channels along dim {dim}.")
    shape = [1] * x.dim()
    shape[dim] = -1
    return v.reshape(shape)


class RSign(nn.Module):
    r"""ReActNet's sign with a learned threshold per channel (Liu et al. 2020):
    :math:`q(x) = \mathrm{sign}(x - \beta_c)`, so each channel chooses where it splits into ±1.

    ``estimator``: ``"ste"`` (:func:`sign_ste`) or ``"approx"`` (:func:`approx_sign`); the gradient
    reaches :math:`\beta` as :math:`\partial q/\partial \beta_c = -\partial q/\partial x`. ``dim`` is
    the channel dimension: 1 for ``(B, C, H, W)``, -1 for ``(..., D)``. Output: x's shape, ±1.
    Introduced in Chapter 7.
    """

    def __init__(self, channels: int, estimator: str = "ste", dim: int = 1) -> None:
        super().__init__()
        check_count("channels", channels, 64)
        check_choice("estimator", estimator, ESTIMATORS)
        self.beta = nn.Parameter(torch.zeros(channels))
        self.estimator, self.dim, self.bits = estimator, dim, 1

    def shifted(self, x: Tensor) -> Tensor:
        r""":math:`x - \beta_c`, the value whose sign is the output."""
        return x - _per_channel(self.beta, x, self.dim, "RSign")

    def forward(self, x: Tensor) -> Tensor:
        binarize = sign_ste if self.estimator == "ste" else approx_sign
        return binarize(self.shifted(x))

    def extra_repr(self) -> str:
        return f"channels={self.beta.numel()}, estimator={self.estimator!r}, dim={self.dim}"


class RPReLU(nn.Module):
    r"""ReActNet's shifted PReLU: :math:`f(x) = \mathrm{PReLU}_c(x - \gamma_c) + \zeta_c`, with
    :math:`\mathrm{PReLU}_c(u) = u` for :math:`u > 0` and :math:`s_c u` otherwise.

    ``gamma`` and ``zeta`` start at 0 and the slope ``s`` at ``init`` (0.25, as ``nn.PReLU``); ``dim``
    is the channel dimension. Any shape. Introduced in Chapter 7.
    """

    def __init__(self, channels: int, dim: int = 1, init: float = 0.25) -> None:
        super().__init__()
        check_count("channels", channels, 64)
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), float(init)))
        self.zeta = nn.Parameter(torch.zeros(channels))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        u = x - _per_channel(self.gamma, x, self.dim, "RPReLU")
        u = F.prelu(u.movedim(self.dim, 1), self.slope).movedim(1, self.dim)   # PReLU wants channels at dim 1
        return u + _per_channel(self.zeta, x, self.dim, "RPReLU")


def dynamic_sign(x: Tensor, dim: int = -1, estimator: str = "ste") -> Tensor:
    r"""Fine-grained *dynamic* binarization: threshold and scale come from the current input, per row.

    .. math:: \tau = \mathrm{mean}_{\mathrm{dim}}(x), \qquad s = \mathrm{mean}_{\mathrm{dim}}|x - \tau|,
              \qquad x_b = s \cdot \mathrm{sign}(x - \tau)

    so each row (a token's query, key or value vector) splits at its own mean and keeps its own
    magnitude, whatever the input's distribution. ``s`` minimises :math:`\|x - \tau - s\,\mathrm{sign}(x - \tau)\|^2`.
    The sign uses ``estimator``'s gradient; τ and s get their ordinary gradients. Any shape.
    Introduced in Chapter 8 (FBPT's choice, written out by us: the paper gives no formula).
    """
    check_choice("estimator", estimator, ESTIMATORS)
    binarize = sign_ste if estimator == "ste" else approx_sign
    tau = x.mean(dim, keepdim=True)
    scale = (x - tau).abs().mean(dim, keepdim=True)
    return scale * binarize(x - tau)


def binarize_attention(p: Tensor, dim: int = -1) -> Tensor:
    r"""Binarize an attention map row by row against its own mean, keeping rows that sum to one.

    .. math:: b_{ij} = 1[p_{ij} \ge \bar p_i], \qquad \hat p_{ij} = b_{ij} / \textstyle\sum_j b_{ij}

    Each query attends uniformly to the keys it weighs above its average (at least one: the maximum
    is never below the mean), and ignores the rest; the map is a {0, 1} mask times one scale per row.
    The gradient passes straight through to ``p``. Any shape; rows along ``dim``.
    Introduced in Chapter 8 (our choice for FBPT's dynamic attention binarization).
    """
    mask = (p >= p.mean(dim, keepdim=True)).to(p.dtype)
    hard = mask / mask.sum(dim, keepdim=True)
    return p + (hard - p).detach()


# ============================================================================ 2. binary layers
def weight_scale(weight: Tensor) -> Tensor:
    r"""XNOR-Net's scale :math:`\alpha_n = \mathrm{mean}|W_n|` per output channel: ``(N, ...) -> (N,)``,
    no gradient. It minimises :math:`\|W_n - \alpha\,\mathrm{sign}(W_n)\|^2`. Introduced in Chapter 7."""
    return weight.detach().abs().reshape(weight.shape[0], -1).mean(dim=1)


def binarize_weight(weight: Tensor) -> Tensor:
    r""":math:`\alpha\,\mathrm{sign}(W)` with :func:`weight_scale`'s α per output channel and
    :func:`sign_ste`'s gradient. ``(N, ...)`` in and out. Introduced in Chapter 7."""
    alpha = weight_scale(weight).reshape(-1, *[1] * (weight.dim() - 1))      # (N, 1, ...)
    return alpha * sign_ste(weight)


class BinaryLinear(nn.Linear):
    r"""A linear layer with weights :math:`\alpha\,\mathrm{sign}(W)` and, when ``binarize_input``,
    inputs :math:`\mathrm{sign}(x - \beta)` from an :class:`RSign` (``input_binarizer``).

    :math:`y = \mathrm{sign}(x - \beta)\,(\alpha\,\mathrm{sign}(W))^\top + b`; the bias stays float.
    ``bits = 1`` is what the memory accounting reads. ``(..., in_features) -> (..., out_features)``.
    Introduced in Chapter 7.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, *, binarize_input: bool = True, estimator: str = "ste") -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.bits, self.binarize_input = 1, binarize_input
        self.input_binarizer = RSign(in_features, estimator, dim=-1).to(device, dtype) if binarize_input else None

    @classmethod
    def from_float(cls, layer: nn.Linear, binarize_input: bool = True, estimator: str = "ste") -> BinaryLinear:
        """A BinaryLinear holding a copy of ``layer``'s weight and bias."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"BinaryLinear.from_float takes an nn.Linear, got {type(layer).__name__}.")
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, layer.weight.device,
                  binarize_input=binarize_input, estimator=estimator)
        return _copy_parameters(layer, new)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_binarizer is not None:
            x = self.input_binarizer(x)
        return F.linear(x, binarize_weight(self.weight), self.bias)


def _copy_parameters(source: nn.Module, target: nn.Module) -> nn.Module:
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)
    return target


def _pad_input(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``x`` padded as ``conv`` would pad it (zeros, or its ``padding_mode``)."""
    pad = conv._reversed_padding_repeated_twice                      # (left, right, top, bottom)
    if not any(pad):
        return x
    return F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)


class BinaryConv2d(nn.Conv2d):
    r"""A 2-D convolution with weights :math:`\alpha\,\mathrm{sign}(W)` and, when ``binarize_input``,
    inputs :math:`\mathrm{sign}(x - \beta_c)` (ReActNet's binary convolution; Bi-MTDP's building block).

    Takes ``nn.Conv2d``'s arguments, plus ``binarize_input`` and ``estimator``. With
    ``binarize_input`` the real input is padded first and binarized afterwards, so every entry the
    kernel sees is ±1 (module docstring); without it the float input is zero-padded as usual.
    ``bits = 1``. ``(B, C, H, W) -> (B, O, H', W')``. Introduced in Chapter 7.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | None = None, dtype: torch.dtype | None = None,
                 *, binarize_input: bool = True, estimator: str = "ste") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.bits, self.binarize_input = 1, binarize_input
        self.input_binarizer = RSign(in_channels, estimator, dim=1).to(device, dtype) if binarize_input else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, binarize_input: bool = True, estimator: str = "ste") -> BinaryConv2d:
        """A BinaryConv2d with ``conv``'s settings and a copy of its weight and bias."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"BinaryConv2d.from_float takes an nn.Conv2d, got {type(conv).__name__}.")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, conv.weight.device,
                  binarize_input=binarize_input, estimator=estimator)
        return _copy_parameters(conv, new)

    def forward(self, x: Tensor) -> Tensor:
        weight = binarize_weight(self.weight)
        if self.input_binarizer is None:
            return self._conv_forward(x, weight, self.bias)
        x = self.input_binarizer(_pad_input(x, self))                # pad, then binarize: all ±1
        return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)


# ============================================================================ 3. bit packing
# The value of bit j in a two's-complement int64 word: 2^j, and -2^63 for the sign bit.
_BIT_VALUES = torch.tensor([1 << j for j in range(63)] + [-(1 << 63)], dtype=torch.int64)


def pack_bits(x: Tensor) -> Tensor:
    r"""The signs of ``x`` (M, K), 64 to a word: ``(M, ceil(K/64))`` int64.

    Bit ``k % 64`` of word ``k // 64`` is 1 where ``x[:, k] >= 0`` (+1, and sign(0) = +1) and 0
    where it is negative (-1); the last word's unused bits are 0. Example: ``x = [[1, -1, 0]]``
    gives bits 1, 0, 1, i.e. ``[[5]]``. Introduced in Chapter 7.
    """
    if x.dim() != 2:
        raise ValueError(f"pack_bits needs a 2-D (M, K) tensor, got shape {tuple(x.shape)}; "
                         "reshape it first, e.g. x.reshape(-1, x.shape[-1]).")
    M, K = x.shape
    words = -(-K // 64)
    bits = torch.zeros(M, words * 64, dtype=torch.int64, device=x.device)
    bits[:, :K] = (x >= 0).to(torch.int64)                           # padding bits stay 0
    # Distinct powers of two: every partial sum fits in an int64, so the sum is the bitwise OR.
    return (bits.view(M, words, 64) * _BIT_VALUES.to(x.device)).sum(dim=-1)   # (M, W)


def unpack_bits(packed: Tensor, k: int) -> Tensor:
    """The ±1 float32 matrix ``(M, k)`` that :func:`pack_bits` packed into ``packed`` (M, W).
    Introduced in Chapter 7."""
    check_count("k", k, 64)
    shifts = torch.arange(64, device=packed.device)
    bits = (packed[:, :, None] >> shifts) & 1                        # (M, W, 64)
    return bits.reshape(len(packed), -1)[:, :k].float() * 2 - 1


# ============================================================================ 4. the XNOR-popcount matmul
_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def _popcount64(x: Tensor) -> Tensor:
    """Set bits of each int64 (SWAR; the masks clear what the arithmetic shifts drag in from the sign)."""
    x = x - ((x >> 1) & _M1)                                         # 2-bit counts
    x = (x & _M2) + ((x >> 2) & _M2)                                 # 4-bit counts
    x = (x + (x >> 4)) & _M4                                         # 8-bit counts, each <= 8
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)                                                # total in the low byte
    return x & 0x7F


def _matmul_torch(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Plain torch: XOR every pair of rows, count the differing bits; row chunks bound the memory."""
    M, N, W = len(a), len(b), a.shape[1]
    out = torch.empty(M, N, dtype=torch.int32, device=a.device)
    rows = max(1, (1 << 21) // max(1, N * W))                        # ~16 MB of int64 per chunk
    for start in range(0, M, rows):
        differ = a[start:start + rows, None, :] ^ b[None, :, :]      # (m, N, W): 1 where signs differ
        out[start:start + rows] = k - 2 * _popcount64(differ).sum(dim=-1)
    return out


_SOURCE = r"""
#include <cstdint>

// out[i][j] = k - 2 * popcount(a[i] XOR b[j]): the dot product of two rows of +-1 values
// packed 64 to a word (bit 1 = +1); padding bits are 0 in both rows, so they never differ.
// Small products stay on one thread: starting a thread team costs more than they take.
extern "C" void xnor_popcount_matmul(const uint64_t* a, const uint64_t* b, int32_t* out, int64_t m,
                                     int64_t n, int64_t words, int64_t k, int threads) {
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(m * n * words >= 65536)
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
            const uint64_t* ai = a + i * words;
            const uint64_t* bj = b + j * words;
            int64_t differ = 0;
            for (int64_t w = 0; w < words; ++w) differ += __builtin_popcountll(ai[w] ^ bj[w]);
            out[i * n + j] = static_cast<int32_t>(k - 2 * differ);
        }
    }
}
"""


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The first ``flags`` (x86) or ``Features`` (ARM) line of ``cpuinfo`` as a set; None without one."""
    try:
        with open(cpuinfo) as fh:
            line = next((ln for ln in fh if ln.split(":")[0].strip() in ("flags", "Features")), None)
    except OSError:
        return None
    return None if line is None else set(line.partition(":")[2].split())


def popcount_support(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool]:
    """Whether this CPU has ``popcnt`` (one word per instruction) and ``avx512_vpopcntdq`` (eight).

    Read from ``cpuinfo``'s flags; ``{}`` where there is no such file (macOS, Windows).
    Introduced in Chapter 7.
    """
    flags = _cpu_flags(cpuinfo)
    return {} if flags is None else {name: name in flags for name in ("popcnt", "avx512_vpopcntdq")}


def cache_dir() -> Path:
    """Where compiled kernels live: ``$EFFNB_CACHE/binary`` if set, else ``~/.cache/effnb/binary``.
    Introduced in Chapter 7."""
    root = os.environ.get("EFFNB_CACHE", "").strip()
    return (Path(root) if root else Path.home() / ".cache" / "effnb") / "binary"


def cache_key(flags: tuple[str, ...] = COMPILE_FLAGS, cpu_flags: str | None = None) -> str:
    """16 hex digits of SHA-256 over the kernel source, the compiler flags, the machine and the CPU's
    flags (this CPU's unless given), so a library built for another CPU is never loaded.
    Introduced in Chapter 7."""
    if cpu_flags is None:
        cpu_flags = " ".join(sorted(_cpu_flags() or ()))
    text = "\0".join([_SOURCE, " ".join(flags), platform.machine(), cpu_flags])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file), so one process builds while others wait."""
    with open(path, "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _compile(flags: tuple[str, ...], target: Path) -> None:
    """Build the kernel into a temporary file next to ``target``, then move it into place atomically."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("g++ was not found, so the compiled XNOR-popcount kernel cannot be built; install g++ "
                           "(e.g. apt-get install g++) or pass backend='torch'.")
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "xnor_popcount.cpp"
            source.write_text(_SOURCE)
            done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"g++ could not build the XNOR-popcount kernel ({last}); install a working g++ "
                               "with OpenMP or pass backend='torch'.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_library(cache: Path | str | None = None, flags: tuple[str, ...] = COMPILE_FLAGS) -> Path:
    """Path of the compiled kernel in ``cache`` (default :func:`cache_dir`), building it first if absent.

    The file is ``xnor_popcount-<cache_key>.so``; a lock file keeps two processes from building at
    once, and the second finds the first one's library. Raises ``RuntimeError`` without g++ or when
    the build fails. Introduced in Chapter 7.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"xnor_popcount-{cache_key(flags)}.so"
    if not target.exists():
        with _locked(folder / f"{target.name}.lock"):
            if not target.exists():                                  # another process may have built it meanwhile
                _compile(flags, target)
    return target


@functools.lru_cache(maxsize=None)
def _kernel() -> tuple[object | None, str]:
    """(the loaded C function, "") or (None, why not); built or loaded once per process."""
    try:
        function = ctypes.CDLL(str(build_library())).xnor_popcount_matmul
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return None, str(err)
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    function.restype = None
    return function, ""


def binary_backend() -> Literal["compiled", "torch"]:
    """``"compiled"`` when the C++ kernel is built (the first call builds it) and loads, else ``"torch"``:
    the one place that says which path ``backend="auto"`` takes on CPU tensors. Introduced in Chapter 7."""
    return "compiled" if _kernel()[0] is not None else "torch"


def _matmul_compiled(a: Tensor, b: Tensor, k: int) -> Tensor:
    if a.device.type != "cpu":
        raise ValueError(f"backend='compiled' runs on CPU tensors, not {a.device}; use backend='torch'.")
    function, reason = _kernel()
    if function is None:
        raise RuntimeError(reason)
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(len(a), len(b), dtype=torch.int32)
    function(a.data_ptr(), b.data_ptr(), out.data_ptr(), len(a), len(b), a.shape[1], k, torch.get_num_threads())
    return out


def _check_packed(name: str, packed: object, k: int) -> None:
    words = -(-k // 64)
    if not isinstance(packed, Tensor) or packed.dtype != torch.int64 or packed.dim() != 2:
        tensor = isinstance(packed, Tensor)
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if tensor else type(packed).__name__
        error = ValueError if tensor and packed.dtype == torch.int64 else TypeError
        raise error(f"{name} must be a 2-D int64 tensor from pack_bits, got {got}.")
    if packed.shape[1] != words:
        raise ValueError(f"{name} has {packed.shape[1]} words per row, but k={k} needs ceil(k/64) = {words}.")
    if k % 64 and bool(((packed[:, -1] >> (k % 64)) != 0).any()):
        raise ValueError(f"{name} has bits set past column k={k}; pass the K it was packed from "
                         "(pack_bits leaves those bits 0).")


def binary_matmul(a_packed: Tensor, b_packed: Tensor, k: int, backend: str = "auto") -> Tensor:
    r"""``A @ B.T`` for ±1 matrices A (M, K) and B (N, K) given packed by :func:`pack_bits`: ``(M, N)`` int32.

    .. math:: a \cdot b = (\#\text{agree}) - (\#\text{differ}) = K - 2\,\mathrm{popcount}(a \oplus b)

    exact for any K (the zero padding never differs). ``backend``: ``"compiled"`` (the C++ kernel,
    CPU tensors, raises when it cannot be built), ``"torch"`` (any device) or ``"auto"`` (compiled
    for CPU tensors when :func:`binary_backend` says so, else torch). Introduced in Chapter 7.
    """
    check_choice("backend", backend, BACKENDS)
    check_count("k", k, 64)
    _check_packed("a_packed", a_packed, k)
    _check_packed("b_packed", b_packed, k)
    if a_packed.device != b_packed.device:
        raise ValueError(f"a_packed is on {a_packed.device} and b_packed on {b_packed.device}; put both on one device.")
    if backend == "compiled" or (backend == "auto" and a_packed.device.type == "cpu"
                                 and binary_backend() == "compiled"):
        return _matmul_compiled(a_packed, b_packed, k)
    return _matmul_torch(a_packed, b_packed, k)


# ============================================================================ 5. the packed inference path
def _check_packable(layer: nn.Module, kind: type, caller: str) -> None:
    if not isinstance(layer, kind):
        raise TypeError(f"{caller} takes a {kind.__name__}, got {type(layer).__name__}.")
    if layer.input_binarizer is None:
        raise ValueError(f"{caller} needs a layer built with binarize_input=True: the packed path multiplies "
                         "±1 activations.")


@torch.no_grad()
def binary_linear_packed(x: Tensor, layer: BinaryLinear, backend: str = "auto") -> Tensor:
    r"""``layer(x)`` computed the deployed way: pack :math:`\mathrm{sign}(x - \beta)` and
    :math:`\mathrm{sign}(W)`, XNOR-popcount them, scale by α, add the bias.
    ``(..., D) -> (..., N)``; equals the float forward to float rounding. (The weight is packed on
    each call for clarity; a deployed layer stores it packed.) Introduced in Chapter 7.
    """
    _check_packable(layer, BinaryLinear, "binary_linear_packed")
    D = layer.in_features
    if x.shape[-1:] != (D,):
        raise ValueError(f"x of shape {tuple(x.shape)} must end in in_features={D}.")
    rows = layer.input_binarizer.shifted(x).reshape(-1, D)                    # (M, D): sign(rows) is the input
    dots = binary_matmul(pack_bits(rows), pack_bits(layer.weight), D, backend)  # (M, N) exact integers
    out = dots.to(x.dtype) * weight_scale(layer.weight)
    if layer.bias is not None:
        out = out + layer.bias
    return out.reshape(*x.shape[:-1], layer.out_features)


def _check_conv_input(x: Tensor, conv: nn.Module, caller: str) -> None:
    _check_packable(conv, BinaryConv2d, caller)
    if conv.groups != 1:
        raise ValueError(f"{caller} supports groups=1 only, got groups={conv.groups}.")
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(f"x of shape {tuple(x.shape)} must be (B, {conv.in_channels}, H, W).")


@torch.no_grad()
def pack_conv2d_input(x: Tensor, conv: BinaryConv2d) -> Tensor:
    r"""The patches ``conv`` multiplies, packed: pad ``x`` as ``conv`` does, binarize
    :math:`x - \beta_c`, im2col (``F.unfold``), then :func:`pack_bits`. ``(B, C, H, W) -> (B·H'·W', ceil(K/64))``
    with ``K = C·kh·kw``, one row per output position (batch-major, then row-major). This is what the
    packed path pays for activations on every call. Introduced in Chapter 7.
    """
    _check_conv_input(x, conv, "pack_conv2d_input")
    x = _sign(conv.input_binarizer.shifted(_pad_input(x, conv)))             # (B, C, Hp, Wp), all ±1
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)   # (B, K, L)
    return pack_bits(cols.transpose(1, 2).reshape(-1, cols.shape[1]))       # (B·L, W)


@torch.no_grad()
def pack_conv2d_weight(conv: BinaryConv2d) -> Tensor:
    """:math:`\mathrm{sign}(W)` of ``conv`` packed, one row per output channel: ``(O, ceil(K/64))``.
    A deployed layer stores this once. Introduced in Chapter 7."""
    _check_packable(conv, BinaryConv2d, "pack_conv2d_weight")
    return pack_bits(conv.weight.reshape(conv.out_channels, -1))


@torch.no_grad()
def binary_conv2d_packed(x: Tensor, conv: BinaryConv2d, backend: str = "auto") -> Tensor:
    r"""``conv(x)`` computed the deployed way: :func:`pack_conv2d_input` (pad, binarize
    :math:`x - \beta_c`, im2col, pack), then :func:`binary_matmul` against :func:`pack_conv2d_weight`,
    times α, plus the bias. ``(B, C, H, W) -> (B, O, H', W')``; equals the float forward to float
    rounding. ``groups=1`` only. Introduced in Chapter 7.
    """
    _check_conv_input(x, conv, "binary_conv2d_packed")
    rows = pack_conv2d_input(x, conv)                                         # (B·L, W)
    K, O = conv.weight[0].numel(), conv.out_channels
    out = binary_matmul(rows, pack_conv2d_weight(conv), K, backend).to(x.dtype) * weight_scale(conv.weight)
    if conv.bias is not None:
        out = out + conv.bias
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    (pt, pb), (pl, pr) = conv._reversed_padding_repeated_twice[2:], conv._reversed_padding_repeated_twice[:2]
    H_out = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    W_out = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return out.view(x.shape[0], H_out * W_out, O).permute(0, 2, 1).reshape(x.shape[0], O, H_out, W_out)


_BINARY_LAYERS = (BinaryLinear, BinaryConv2d)


def _weight_packed_bytes(weight: Tensor) -> int:
    """N rows of ceil(K/64) 8-byte words, plus N float32 scales α."""
    N, K = weight.shape[0], weight[0].numel()
    return N * (-(-K // 64)) * 8 + N * 4


def packed_bytes(module_or_tensor: nn.Module | Tensor) -> int:
    """Bytes to store binary weights packed: 1 bit per weight, rounded up to 64-bit words per row,
    plus one float32 α per row.

    A weight tensor ``(N, ...)`` counts as one binary layer's weight. A module counts as deployed:
    the weights of its :class:`BinaryLinear` / :class:`BinaryConv2d` layers packed, every other
    parameter and buffer (biases, β, float layers) at its own size. A large layer comes to about
    1/32 of its fp32 bytes. Introduced in Chapter 7.
    """
    if isinstance(module_or_tensor, Tensor):
        if module_or_tensor.dim() < 2:
            raise ValueError(f"packed_bytes needs a weight of shape (N, ...) with 2 or more dims, "
                             f"got shape {tuple(module_or_tensor.shape)}.")
        return _weight_packed_bytes(module_or_tensor)
    if not isinstance(module_or_tensor, nn.Module):
        raise TypeError(f"packed_bytes takes an nn.Module or a weight Tensor, got {type(module_or_tensor).__name__}.")
    binary = {id(m.weight): m.weight for m in module_or_tensor.modules() if isinstance(m, _BINARY_LAYERS)}
    others = {id(t): t for t in [*module_or_tensor.parameters(), *module_or_tensor.buffers()] if id(t) not in binary}
    return sum(map(_weight_packed_bytes, binary.values())) + sum(t.numel() * t.element_size() for t in others.values())


# ============================================================================ 6. counting operations
@dataclass(frozen=True)
class OpCount:
    """Multiply-accumulates of one forward pass: ``binary_macs`` (±1 × ±1, XNOR-popcount) and
    ``float_macs`` (everything else counted). Introduced in Chapter 7."""

    binary_macs: int
    float_macs: int

    @property
    def ops(self) -> float:
        """OPs as Bi-Real Net and ReActNet report them: float MACs + binary MACs / 64."""
        return self.float_macs + self.binary_macs / 64


def binary_ops(model: nn.Module, *inputs: Tensor) -> OpCount:
    """Count the MACs of one ``model(*inputs)`` with forward hooks on every ``nn.Linear`` / ``nn.Conv1d/2d/3d``.

    A layer's MACs are ``output.numel() × weight[0].numel()`` (each output element sums over one
    weight row). They are binary for a :class:`BinaryLinear` / :class:`BinaryConv2d` with
    ``binarize_input`` and float otherwise (a float input times binary weights cannot use XNOR).
    Normalisation, activations and functional matmuls (attention) are not counted, as in the
    papers' tables. Runs under ``no_grad`` and leaves no hook behind. Introduced in Chapter 7.
    """
    counts = {"binary": 0, "float": 0}

    def count(module: nn.Module, args: tuple, output: Tensor) -> None:
        binary = isinstance(module, _BINARY_LAYERS) and module.input_binarizer is not None
        counts["binary" if binary else "float"] += output.numel() * module.weight[0].numel()

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return OpCount(counts["binary"], counts["float"])
