"""The experiments tier: stored scale sweeps that show where a paper's effect appears (DESIGN).

At the ci scale most papers' effects are too small to see. ``make experiments CHAPTER=NN`` runs one
chapter's medium-scale sweep on the CPU (``scripts/experiments.py``): one scale axis, at least three points
on it, at least five training seeds per point, and the chapter's A/A control at each point. It stores
``data/results/<chapter>.json``::

    {"chapter": "02_speed", "axis": "steps", "axis_label": "training steps per run",
     "provenance": {"commit", "code", "cpu", "torch", "date", "wall_s", "device", ...},
     "points": [{"config": {"steps": 600, ...}, "seeds": [0, 1, 2, 3, 4],
                 "values": {"arm": [one value per seed], ...}, "seconds": 412.0}, ...]}

``code`` is the sha256 of the code the runs executed (the sweep's module, the chapter's functions it takes from
the notebook and the effnb modules it names), ``wall_s`` the seconds its runs took, summed (a resumed sweep's
wall time without its pauses). A chapter reads it with :func:`load`, judges its headline claim at every point with :func:`judge_sweep`
(the verdicts of :mod:`effnb.evidence`), draws it with :func:`plot_sweep` beside its own live ci point, and
checks with :func:`agrees` that the live point lies where the stored one says. The stored verdicts come from
stored numbers, so they are the same on every machine and seed. Introduced in Chapter 2.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from effnb.evidence import ClaimSpec, Evidence, judge
from effnb.config import data_dir
from effnb.plot import color

__all__ = ["RESULTS_DIR", "MIN_POINTS", "MIN_SEEDS", "Point", "Sweep", "validate", "load", "point_specs", "judge_sweep",
           "plot_sweep", "sweep_axis", "agrees"]


RESULTS_DIR = data_dir("results")       # the stored sweeps: data/results in a clone, effnb/results from the wheel
MIN_POINTS, MIN_SEEDS = 3, 5
PROVENANCE = ("commit", "code", "cpu", "torch", "date", "wall_s", "device")


@dataclass(frozen=True)
class Point:
    """One point of a sweep: its configuration, its seeds and every arm's value at each seed."""

    config: dict
    seeds: tuple[int, ...]
    values: dict[str, tuple[float, ...]]
    seconds: float = 0.0

    def arm(self, name: str) -> np.ndarray:
        """The per-seed values of arm ``name``, in ``seeds`` order."""
        if name not in self.values:
            raise KeyError(f"arm {name!r} is not stored at this point; the stored arms are {sorted(self.values)}.")
        return np.asarray(self.values[name], dtype=float)


@dataclass(frozen=True)
class Sweep:
    """A stored sweep of one chapter along one axis (see the module docstring for the file's form)."""

    chapter: str
    axis: str
    axis_label: str
    points: tuple[Point, ...]
    provenance: dict

    @property
    def xs(self) -> list:
        """The axis value of every point, in order."""
        return [p.config[self.axis] for p in self.points]

    def at(self, value) -> Point:
        """The point whose axis value is ``value``."""
        for p in self.points:
            if p.config[self.axis] == value:
                return p
        raise KeyError(f"no stored point has {self.axis} = {value!r}; the stored points are {self.xs}.")


def validate(data: dict, name: str = "the sweep") -> None:
    """Raise ``ValueError`` with one sentence when ``data`` is not a complete stored sweep."""
    missing = [k for k in ("chapter", "axis", "axis_label", "provenance", "points") if k not in data]
    if missing:
        raise ValueError(f"{name} lacks {missing}; re-run make experiments CHAPTER=NN to write it again.")
    lacking = [k for k in PROVENANCE if k not in data["provenance"]]
    if lacking:
        raise ValueError(f"{name}'s provenance lacks {lacking}; re-run make experiments to record them.")
    points = data["points"]
    if len(points) < MIN_POINTS:
        raise ValueError(f"{name} has {len(points)} points; the tier needs at least {MIN_POINTS} on its axis.")
    for p in points:
        where = f"{name} at {data['axis']} = {p.get('config', {}).get(data['axis'])!r}"
        if data["axis"] not in p.get("config", {}):
            raise ValueError(f"{where}: the point's config lacks the axis {data['axis']!r}.")
        seeds = p.get("seeds", [])
        if len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds):
            raise ValueError(f"{where} has seeds {seeds}; the tier needs at least {MIN_SEEDS} distinct seeds.")
        for arm, values in p.get("values", {}).items():
            if len(values) != len(seeds) or not all(np.isfinite(values)):
                raise ValueError(f"{where}: arm {arm!r} needs one finite value per seed, got {values}.")
        if not p.get("values"):
            raise ValueError(f"{where} stores no arm's values.")


