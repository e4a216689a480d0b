r"""The deployed binary inference engine: a trained binary network run on packed bits, fast as a whole.

:mod:`effnb.binary` trains binary layers and shows, step by step in torch, that
:math:`a \cdot b = K - 2\,\mathrm{popcount}(a \oplus b)`. This module runs the same arithmetic the way
a deployment engine (Larq Compute Engine, daBNN) does, so that a whole binary layer, packing
included, beats its float twin, not only its inner product:

1. **compiled packing**: the signs of :math:`x - \beta` go straight from float32 into 64-bit words,
   16 (AVX-512) or 8 (AVX2) comparisons per instruction, in one pass over the input;
2. **im2col on bits**: a convolution packs each pixel's channels once, then gathers each output
   position's patch as bits (:math:`C \cdot k_h k_w` bits, not floats);
3. **a popcount GEMM with the epilogue fused**: weights are packed once, eight output channels
   interleaved per 64-byte vector (``VPOPCNTQ`` counts eight words at a time where the CPU has
   AVX-512 VPOPCNTDQ), and :math:`\alpha` and the bias are applied as each result is stored;
4. :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d` hold the packed weights, and
   :func:`deploy` swaps them into a copy of a model.

All four kernels are one C++ file that g++ builds once per machine and caches (as
:mod:`effnb.binary` does for its matmul); without g++ every function falls back to plain torch with
the same results, bit for bit, and :func:`engine` says which path runs.

Conventions (those of :mod:`effnb.binary`): bit ``k % 64`` of word ``k // 64`` is 1 where
:math:`x_k - \beta_k \ge 0`, so sign(0) = sign(-0.0) = +1, and **NaN packs as -1** (every comparison
with NaN is false, as ``x >= 0`` is in torch; the float layers' forward, whose straight-through term is
``x - x``, returns NaN there instead); unused bits of the last word are 0. A convolution's
patch orders its bits tap by tap, channels within a tap (``(kh, kw, C)``), and its packed weight
the same way. A padded position of a :class:`PackedBinaryConv2d` is
:math:`\mathrm{sign}(0 - \beta_c)`, as in the float layer, which pads before it binarizes.

This module builds on :mod:`effnb.binary` (the layers it deploys), as ``pointclouds`` builds on
``data``. Introduced in Chapter 7.
"""
from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effnb import binary as B

__all__ = ["PackedBinaryConv2d", "PackedBinaryLinear", "build_library", "deploy", "engine", "interleave",
           "pack_signs", "popcount_gemm", "weight_bytes"]

LANES = 8           # output channels per 512-bit vector of packed weights

_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline uint64_t sign_word(const float* x, const float* beta, int64_t n) {
    // bit j = (x[j] - beta[j] >= 0) for j < n <= 64; NaN compares false (bit 0, i.e. -1).
    uint64_t word = 0;
#if defined(__AVX512F__)
    if (n == 64) {
        for (int q = 0; q < 4; ++q) {
            __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + 16 * q), _mm512_loadu_ps(beta + 16 * q));
            word |= (uint64_t)_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ) << (16 * q);
        }
        return word;
    }
#elif defined(__AVX2__)
    if (n == 64) {
        for (int q = 0; q < 8; ++q) {
            __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + 8 * q), _mm256_loadu_ps(beta + 8 * q));
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ)) << (8 * q);
        }
        return word;
    }
#endif
    for (int64_t j = 0; j < n; ++j) word |= (uint64_t)(x[j] - beta[j] >= 0.0f) << j;
    return word;
}

