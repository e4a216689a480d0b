"""Declared claims and their three-way verdicts, from per-seed values (DESIGN, *evidence standard*).

A claim is declared before its arms run (:class:`ClaimSpec`: statement, metric, direction, threshold,
seeds, comparison, noise floor), and judged afterwards from the per-seed values by :func:`judge`:

- the effect is the mean over seeds of the method's value (``comparison="fixed"``) or of its paired
  difference from the baseline at the same seed (``comparison="paired"``);
- its 95% interval comes from :func:`scipy.stats.bootstrap` (percentile method, resampling seeds), widened to
  Student's t interval (:func:`scipy.stats.ttest_1samp`) wherever that is wider: a percentile bootstrap of a
  few seeds undercovers (of 3 values it is their range, whatever their spread), and few seeds are what a
  chapter can afford;
- the A/A floor is how far the same interval for the A/A control (the baseline against itself with another
  training seed, at the same seed count) reaches from the claim's ``null``, the effect of no effect (0 for a
  difference, 1 for a ratio);
- **reproduced** when the whole interval lies strictly beyond the threshold and beyond null ± floor, **not
  reproduced** when it lies strictly on the other side of the threshold, **inconclusive** otherwise, with
  the number of seeds at which an interval of the same spread would no longer straddle the threshold.

The printed form is ``[verdict] statement: effect, 95% CI [lo, hi] (threshold >= t, n seeds; ~m needed)``;
:func:`effnb.report.record_evidence` records it for the reproduction report. Introduced in Chapter 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import stats

from effnb.config import check_choice

__all__ = ["COMPARISONS", "DIRECTIONS", "OUTCOMES", "ClaimSpec", "Evidence", "interval", "judge", "outcome",
           "seeds_needed", "verdict_line"]

DIRECTIONS: tuple[str, ...] = ("higher", "lower")
COMPARISONS: tuple[str, ...] = ("paired", "fixed")
OUTCOMES: tuple[str, ...] = ("reproduced", "not reproduced", "inconclusive")
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ClaimSpec:
    """A claim as declared before its arms run.

    ``direction`` says which side of ``threshold`` reproduces the claim: ``"higher"`` (effect >= threshold) or
    ``"lower"`` (effect <= threshold). ``comparison`` is ``"paired"`` (method minus baseline at the same seed)
    or ``"fixed"`` (the method's value itself against the threshold). ``noise_floor`` names the A/A control (``None``: an absolute
    threshold, no A/A arm), and
    ``null`` is the effect when the method changes nothing (0 for a difference; 1 for a ratio such as a speed-up).
    ``unit`` names what ``seeds`` count when they are not training seeds: ``"rounds"`` of timing, ``"seed pairs"``.
    """

    statement: str
    metric: str
    direction: Literal["higher", "lower"]
    threshold: float
    seeds: tuple[int, ...]
    comparison: Literal["paired", "fixed"] = "paired"
    noise_floor: str | None = "the baseline against itself with another training seed"
    null: float = 0.0
    unit: str = "seeds"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("comparison", self.comparison, COMPARISONS)
        if not self.statement:
            raise ValueError("a claim needs a statement, e.g. statement='DQAS beats DQ at 2%'.")
        if len(self.seeds) < 2:
            raise ValueError(f"seeds={self.seeds!r}: an interval needs at least 2 seeds, e.g. seeds=(0, 1, 2).")
        for name in ("threshold", "null"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number.")

    @property
    def sign(self) -> str:
        return ">=" if self.direction == "higher" else "<="

    def declaration(self) -> str:
        """One line to print when the claim is declared, before any arm runs."""
        what = f"method - baseline, paired by {self.unit.removesuffix('s')}" if self.comparison == "paired" else "the method's value"
        floor = f", beyond the A/A floor ({self.noise_floor})" if self.noise_floor else ""
        seeds = list(self.seeds) if len(self.seeds) <= 20 else f"[{self.seeds[0]}, {self.seeds[1]}, ..., {self.seeds[-1]}]"
        return (f"[declared] {self.statement}: {self.metric} ({what}) {self.sign} {self.threshold:g}, "
                f"{len(self.seeds)} {self.unit} {seeds}{floor}")


def interval(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` and its ``confidence`` interval ``(mean, lo, hi)``: the bootstrap interval, resampling
    the values with :func:`scipy.stats.bootstrap` (percentile method, 9,999 resamples, seeded), widened at each
    end to Student's t interval where that is wider. At a handful of seeds the percentile bootstrap is far too
    narrow (of 3 values it is their range: 3 values all above a threshold would prove nothing), while t keeps
    its coverage; at many seeds the two agree. Identical values give a zero-width interval. Raises
    ``ValueError`` for fewer than 2 values or a non-finite one."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"an interval needs at least 2 per-seed values, got {len(x)}.")
    if not np.isfinite(x).all():
        raise ValueError(f"per-seed values must be finite numbers, got {x.tolist()}.")
    mean = float(x.mean())
    if np.ptp(x) == 0:
        return mean, mean, mean
    boot = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=9999, method="percentile",
                           random_state=np.random.default_rng(seed)).confidence_interval
    t = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return mean, float(min(boot.low, t.low)), float(max(boot.high, t.high))


def outcome(lo: float, hi: float, threshold: float, direction: str, floor: float | None = None,
            null: float = 0.0) -> str:
    """The three-way verdict for an effect interval ``[lo, hi]``: reproduced when the whole interval lies
    strictly beyond ``threshold`` on the claim's side and, when an A/A ``floor`` (a magnitude >= 0) is given,
    strictly beyond ``null`` ± floor too, so the effect beats what the seed alone moves; not reproduced when it lies
    strictly on the other side of ``threshold``; inconclusive otherwise (an interval that touches the
    threshold, exact ties included)."""
    check_choice("direction", direction, DIRECTIONS)
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] has lo > hi.")
    if floor is not None and floor < 0:
        raise ValueError(f"floor={floor} must be >= 0 (a magnitude).")
    if direction == "higher":
        if lo > threshold and (floor is None or lo > null + floor):
            return "reproduced"
        return "not reproduced" if hi < threshold else "inconclusive"
    if hi < threshold and (floor is None or hi < null - floor):
        return "reproduced"
    return "not reproduced" if lo > threshold else "inconclusive"


def seeds_needed(effect: float, lo: float, hi: float, n: int, threshold: float) -> int | None:
    """Seeds at which an interval of this spread (half-width shrinking as 1/sqrt(n)) would stop straddling the
    threshold; ``None`` when the effect sits on the threshold (no number of seeds settles it)."""
    distance = abs(effect - threshold)
    half_width = (hi - lo) / 2
    if distance <= 1e-12 * max(1.0, abs(threshold)):    # equal up to rounding (a mean of x - x): no seed count
        return None
    return max(n, math.ceil(n * (half_width / distance) ** 2))


def verdict_line(verdict: str, statement: str, effect: float, lo: float, hi: float, sign: str, threshold: float,
                 floor: float | None, n: int, needed: int | None, digits: int = 3, null: float = 0.0,
                 unit: str = "seeds") -> str:
    """``[verdict] statement: effect, 95% CI [lo, hi] (threshold >= t, A/A floor f, n seeds; ~m needed)``, the
    one printed form of a judged claim (:meth:`Evidence.line`, :meth:`effnb.report.Claim.verdict`). An
    inconclusive claim ends with the seeds needed, or "within the A/A floor" when the effect itself is no larger
    than what the seed alone moves (more seeds would not clear it), or "on the threshold"."""
    f = f"{{:.{digits}f}}"
    tail = f"threshold {sign} {threshold:g}" + ("" if floor is None else f", A/A floor {f.format(floor)}") + f", {n} {unit}"
    if verdict == "inconclusive":
        if floor is not None and abs(effect - null) <= floor and (effect - threshold) * (1 if sign == ">=" else -1) > 0:
            tail += "; within the A/A floor"
        else:
            tail += f"; ~{needed} needed" if needed else "; on the threshold"
    return (f"[{verdict}] {statement}: {f.format(effect)}, {int(CONFIDENCE * 100)}% CI "
            f"[{f.format(lo)}, {f.format(hi)}] ({tail})")


@dataclass(frozen=True)
class Evidence:
    """A judged claim: the effect, its interval, the A/A floor and the verdict."""

    spec: ClaimSpec
    effect: float
    lo: float
    hi: float
    floor: float | None
    outcome: str
    needed: int | None

    def line(self, digits: int = 3) -> str:
        """``[verdict] statement: effect, 95% CI [lo, hi] (threshold >= t, n seeds; ~m needed)``."""
        return verdict_line(self.outcome, self.spec.statement, self.effect, self.lo, self.hi, self.spec.sign,
                            self.spec.threshold, self.floor, len(self.spec.seeds), self.needed, digits, self.spec.null,
                            self.spec.unit)


def judge(spec: ClaimSpec, method: Sequence[float], baseline: Sequence[float] | None = None,
          aa: Sequence[float] | None = None) -> Evidence:
    """Judge ``spec`` from per-seed values, one per seed of ``spec.seeds`` and in that order: ``method``,
    ``baseline`` (needed for a paired claim) and ``aa``, the A/A control in the effect's units (for a paired claim,
    the baseline at another training seed minus the baseline; for a fixed ratio, the baseline timed against
    itself): the floor is how far its interval reaches from ``spec.null`` (none without an A/A control)."""
    n = len(spec.seeds)
    method = np.asarray(method, dtype=np.float64)
    if len(method) != n:
        raise ValueError(f"{len(method)} method values for {n} seeds; give one per seed of the declaration.")
    if spec.comparison == "paired":
        if baseline is None or len(baseline) != n:
            raise ValueError(f"a paired claim needs one baseline value per seed ({n}), got "
                             f"{None if baseline is None else len(baseline)}.")
        values = method - np.asarray(baseline, dtype=np.float64)
    else:
        values = method
    effect, lo, hi = interval(values)
    floor = None
    if aa is not None:
        if len(aa) != n:
            raise ValueError(f"{len(aa)} A/A values for {n} seeds; the A/A control runs at the same seed count.")
        _, aa_lo, aa_hi = interval(aa)
        floor = max(abs(aa_lo - spec.null), abs(aa_hi - spec.null))
    verdict = outcome(lo, hi, spec.threshold, spec.direction, floor, spec.null)
    bound = spec.threshold        # what the interval must clear: on the claim's side, the floor's edge too
    if floor is not None and (effect - spec.threshold) * (1 if spec.direction == "higher" else -1) > 0:
        edge = spec.null + floor if spec.direction == "higher" else spec.null - floor
        bound = max(bound, edge) if spec.direction == "higher" else min(bound, edge)
    return Evidence(spec, effect, lo, hi, floor, verdict, seeds_needed(effect, lo, hi, n, bound))