def load(chapter: str, directory: str | Path = RESULTS_DIR) -> Sweep:
    """The stored sweep ``<directory>/<chapter>.json``, validated."""
    path = Path(directory) / f"{chapter}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run make experiments CHAPTER={chapter[:2]} to make it.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); run make experiments CHAPTER={chapter[:2]} to write "
                         "it again.") from None
    validate(data, str(path))
    points = tuple(Point(p["config"], tuple(p["seeds"]), {a: tuple(v) for a, v in p["values"].items()},
                         float(p.get("seconds", 0.0))) for p in data["points"])
    return Sweep(data["chapter"], data["axis"], data["axis_label"], points, data["provenance"])


def point_specs(spec: ClaimSpec, sweep: Sweep) -> list[ClaimSpec]:
    """``spec`` at every point of ``sweep``: the point named in its statement (``[steps = 600]``), the point's
    seeds as its seeds. Print their ``declaration()`` before judging them with :func:`judge_sweep`."""
    return [dataclasses.replace(spec, statement=f"{spec.statement} [{sweep.axis} = {x}]", seeds=point.seeds)
            for point, x in zip(sweep.points, sweep.xs)]


def judge_sweep(spec: ClaimSpec, sweep: Sweep, method: str | Callable[[Point], Sequence[float]],
                baseline: str | None = None, aa: str | Callable[[Point], Sequence[float]] | None = None
                ) -> list[Evidence]:
    """``spec`` judged at every point of ``sweep`` (:func:`effnb.evidence.judge`), as :func:`point_specs` states
    it there. ``method`` and ``aa`` are arm names or functions of a point that give its
    per-seed values (e.g. a ratio of two arms); ``baseline`` is the paired arm of a ``"paired"`` claim."""
    def values(how, point):
        return point.arm(how) if isinstance(how, str) else np.asarray(how(point), dtype=float)

    return [judge(at, values(method, point), None if baseline is None else point.arm(baseline),
                  None if aa is None else values(aa, point)) for at, point in zip(point_specs(spec, sweep), sweep.points)]


def plot_sweep(ax, sweep: Sweep, evidence: list[Evidence], live: Evidence | dict | None = None, live_x=None,
               ylabel: str = "effect", log_x: bool = True) -> None:
    """The effect against the axis: each point's effect with its 95% interval, coloured by verdict, the A/A band
    (null ± floor) shaded, the threshold dashed, and the live run's point (open marker) where given: ``live`` at
    ``live_x``, or ``live={x: evidence, ...}`` for a run that measured several points."""
    xs = np.asarray(sweep.xs, dtype=float)
    spec = evidence[0].spec
    floors = [e.floor if e.floor is not None else 0.0 for e in evidence]
    ax.fill_between(xs, [spec.null - f for f in floors], [spec.null + f for f in floors], color=color("baseline"),
                    alpha=0.2, label="A/A band (null ± floor)")
    ax.axhline(spec.null, color="black", lw=0.6)
    ax.axhline(spec.threshold, color="black", lw=0.9, ls="--", label=f"threshold {spec.threshold:g}")
    ax.plot(xs, [e.effect for e in evidence], color="0.4", lw=0.8, zorder=1)
    for x, e in zip(xs, evidence):
        ax.errorbar([x], [e.effect], yerr=[[e.effect - e.lo], [e.hi - e.effect]], fmt="o", capsize=3,
                    color=color(e.outcome), zorder=2)
    for outcome in ("reproduced", "not reproduced", "inconclusive"):
        if any(e.outcome == outcome for e in evidence):
            ax.plot([], [], "o", color=color(outcome), label=f"stored: {outcome}")
    for i, (x, e) in enumerate((live if isinstance(live, dict) else {live_x: live} if live is not None else {}).items()):
        ax.errorbar([float(x)], [e.effect], yerr=[[e.effect - e.lo], [e.hi - e.effect]], fmt="s", mfc="white",
                    capsize=3, color="black", label=None if i else "this run (live)", zorder=3)
    sweep_axis(ax, sweep, log_x)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def sweep_axis(ax, sweep: Sweep, log_x: bool = True) -> None:
    """Label ``ax``'s x axis with the sweep's axis and put a tick at each stored point (log scale by default)."""
    xs = np.asarray(sweep.xs, dtype=float)
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(sweep.axis_label)


def agrees(stored: Evidence, live_effect: float) -> tuple[bool, float, float]:
    """Whether a live run's effect lies where the stored point says: inside the stored 95% interval widened by
    the stored A/A floor on each side. Returns (agrees, low edge, high edge)."""
    floor = stored.floor or 0.0
    lo, hi = stored.lo - floor, stored.hi + floor
    return bool(lo <= live_effect <= hi), lo, hi