// Rows: m rows of k floats, row i at x + i * ld; beta: k thresholds. out: m rows of ceil(k/64) words.
extern "C" void xnor_pack_rows(const float* x, int64_t m, int64_t k, int64_t ld, const float* beta,
                               uint64_t* out, int threads) {
    const int64_t words = (k + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(threads) if(m * k >= (1 << 18))
    for (int64_t i = 0; i < m; ++i)
        for (int64_t w = 0; w < words; ++w)
            out[i * words + w] = sign_word(x + i * ld + 64 * w, beta + 64 * w, std::min<int64_t>(64, k - 64 * w));
}

// Pixels: x is (b, c, hw) floats (NCHW), beta one threshold per channel. out is (b, hw, ceil(c/64)):
// each pixel's channels packed. Work goes in chunks of 512 pixels of one channel word.
extern "C" void xnor_pack_pixels(const float* x, int64_t b, int64_t c, int64_t hw, const float* beta,
                                 uint64_t* out, int threads) {
    const int64_t cw = (c + 63) / 64, chunk = 512, chunks = (hw + chunk - 1) / chunk;
    #pragma omp parallel for collapse(3) schedule(static) num_threads(threads) if(b * c * hw >= (1 << 18))
    for (int64_t n = 0; n < b; ++n)
        for (int64_t w = 0; w < cw; ++w)
            for (int64_t q = 0; q < chunks; ++q) {
                const int64_t p0 = q * chunk, len = std::min(chunk, hw - p0);
                uint64_t bits[512] = {0};
                for (int64_t ch = 64 * w; ch < std::min<int64_t>(c, 64 * w + 64); ++ch) {
                    const float* src = x + (n * c + ch) * hw + p0;
                    const float t = beta[ch];
                    const uint64_t bit = 1ull << (ch - 64 * w);
                    int64_t p = 0;
#if defined(__AVX512F__)
                    const __m512i one = _mm512_set1_epi64((long long)bit);
                    for (; p + 16 <= len; p += 16) {
                        __mmask16 ge = _mm512_cmp_ps_mask(_mm512_sub_ps(_mm512_loadu_ps(src + p), _mm512_set1_ps(t)),
                                                          _mm512_setzero_ps(), _CMP_GE_OQ);
                        __m512i lo = _mm512_loadu_si512(bits + p), hi = _mm512_loadu_si512(bits + p + 8);
                        _mm512_storeu_si512(bits + p, _mm512_mask_or_epi64(lo, (__mmask8)ge, lo, one));
                        _mm512_storeu_si512(bits + p + 8, _mm512_mask_or_epi64(hi, (__mmask8)(ge >> 8), hi, one));
                    }
#endif
                    for (; p < len; ++p) bits[p] |= (src[p] - t >= 0.0f) ? bit : 0;
                }
                for (int64_t p = 0; p < len; ++p) out[(n * hw + p0 + p) * cw + w] = bits[p];
            }
}

// im2col on bits: pix is (b, h, w, cw) packed pixels, pad the cw words of a padded position. Row
// (n, oh, ow) of out holds the patch's kh*kw*c bits, tap by tap, in ceil(kh*kw*c/64) words.
// Each tap's bits start at the same offset in every patch, so the shifts are worked out once.
extern "C" void xnor_im2col(const uint64_t* pix, const uint64_t* pad, int64_t b, int64_t c, int64_t h,
                            int64_t w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl,
                            int64_t dh, int64_t dw, int64_t oh, int64_t ow, uint64_t* out, int threads) {
    const int64_t cw = (c + 63) / 64, words = (kh * kw * c + 63) / 64, pieces = kh * kw * cw;
    std::vector<int64_t> dy(pieces), dx(pieces), src_word(pieces), q(pieces), s(pieces), spill(pieces);
    for (int64_t t = 0, pos = 0; t < pieces; ++t) {
        const int64_t v = t % cw, bits = std::min<int64_t>(64, c - 64 * v);
        dy[t] = (t / cw) / kw * dh; dx[t] = (t / cw) % kw * dw; src_word[t] = v;
        q[t] = pos >> 6; s[t] = pos & 63; spill[t] = s[t] && s[t] + bits > 64;
        pos += bits;
    }
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(b * oh * ow * pieces >= (1 << 15))
    for (int64_t n = 0; n < b; ++n)
        for (int64_t y = 0; y < oh; ++y)
            for (int64_t x = 0; x < ow; ++x) {
                uint64_t* dst = out + ((n * oh + y) * ow + x) * words;
                std::memset(dst, 0, words * sizeof(uint64_t));
                const int64_t y0 = y * sh - pt, x0 = x * sw - pl;
                const uint64_t* base = pix + n * h * w * cw;
                for (int64_t t = 0; t < pieces; ++t) {
                    const int64_t yy = y0 + dy[t], xx = x0 + dx[t];
                    const uint64_t v = (yy >= 0 && yy < h && xx >= 0 && xx < w)
                        ? base[(yy * w + xx) * cw + src_word[t]] : pad[src_word[t]];
                    dst[q[t]] |= v << s[t];
                    if (spill[t]) dst[q[t] + 1] |= v >> (64 - s[t]);
                }
            }
}

// out[i, j] = k - 2 popcount(a_i XOR b_j), times scale[j] plus bias[j] when out_f is given (else int32).
// bt holds b interleaved: 8 rows per block, bt[(blk * words + w) * 8 + l] = b[8 blk + l][w].
// rows_per_batch L > 0 stores row i = n*L + l at out[(n * N + j) * L + l]: an NCHW conv output.
extern "C" void xnor_gemm(const uint64_t* a, int64_t m, const uint64_t* bt, int64_t n, int64_t words, int64_t k,
                          const float* scale, const float* bias, float* out_f, int32_t* out_i,
                          int64_t rows_per_batch, int threads) {
    const int64_t blocks = (n + 7) / 8, R = 4, row_blocks = (m + R - 1) / R;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if(m * n * words >= (1 << 16))
    for (int64_t rb = 0; rb < row_blocks; ++rb)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const uint64_t* rows[4];
            for (int r = 0; r < R; ++r) rows[r] = a + std::min(rb * R + r, m - 1) * words;
            const uint64_t* col = bt + blk * words * 8;
            int64_t differ[4][8];
#if defined(__AVX512VPOPCNTDQ__)
            __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
            for (int64_t v = 0; v < words; ++v) {
                const __m512i bv = _mm512_loadu_si512(col + v * 8);
                for (int r = 0; r < R; ++r)
                    acc[r] = _mm512_add_epi64(acc[r], _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_set1_epi64((long long)rows[r][v]), bv)));
            }
            for (int r = 0; r < R; ++r) _mm512_storeu_si512(differ[r], acc[r]);
