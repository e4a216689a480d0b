"""Neuron tracing: a plain discriminative correlation filter, and the metrics that score a traced neuron.

The filter is the multi-channel MOSSE/DSST one, solved in closed form in the Fourier domain; Chapter 10
builds the paper's enhancements on top of it in the notebook. The metrics compare traced points with an
SWC ground truth (see :func:`effnb.data.make_neuron_volume`): a VSA-style matching score swept over radii,
the mean distance to the ground truth (MFD), and the share of branches recovered (BRR). Introduced in
Chapter 10.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

__all__ = ["DCF", "Detection", "branch_recovery", "crop", "gaussian_label", "hann_window", "mean_distance", "peak_of", "plane_slice", "resample_polyline", "segments", "swc_points",
           "vsa_score"]


# --- the filter ----------------------------------------------------------------------------------

def gaussian_label(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """The desired response: a Gaussian of width ``sigma`` (pixels) peaking at the patch centre ``(h // 2, w // 2)``."""
    y, x = np.ogrid[: shape[0], : shape[1]]
    return np.exp(-((y - shape[0] // 2) ** 2 + (x - shape[1] // 2) ** 2) / (2 * sigma**2))


def hann_window(shape: tuple[int, int]) -> np.ndarray:
    r"""A 2-D Hann (cosine) window, so that the patch fades to zero at its border before the FFT.

    Each axis is the symmetric Hann window :math:`w_n = \tfrac12 (1 - \cos(2\pi n / (N - 1)))`, zero at both
    ends: NumPy's ``hanning(N)``, and MATLAB's ``hann(N)``, which CSR-DCF's code and the paper's tracer
    (``create_xb_tracker.m``: ``hann(size(Y,1)) * hann(size(Y,2))'``) use. (ASRCF and AutoTrack instead crop
    ``hann(N + 2)``, which is nowhere zero.)
    """
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1]))


@dataclass
class Detection:
    """Where :meth:`DCF.detect` found the target: the shift (dy, dx) from the patch centre, the peak of the
    response, and the ratio of the second-highest local peak to it (low = unambiguous)."""

    shift: tuple[float, float]
    peak: float
    second_ratio: float


class DCF:
    """A multi-channel discriminative correlation filter (MOSSE / DSST), trained and applied per patch.

    For a patch with channels ``f_c`` (``(C, H, W)``), the desired response ``g`` and regularisation ``lam``,
    the filter minimising ``|| sum_c h_c * f_c - g ||^2 + lam sum_c ||h_c||^2`` is, per frequency,

        A_c = conj(G) F_c,    B = sum_c |F_c|^2,    response(z) = ifft( sum_c conj(A_c) Z_c / (B + lam) ).

    ``update`` blends A and B with a learning rate, so the filter follows slow changes.
    """

    def __init__(self, shape: tuple[int, int], sigma: float = 1.0, lam: float = 1e-2, window: bool = True) -> None:
        if len(shape) != 2 or min(shape) < 4:
            raise ValueError(f"shape={shape!r} must be a patch (height, width) of at least 4 x 4 pixels.")
        self.shape, self.lam = tuple(shape), lam
        self.window = hann_window(shape) if window else np.ones(shape)
        self.G = np.fft.fft2(gaussian_label(shape, sigma))
        self.A: np.ndarray | None = None
        self.B: np.ndarray | None = None

    def _spectrum(self, patch: np.ndarray) -> np.ndarray:
        patch = np.asarray(patch, dtype=np.float64)
        if patch.ndim == 2:
            patch = patch[None]
        if patch.shape[1:] != self.shape:
            raise ValueError(f"patch of shape {patch.shape[1:]} given to a filter of shape {self.shape}.")
        return np.fft.fft2(patch * self.window)

    def update(self, patch: np.ndarray, rate: float = 1.0) -> "DCF":
        """Train on ``patch`` (``(C, H, W)`` or ``(H, W)``), target at its centre; ``rate`` 1 starts afresh."""
        F = self._spectrum(patch)
        A, B = np.conj(self.G) * F, (F * np.conj(F)).real.sum(0)
        if self.A is None or rate >= 1:
            self.A, self.B = A, B
        else:
            self.A, self.B = (1 - rate) * self.A + rate * A, (1 - rate) * self.B + rate * B
        return self

    def response(self, patch: np.ndarray) -> np.ndarray:
        """The correlation response of the filter on ``patch``; its peak is where the target is."""
        if self.A is None:
            raise RuntimeError("the filter has not been trained: call update(patch) first.")
        Z = self._spectrum(patch)
        return np.fft.ifft2((np.conj(self.A) * Z).sum(0) / (self.B + self.lam)).real

    def detect(self, patch: np.ndarray) -> Detection:
        """Find the target in ``patch``: the response peak's shift from the centre, its height and ambiguity."""
        return peak_of(self.response(patch))


def peak_of(response: np.ndarray, exclude: int = 2) -> Detection:
    """The highest peak of a response map (shift from the centre), and the ratio of the next local peak to it
    (searched outside a ``exclude``-pixel neighbourhood of the first)."""
    h, w = response.shape
    y, x = np.unravel_index(int(np.argmax(response)), response.shape)
    peak = float(response[y, x])
    masked = response.copy()
    masked[max(y - exclude, 0): y + exclude + 1, max(x - exclude, 0): x + exclude + 1] = -np.inf
    second = float(masked.max()) if np.isfinite(masked).any() else 0.0
    ratio = max(second, 0.0) / peak if peak > 0 else 1.0
    return Detection((float(y - h // 2), float(x - w // 2)), peak, ratio)


# --- slices of a volume ---------------------------------------------------------------------------

def plane_slice(image: np.ndarray, axis: int, index: int) -> tuple[np.ndarray, list[int]]:
    """The 2-D slice of a ``(Z, Y, X, C)`` volume at ``index`` along ``axis`` (0, 1, 2 = z, y, x), ``(rows, cols, C)``,
    and the two volume axes its rows and columns follow."""
    return np.take(image, int(index), axis=axis), [a for a in range(3) if a != axis]


def crop(image: np.ndarray, centre: tuple[float, float], size: int) -> np.ndarray:
    """The ``size`` x ``size`` crop of a ``(rows, cols, C)`` image centred at ``centre`` (rounded), zero outside it."""
    r0, c0 = int(round(centre[0])) - size // 2, int(round(centre[1])) - size // 2
    out = np.zeros((size, size, image.shape[2]), image.dtype)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + size, image.shape[0]), min(c0 + size, image.shape[1])
    if re > rs and ce > cs:
        out[rs - r0: re - r0, cs - c0: ce - c0] = image[rs:re, cs:ce]
    return out


# --- ground truth and metrics --------------------------------------------------------------------

def swc_points(table: np.ndarray) -> np.ndarray:
    """The node positions of an SWC table as ``(N, 3)`` in (z, y, x) order, the volume's axis order."""
    table = np.asarray(table)
    return table[:, [4, 3, 2]].astype(np.float64)


def segments(table: np.ndarray) -> list[np.ndarray]:
    """Split an SWC tree into its segments (runs of nodes between the root, branch points and tips).

    Returns one array of row indices per segment, each starting at the node where it leaves its parent segment.
    """
    table = np.asarray(table)
    index = {int(i): k for k, i in enumerate(table[:, 0])}
    children: dict[int, list[int]] = {}
    for k, parent in enumerate(table[:, 6]):
        children.setdefault(index.get(int(parent), -1), []).append(k)
    result, todo = [], [[k] for k in children.get(-1, [])]
    while todo:
        run = todo.pop()
        while len(children.get(run[-1], [])) == 1:
            run.append(children[run[-1]][0])
        kids = children.get(run[-1], [])
        todo += [[run[-1], kid] for kid in kids]
        result.append(np.array(run))
    return result


def resample_polyline(points: np.ndarray, spacing: float = 1.0) -> np.ndarray:
    """Points every ``spacing`` voxels along the polyline through ``points`` (``(N, 3)``), ends included, so that a
    trace stepped one slice at a time along a tilted neuron is compared with the truth at the truth's density."""
    points = np.asarray(points, float).reshape(-1, 3)
    if len(points) < 2:
        return points.copy()
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    at = np.append(np.arange(0.0, arc[-1], spacing), arc[-1]) if arc[-1] > 0 else np.array([0.0])
    at = at[np.concatenate([[True], np.diff(at) > 1e-9])]
    return np.stack([np.interp(at, arc, points[:, k]) for k in range(3)], 1)


def _match_count(traced: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """Pairs of a one-to-one matching (Hungarian, on distance) of traced and true points closer than ``radius``."""
    if len(traced) == 0 or len(truth) == 0:
        return 0
    d = np.linalg.norm(traced[:, None, :] - truth[None, :, :], axis=-1)
    cost = np.where(d <= radius, d, 1e6)
    rows, cols = linear_sum_assignment(cost)
    return int((d[rows, cols] <= radius).sum())


def vsa_score(traced: np.ndarray, truth: np.ndarray, radii: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)) -> float:
    """A VSA-style score in [0, 1]: the F1 of a one-to-one matching of traced and true points (``(N, 3)``,
    about one voxel apart) within a radius, averaged over ``radii``. 1 when the trace equals the truth."""
    traced, truth = np.asarray(traced, float).reshape(-1, 3), np.asarray(truth, float).reshape(-1, 3)
    if len(traced) + len(truth) == 0:
        return 1.0
    return float(np.mean([2 * _match_count(traced, truth, r) / (len(traced) + len(truth)) for r in radii]))


def mean_distance(traced: np.ndarray, truth: np.ndarray) -> float:
    """MFD: the mean distance (voxels) from each traced point to the nearest true point; inf for an empty trace."""
    traced = np.asarray(traced, float).reshape(-1, 3)
    if len(traced) == 0:
        return float("inf")
    return float(cKDTree(np.asarray(truth, float).reshape(-1, 3)).query(traced)[0].mean())


def branch_recovery(traced: np.ndarray, table: np.ndarray, radius: float = 3.0, coverage: float = 0.5) -> float:
    """BRR: the share of the ground truth's branch segments (every segment but the one from the root) of which
    at least ``coverage`` of the nodes lie within ``radius`` of a traced point; 1.0 for a neuron without
    branches. A stricter reading than the paper's segment count, which does not check that a traced
    segment lies on a true one."""
    if radius <= 0 or not 0 < coverage <= 1:
        raise ValueError(f"radius={radius!r} must be > 0 and coverage={coverage!r} in (0, 1], e.g. radius=3.0, coverage=0.5.")
    parts = segments(table)
    branches = [p for p in parts if int(np.asarray(table)[p[0], 6]) != -1]
    if not branches:
        return 1.0
    traced = np.asarray(traced, float).reshape(-1, 3)
    if len(traced) == 0:
        return 0.0
    tree, points = cKDTree(traced), swc_points(table)
    covered = [(tree.query(points[p[1:]])[0] <= radius).mean() >= coverage for p in branches]
    return float(np.mean(covered))