#else
            for (int r = 0; r < R; ++r) for (int l = 0; l < 8; ++l) differ[r][l] = 0;
            for (int64_t v = 0; v < words; ++v)
                for (int r = 0; r < R; ++r)
                    for (int l = 0; l < 8; ++l) differ[r][l] += __builtin_popcountll(rows[r][v] ^ col[v * 8 + l]);
#endif
            // Epilogue: y = (k - 2 differ) * scale + bias, then stored row-major or, for a conv, NCHW,
            // where the block's 4 rows are 4 neighbouring positions of each of its 8 channels.
            const int64_t nrows = std::min<int64_t>(R, m - rb * R), cols = std::min<int64_t>(8, n - blk * 8);
            float vals[8][4];                                  // [channel][row]
            int32_t ints[8][4];
            for (int l = 0; l < cols; ++l) {
                const int64_t j = blk * 8 + l;
                for (int r = 0; r < R; ++r) {
                    const int64_t dot = k - 2 * differ[r][l];
                    if (out_f) vals[l][r] = (float)dot * scale[j] + (bias ? bias[j] : 0.0f);
                    else ints[l][r] = (int32_t)dot;
                }
            }
            const int64_t i0 = rb * R, L = rows_per_batch;
            if (L > 0 && nrows == R && i0 / L == (i0 + R - 1) / L) {         // 4 positions side by side
                const int64_t at = (i0 / L) * n * L + i0 % L;
                for (int l = 0; l < cols; ++l) {
                    const int64_t j = blk * 8 + l;
                    if (out_f) std::memcpy(out_f + at + j * L, vals[l], sizeof(vals[l]));
                    else std::memcpy(out_i + at + j * L, ints[l], sizeof(ints[l]));
                }
                continue;
            }
            for (int r = 0; r < nrows; ++r) {
                const int64_t i = i0 + r;
                for (int l = 0; l < cols; ++l) {
                    const int64_t j = blk * 8 + l;
                    const int64_t at = L > 0 ? ((i / L) * n + j) * L + i % L : i * n + j;
                    if (out_f) out_f[at] = vals[l][r];
                    else out_i[at] = ints[l][r];
                }
            }
        }
}

// A whole layer in one call, so that a small layer does not pay four calls' overhead.
// geo: b, c, h, w, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, n (output channels).
extern "C" void xnor_conv2d(const float* x, const float* beta, const uint64_t* pad, const int64_t* geo,
                            const uint64_t* bt, const float* scale, const float* bias, float* out,
                            uint64_t* pixels, uint64_t* patches, int threads) {
    const int64_t b = geo[0], c = geo[1], h = geo[2], w = geo[3], kh = geo[4], kw = geo[5];
    const int64_t oh = geo[12], ow = geo[13], n = geo[14], k = kh * kw * c, words = (k + 63) / 64;
    xnor_pack_pixels(x, b, c, h * w, beta, pixels, threads);
    xnor_im2col(pixels, pad, b, c, h, w, kh, kw, geo[6], geo[7], geo[8], geo[9], geo[10], geo[11], oh, ow,
                patches, threads);
    xnor_gemm(patches, b * oh * ow, bt, n, words, k, scale, bias, out, nullptr, oh * ow, threads);
}

// The same for a linear layer: m rows of k floats in, m rows of n floats out.
extern "C" void xnor_linear(const float* x, int64_t m, int64_t k, const float* beta, const uint64_t* bt, int64_t n,
                            const float* scale, const float* bias, float* out, uint64_t* packed, int threads) {
    xnor_pack_rows(x, m, k, k, beta, packed, threads);
    xnor_gemm(packed, m, bt, n, (k + 63) / 64, k, scale, bias, out, nullptr, 0, threads);
}
"""

# No fused multiply-add in the epilogue: the scaled outputs are then the same bits on every x86 CPU (tested).
FLAGS: tuple[str, ...] = (*B.COMPILE_FLAGS, "-ffp-contract=off")


# ============================================================================ 1. building the kernels
def build_library(cache: Path | str | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Path of the compiled engine in ``cache`` (default :func:`effnb.binary.cache_dir`), built first if
    absent: ``xnor_engine-<key>.so``, keyed by this source, the flags and the CPU's flags, built under a
    lock and moved into place atomically. Raises ``RuntimeError`` without g++ or when the build fails.
    Introduced in Chapter 7."""
    folder = Path(cache) if cache is not None else B.cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpu = " ".join(sorted(B._cpu_flags() or ()))
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), platform.machine(), cpu]).encode()).hexdigest()[:16]
    target = folder / f"xnor_engine-{key}.so"
    if not target.exists():
        with B._locked(folder / f"{target.name}.lock"):
            if not target.exists():
                _compile(flags, target)
    return target


def _compile(flags: tuple[str, ...], target: Path) -> None:
    compiler = shutil.which("g++")
    if compiler is None:
        raise RuntimeError("g++ was not found, so the compiled binary engine cannot be built; install g++ "
                           "(e.g. apt-get install g++) to run binary layers fast (results are the same without).")
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as folder:
            source = Path(folder) / "xnor_engine.cpp"
            source.write_text(_SOURCE)
            done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            last = next((line for line in lines if "error" in line), lines[-1]).strip()
            raise RuntimeError(f"g++ could not build the binary engine ({last}); install a working g++ with OpenMP.")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_SIGNATURES = {"xnor_pack_rows": [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
               "xnor_pack_pixels": [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
               "xnor_im2col": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 14 + [ctypes.c_void_p, ctypes.c_int],
               "xnor_gemm": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, *[ctypes.c_int64] * 3,
                             *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int],
               "xnor_conv2d": [ctypes.c_void_p] * 10 + [ctypes.c_int],
               "xnor_linear": [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int]}


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why not); once per process."""
    try:
        lib = ctypes.CDLL(str(build_library()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return None, str(err)
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
    return lib, ""


def engine() -> Literal["compiled", "torch"]:
    """``"compiled"`` when the C++ engine builds and loads here (the first call builds it), else
    ``"torch"``: the plain-torch fallback, with the same results and none of the speed. Introduced in Chapter 7."""
    return "compiled" if _library()[0] is not None else "torch"


def _compiled(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library when it is loaded and every tensor is on the CPU, else None (take the torch path)."""
    lib = _library()[0]
    if lib is None:
        return None
    for t in tensors:
        if t.device.type != "cpu":
            return None
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else threads


# ============================================================================ 2. packing
def _floats(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"{x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a float tensor, got a {got}.")
    if x.dtype is torch.float32 and x.is_contiguous() and not x.requires_grad:
        return x                                         # the common case, without three no-op calls
    return x.detach().float().contiguous()


def _thresholds(beta: Tensor | None, n: int, like: Tensor) -> Tensor:
    if beta is None:
        return torch.zeros(n, device=like.device)
    if beta.numel() != n:
        raise ValueError(f"beta has {beta.numel()} values, but the input has {n} channels; pass one threshold per channel.")
    return beta.detach().float().reshape(n).contiguous().to(like.device)


def pack_signs(x: Tensor, beta: Tensor | None = None, threads: int | None = None) -> Tensor:
    r"""The signs of :math:`x - \beta` (M, K), 64 to a word: ``(M, ceil(K/64))`` int64, equal to
    :func:`effnb.binary.pack_bits` of ``x - beta`` in float32 (tested bit for bit, NaN and -0.0 included).
    ``beta``: K thresholds (an :class:`effnb.binary.RSign`'s β) or None for 0. Any float dtype and
    strides: ``x`` is copied to a contiguous float32 first, so a float64 ``x - beta`` whose sign only
    float64 resolves can pack differently. Introduced in Chapter 7."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"pack_signs needs a 2-D (M, K) tensor, got {shape}; reshape it first, e.g. x.reshape(-1, x.shape[-1]).")
    x = _floats(x, "x")
    beta = _thresholds(beta, x.shape[1], x)
    lib = _compiled(x)
    if lib is None:
        return B.pack_bits(x - beta)
    M, K = x.shape
    out = torch.empty(M, -(-K // 64), dtype=torch.int64)
    lib.xnor_pack_rows(x.data_ptr(), M, K, K, beta.data_ptr(), out.data_ptr(), _threads(threads))
    return out


def _pack_pixels(x: Tensor, beta: Tensor, threads: int | None) -> Tensor:
    """(B, C, H, W) floats -> (B, H, W, ceil(C/64)) words: each pixel's signs of x - β_c."""
    Bn, C, H, W = x.shape
    lib = _compiled(x)
    if lib is None:
        return pack_signs(x.permute(0, 2, 3, 1).reshape(-1, C), beta).view(Bn, H, W, -1)
    out = torch.empty(Bn, H, W, -(-C // 64), dtype=torch.int64)
    lib.xnor_pack_pixels(x.data_ptr(), Bn, C, H * W, beta.data_ptr(), out.data_ptr(), _threads(threads))
    return out


def interleave(packed: Tensor) -> Tensor:
    """Packed weight rows ``(N, W)`` laid out for :func:`popcount_gemm`: ``(ceil(N/8), W, 8)``, eight rows
    side by side per word (a 64-byte vector); missing rows are 0. Done once per layer. Introduced in Chapter 7."""
    N, W = packed.shape
    rows = torch.zeros(-(-N // LANES) * LANES, W, dtype=torch.int64, device=packed.device)
    rows[:N] = packed
    return rows.view(-1, LANES, W).transpose(1, 2).contiguous()


def _rows(interleaved: Tensor, n: int) -> Tensor:
    """:func:`interleave` undone: ``(N, W)``."""
    return interleaved.transpose(1, 2).reshape(-1, interleaved.shape[1])[:n]


# ============================================================================ 3. the popcount GEMM
def popcount_gemm(a_packed: Tensor, weights: Tensor, n: int, k: int, scale: Tensor | None = None,
                  bias: Tensor | None = None, rows_per_batch: int = 0, threads: int | None = None) -> Tensor:
    r"""``A @ B.T`` for ±1 rows, from A packed ``(M, W)`` and B :func:`interleave`\ d ``(ceil(n/8), W, 8)``.

    .. math:: y_{ij} = (K - 2\,\mathrm{popcount}(a_i \oplus b_j))\,s_j + c_j

    Without ``scale``: the exact dot products, ``(M, n)`` int32. With ``scale`` (and optionally
    ``bias``), n floats each: float32, scaled as each result is stored. ``rows_per_batch = L > 0``
    returns ``(M / L, n, L)``, the layout of an NCHW convolution's output. Introduced in Chapter 7.
    """
    _check_words("a_packed", a_packed, k)
    M, W = a_packed.shape
    if not isinstance(weights, Tensor) or weights.dtype != torch.int64 or weights.dim() != 3 \
            or weights.shape[1:] != (W, LANES) or weights.shape[0] != -(-n // LANES):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights of shape {got} do not hold {n} interleaved rows of {W} words; "
                         "build them with interleave(pack_signs(w)).")
    scale, bias = (None if t is None else _per_output(name, t, n) for name, t in (("scale", scale), ("bias", bias)))
    if bias is not None and scale is None:
        raise ValueError("bias needs a scale: pass scale=torch.ones(n) for a bias alone.")
    if rows_per_batch < 0 or (rows_per_batch and M % rows_per_batch):
        raise ValueError(f"rows_per_batch={rows_per_batch} does not divide the {M} rows; pass the number of output "
                         "positions per image (H' * W'), or 0 for a row-major (M, n) result.")
    return _gemm(a_packed, weights, n, k, scale, bias, rows_per_batch, threads)


def _check_words(name: str, packed: object, k: int) -> None:
    """``packed`` is a 2-D int64 tensor of ceil(k/64) words per row, as pack_signs makes."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.int64 or packed.dim() != 2:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
        raise TypeError(f"{name} must be a 2-D int64 tensor from pack_signs, got {got}.")
    if not 0 < k <= 64 * packed.shape[1] or k <= 64 * (packed.shape[1] - 1):
        raise ValueError(f"{name} has {packed.shape[1]} words per row, but k={k} needs ceil(k/64) = {-(-k // 64)}; "
                         "pass the K it was packed from.")


def _per_output(name: str, t: Tensor, n: int) -> Tensor:
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} values for n={n} outputs; pass one per output.")
    return t.detach().float().reshape(n).contiguous()


def _gemm(a_packed: Tensor, weights: Tensor, n: int, k: int, scale: Tensor | None, bias: Tensor | None,
          rows_per_batch: int, threads: int | None) -> Tensor:
    """:func:`popcount_gemm` without its checks, for callers that built the operands themselves."""
    M, W = a_packed.shape
    shape = (M // rows_per_batch, n, rows_per_batch) if rows_per_batch else (M, n)
    lib = _compiled(a_packed, weights)
    if lib is None:
        dots = B.binary_matmul(a_packed, _rows(weights, n), k, backend="torch")
        out = dots if scale is None else dots.float() * scale + (0 if bias is None else bias)
        return out.view(shape[0], rows_per_batch, n).transpose(1, 2).contiguous() if rows_per_batch else out
    a_packed, weights = a_packed.contiguous(), weights.contiguous()
    out = torch.empty(shape, dtype=torch.int32 if scale is None else torch.float32)
    lib.xnor_gemm(a_packed.data_ptr(), M, weights.data_ptr(), n, W, k, _ptr(scale), _ptr(bias),
                  None if scale is None else out.data_ptr(), out.data_ptr() if scale is None else None,
                  rows_per_batch, _threads(threads))
    return out


# ============================================================================ 4. packed layers and models
def _bias(layer: nn.Module) -> Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float().contiguous()


class _Packed(nn.Module):
    """What both packed layers share: their float buffers stay float32 whatever ``.half()`` or ``.double()``
    asks, since the kernels read float32."""

    def _apply(self, fn, recurse=True):                  # noqa: ANN001, ANN202 (nn.Module's own signature)
        kept = {name: getattr(self, name) for name in ("alpha", "bias", "beta")}
        super()._apply(fn, recurse)
        for name, before in kept.items():                # a dtype cast is undone from the originals, not rounded back
            after = getattr(self, name)
            if before is not None and after.dtype != torch.float32:
                setattr(self, name, before.to(after.device))
        return self


class PackedBinaryLinear(_Packed):
    r"""A :class:`effnb.binary.BinaryLinear` for inference on packed bits: :math:`\mathrm{sign}(W)`
    packed once (interleaved), α and the bias in float32, the input's β. ``forward(x)`` = :meth:`pack_input`
    then :meth:`multiply`, equal to the float layer's output to float rounding. ``(..., D) -> (..., N)``.
    Introduced in Chapter 7."""

    def __init__(self, layer: B.BinaryLinear) -> None:
        super().__init__()
        B._check_packable(layer, B.BinaryLinear, "PackedBinaryLinear")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight_bits", interleave(pack_signs(layer.weight)))
        self.register_buffer("alpha", B.weight_scale(layer.weight).float().contiguous())
        self.register_buffer("bias", _bias(layer))
        self.register_buffer("beta", layer.input_binarizer.beta.detach().float().contiguous())

    def pack_input(self, x: Tensor) -> Tensor:
        """The signs of x - β, packed: ``(M, ceil(D/64))``, one row per token."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x of shape {tuple(x.shape)} must end in in_features={self.in_features}.")
        return pack_signs(x.reshape(-1, self.in_features), self.beta)

    def multiply(self, packed: Tensor) -> Tensor:
        """The popcount GEMM on packed rows with α and the bias fused: ``(M, N)`` float32."""
        _check_words("packed", packed, self.in_features)
        return _gemm(packed, self.weight_bits, self.out_features, self.in_features, self.alpha, self.bias, 0, None)

    def forward(self, x: Tensor) -> Tensor:
        rows = _floats(x, "x").reshape(-1, self.in_features) if x.shape[-1:] == (self.in_features,) else None
        lib = None if rows is None else _compiled(rows)
        if lib is None:                                      # a wrong shape (pack_input says so), or the fallback
            return self.multiply(self.pack_input(x)).view(*x.shape[:-1], self.out_features)
        M, D, N = len(rows), self.in_features, self.out_features
        out, packed = torch.empty(*x.shape[:-1], N), torch.empty(M, -(-D // 64), dtype=torch.int64)
        lib.xnor_linear(rows.data_ptr(), M, D, self.beta.data_ptr(), self.weight_bits.data_ptr(), N,
                        self.alpha.data_ptr(), _ptr(self.bias), out.data_ptr(), packed.data_ptr(), _threads(None))
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedBinaryConv2d(_Packed):
    r"""A :class:`effnb.binary.BinaryConv2d` for inference on packed bits (``groups=1``): pack each
    pixel's :math:`\mathrm{sign}(x - \beta_c)` once, gather each output position's patch as bits
    (im2col on bits; padding is :math:`\mathrm{sign}(0 - \beta_c)`), then the popcount GEMM against
    the weights packed once, α and the bias fused, written straight into NCHW. A padding mode other
    than zeros pads the float input first. ``(B, C, H, W) -> (B, O, H', W')``. Introduced in Chapter 7."""

    def __init__(self, conv: B.BinaryConv2d) -> None:
        super().__init__()
        B._check_packable(conv, B.BinaryConv2d, "PackedBinaryConv2d")
        if conv.groups != 1:
            raise ValueError(f"PackedBinaryConv2d supports groups=1 only, got groups={conv.groups}; keep this layer "
                             "as a BinaryConv2d, or build it with groups=1.")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding_mode, self.pads = conv.padding_mode, conv._reversed_padding_repeated_twice   # (l, r, t, b)
        taps_last = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (O, kh·kw·C)
        self.register_buffer("weight_bits", interleave(pack_signs(taps_last)))
        self.register_buffer("alpha", B.weight_scale(conv.weight).float().contiguous())
        self.register_buffer("bias", _bias(conv))
        self.register_buffer("beta", conv.input_binarizer.beta.detach().float().contiguous())
        self.register_buffer("pad_bits", pack_signs(torch.zeros(1, conv.in_channels), self.beta)[0])
        self._geometries: dict[torch.Size, Tensor] = {}

    def _geometry(self, h: int, w: int) -> tuple[int, ...]:
        """The kernel's sizes for an (h, w) input: its pads count in the output size; the kernel itself pads
        only zeros (another mode is padded in torch first, so the kernel sees pads of 0)."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        left, right, top, bottom = self.pads
        oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        if self.padding_mode != "zeros":
            top = left = 0
        return kh, kw, sh, sw, top, left, dh, dw, oh, ow

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x of shape {shape} must be (B, {self.in_channels}, H, W).")
        *_, oh, ow = self._geometry(x.shape[2], x.shape[3])
        if oh < 1 or ow < 1:
            raise ValueError(f"x of shape {tuple(x.shape)} is smaller than the kernel {self.kernel_size} with its "
                             f"padding and dilation; pass an input of at least that size.")

    def pack_input(self, x: Tensor) -> Tensor:
        """The patches this layer multiplies, as bits: ``(B·H'·W', ceil(C·kh·kw/64))``."""
        self._check_input(x)
        x = _floats(x, "x")
        kh, kw, sh, sw, top, left, dh, dw, oh, ow = self._geometry(x.shape[2], x.shape[3])
        if self.padding_mode != "zeros" and any(self.pads):
            x = F.pad(x, self.pads, mode=self.padding_mode).contiguous()
        pixels = _pack_pixels(x, self.beta, None)
        C, words = self.in_channels, -(-self.in_channels * kh * kw // 64)
        lib = _compiled(pixels)
        if lib is None:
            return self._im2col_torch(x, oh, ow)
        out = torch.empty(x.shape[0] * oh * ow, words, dtype=torch.int64)
        lib.xnor_im2col(pixels.data_ptr(), self.pad_bits.data_ptr(), x.shape[0], C, x.shape[2], x.shape[3], kh, kw,
                        sh, sw, top, left, dh, dw, oh, ow, out.data_ptr(), _threads(None))
        return out

    def _im2col_torch(self, x: Tensor, oh: int, ow: int) -> Tensor:
        """The same patches from float im2col (F.unfold), reordered tap by tap: the fallback."""
        pads = self.pads if self.padding_mode == "zeros" else (0, 0, 0, 0)
        shifted = F.pad(x, pads) - self.beta.view(1, -1, 1, 1)                  # pad with 0, then x - β
        cols = F.unfold(shifted, self.kernel_size, dilation=self.dilation, stride=self.stride)   # (B, C·taps, L)
        taps = cols.view(x.shape[0], self.in_channels, -1, oh * ow).permute(0, 3, 2, 1)       # (B, L, taps, C)
        return pack_signs(taps.reshape(x.shape[0] * oh * ow, -1))

    def multiply(self, patches: Tensor, batch: int) -> Tensor:
        """The popcount GEMM of packed patches, α and the bias fused: ``(B, O, H'·W')`` float32."""
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        _check_words("patches", patches, k)
        if batch < 1 or len(patches) % batch:
            raise ValueError(f"batch={batch} does not divide the {len(patches)} patches; pass the batch size of the "
                             "input that pack_input packed.")
        return _gemm(patches, self.weight_bits, self.out_channels, k, self.alpha, self.bias, len(patches) // batch, None)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        lib = _compiled(x) if self.padding_mode == "zeros" else None
        if lib is None:                                      # another padding mode, or the fallback
            *_, oh, ow = self._geometry(x.shape[2], x.shape[3])
            return self.multiply(self.pack_input(x), x.shape[0]).view(x.shape[0], self.out_channels, oh, ow)
        x = _floats(x, "x")
        geo = self._geometries.get(x.shape)
        if geo is None:                   # the call's sizes, one int64 array per input shape
            kh, kw, sh, sw, top, left, dh, dw, oh, ow = self._geometry(x.shape[2], x.shape[3])
            geo = self._geometries[x.shape] = torch.tensor([*x.shape, kh, kw, sh, sw, top, left, dh, dw, oh, ow,
                                                            self.out_channels], dtype=torch.int64)
        Bn, C, H, W = x.shape
        oh, ow = int(geo[12]), int(geo[13])
        out = torch.empty(Bn, self.out_channels, oh, ow)
        pixels = torch.empty(Bn * H * W * -(-C // 64), dtype=torch.int64)
        patches = torch.empty(Bn * oh * ow * self.weight_bits.shape[1], dtype=torch.int64)
        lib.xnor_conv2d(x.data_ptr(), self.beta.data_ptr(), self.pad_bits.data_ptr(), geo.data_ptr(),
                        self.weight_bits.data_ptr(), self.alpha.data_ptr(), _ptr(self.bias), out.data_ptr(),
                        pixels.data_ptr(), patches.data_ptr(), _threads(None))
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, padding={self.pads}, padding_mode={self.padding_mode!r}")


_PACKED = {B.BinaryLinear: PackedBinaryLinear, B.BinaryConv2d: PackedBinaryConv2d}


@torch.no_grad()
def deploy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode for inference, with every binary layer that binarizes its input
    (:class:`effnb.binary.BinaryLinear`, :class:`effnb.binary.BinaryConv2d` with ``binarize_input``)
    replaced by its packed twin; everything else (float layers, BatchNorm, activations) is kept as is.
    ``model`` itself is not changed. Outputs equal the float forward's up to rounding (a value within
    rounding of a threshold can flip its sign), except that a NaN input counts as -1 where the float
    layers return NaN. Introduced in Chapter 7."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy takes an nn.Module, got {type(model).__name__}.")
    model = copy.deepcopy(model).eval()
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)     # a layer used twice: both names
               if type(m) in _PACKED and m.input_binarizer is not None]
    if not targets:
        raise ValueError("deploy found no BinaryLinear or BinaryConv2d with binarize_input=True in the model; "
                         "build it with effnb.binary's layers first.")
    grouped = [name for name, m in targets if getattr(m, "groups", 1) != 1]
    if grouped:
        raise ValueError(f"deploy cannot pack the grouped binary convolutions {grouped}; build them with groups=1, "
                         "or pack the other layers by hand with PackedBinaryConv2d / PackedBinaryLinear.")
    packed: dict[int, nn.Module] = {}
    for name, layer in targets:
        parent, _, attr = name.rpartition(".")
        twin = packed.setdefault(id(layer), _PACKED[type(layer)](layer))
        setattr(model.get_submodule(parent) if parent else model, attr, twin)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy in memory: every parameter and buffer at its stored size (the
    packed words of a deployed model's binary layers included), counted once each. Introduced in Chapter 7."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
