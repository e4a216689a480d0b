"""Record each chapter's claims for the book's *Reproduction report* page.

A chapter declares each claim of the paper before its arms run (:class:`effnb.evidence.ClaimSpec`), judges it
from per-seed values (:func:`effnb.evidence.judge`) and records the result with :func:`record_evidence`. Two
kinds are kept apart (DESIGN, *evidence standard*): a **claim** compares the paper's statement with a
measurement of this run that could have failed, and ends **reproduced**, **not reproduced** or
**inconclusive** from its 95% interval; a **check** (:func:`check_threshold`, or :func:`record_claim` with
``kind="check"``) shows that our code agrees with itself or with an equation, or that a baseline has learned.
A check never counts as a reproduced claim. When the
environment variable ``EFFNB_REPORT_DIR`` is set (the book build sets it), the claims are
written to ``<dir>/<chapter>.json``; ``scripts/build_book.py`` then turns every file into the
report page with :func:`claims_markdown`. Introduced in Chapter 0.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Literal

from effnb.config import check_choice
from effnb.evidence import OUTCOMES, Evidence, verdict_line

__all__ = ["KINDS", "Claim", "check_threshold", "claims_markdown", "forest_plot", "load_claims", "median_range",
           "record_claim", "record_evidence"]

Kind = Literal["claim", "check"]
KINDS: tuple[str, ...] = ("claim", "check")


@dataclass(frozen=True)
class Claim:
    """One record: what the paper reports, what this run measured, and whether it agrees.

    ``kind`` is ``"claim"`` (a measurement that could have failed) or ``"check"`` (our code agrees
    with itself or an equation); for a check, ``reproduced`` means "the check passed". ``value`` and
    ``threshold``, when given, are the number the verdict compared and the bound it was compared with:
    ``scripts/seed_sweep.py`` stores them, and ``tests/test_conventions.py`` uses them to show that a
    verdict nbval compares lies far outside its run-to-run spread. A judged claim
    (:func:`record_evidence`) also keeps its three-way ``outcome``, its 95% interval ``[lo, hi]``, the A/A
    ``floor`` and ``null``, its ``direction``, the number of ``seeds`` and the seeds ``needed``; ``value`` is then
    the effect.
    """

    chapter: str
    claim: str
    paper: str
    ours: str
    reproduced: bool
    note: str = ""
    kind: Kind = "claim"
    value: float | None = None
    threshold: float | None = None
    outcome: str | None = None
    lo: float | None = None
    hi: float | None = None
    floor: float | None = None
    null: float = 0.0
    direction: str = "higher"
    seeds: int | None = None
    needed: int | None = None
    unit: str = "seeds"

    @property
    def status(self) -> str:
        """``"passed"``/``"FAILED"`` for a check; the three-way outcome of a judged claim; for a claim recorded
        without an interval (older records), ``"reproduced"`` or ``"not reproduced"``."""
        if self.kind == "check":
            return "passed" if self.reproduced else "FAILED"
        return self.outcome or ("reproduced" if self.reproduced else "not reproduced")

    def verdict(self) -> str:
        """One line: ``[check passed] ...`` for a check; for a judged claim the evidence line with its 95%
        interval (:func:`effnb.evidence.verdict_line`). A claim's line holds measured numbers, so only a check
        may be printed in an nbval-checked cell."""
        if self.kind == "check":
            return f"[check {self.status}] {self.claim}"
        if self.outcome is None:
            return f"[{'reproduced' if self.reproduced else 'NOT reproduced'}] {self.claim}"
        return verdict_line(self.outcome, self.claim, self.value, self.lo, self.hi,
                            ">=" if self.direction == "higher" else "<=", self.threshold, self.floor, self.seeds,
                            self.needed, null=self.null, unit=self.unit)


def record_claim(chapter: str, claim: str, paper: str, ours: str, reproduced: bool, note: str = "",
                 kind: Kind = "claim", value: float | None = None, threshold: float | None = None) -> Claim:
    """Record one claim or check; write it under ``EFFNB_REPORT_DIR`` when that is set.

    ``chapter`` is the notebook's stem (``"00_measuring_efficiency"``), ``paper`` the paper's
    figure as text, ``ours`` this run's figure as text. ``kind="claim"`` is a measurement that
    could have failed, with its threshold stated before the result; ``kind="check"`` is a
    self-consistency test, which the report counts apart and never as reproduced. ``value`` and
    ``threshold`` (floats) record the number compared and its bound (see :class:`Claim`). A record
    with the same text replaces the earlier one. Raises ``TypeError`` unless ``reproduced`` is
    a bool, ``ValueError`` for an unknown ``kind``. Introduced in Chapter 0.
    """
    if not isinstance(reproduced, bool):
        raise TypeError(f"reproduced={reproduced!r} must be True or False, computed from the measurement.")
    if not chapter or not claim:
        raise ValueError("record_claim needs a non-empty chapter name and claim text.")
    check_choice("kind", kind, KINDS)
    value, threshold = (None if v is None else float(v) for v in (value, threshold))
    return _write(Claim(chapter, claim, str(paper), str(ours), reproduced, note, kind, value, threshold))


def _write(record: Claim) -> Claim:
    """Write ``record`` under ``EFFNB_REPORT_DIR`` when that is set, replacing a record with the same text."""
    directory = os.environ.get("EFFNB_REPORT_DIR")
    if directory:
        path = Path(directory) / f"{record.chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = [c for c in load_claims(path.parent) if c.chapter == record.chapter and c.claim != record.claim]
        rows = [asdict(c) for c in existing] + [asdict(record)]
        path.write_text(json.dumps(rows, indent=2) + "\n")
    return record


def record_evidence(chapter: str, evidence: Evidence, paper: str, ours: str = "", note: str = "") -> Claim:
    """Record a claim judged by :func:`effnb.evidence.judge`: its statement, effect, 95% interval, A/A floor and
    three-way verdict, beside the ``paper``'s figure as text. ``ours`` (default: the verdict line's numbers) and
    ``note`` add what the interval leaves out: the arms' own values, the scale, the machine. ``reproduced`` is
    true only for the outcome "reproduced". Introduced in Chapter 0."""
    if not isinstance(evidence, Evidence):
        raise TypeError(f"evidence={evidence!r} must be what effnb.evidence.judge returns.")
    spec = evidence.spec
    if not chapter:
        raise ValueError("record_evidence needs a non-empty chapter name.")
    ours = ours or f"{evidence.effect:.3f}, 95% CI [{evidence.lo:.3f}, {evidence.hi:.3f}]"
    return _write(Claim(chapter, spec.statement, str(paper), str(ours), evidence.outcome == "reproduced", note,
                        "claim", float(evidence.effect), float(spec.threshold), evidence.outcome, float(evidence.lo),
                        float(evidence.hi), None if evidence.floor is None else float(evidence.floor),
                        float(spec.null), spec.direction, len(spec.seeds), evidence.needed, spec.unit))


def check_threshold(chapter: str, check: str, value: float, threshold: float, at_least: bool = True,
                    ours: str | None = None, paper: str = "") -> Claim:
    """Record a check that ``value`` is at least (``at_least``) or at most ``threshold``: a baseline that
    learned, a count within its bound. The verdict is computed here from the two numbers, which the record
    keeps, so that the seed sweep can show how far the value stays from the threshold on every seed (DESIGN,
    *stable everywhere*). ``ours`` defaults to the value with three decimals. Introduced in Chapter 0.
    """
    value, threshold = float(value), float(threshold)
    passed = value >= threshold if at_least else value <= threshold
    return record_claim(chapter, check, paper or f"{'>=' if at_least else '<='} {threshold:g}",
                        f"{value:.3f}" if ours is None else ours, bool(passed), kind="check",
                        value=value, threshold=threshold)


def load_claims(directory: str | os.PathLike) -> list[Claim]:
    """Read every ``*.json`` claim file in ``directory``, sorted by chapter; ``[]`` if none.

    Raises ``ValueError`` naming the file when one is not a list of records written by
    :func:`record_claim` (a foreign JSON file in ``EFFNB_REPORT_DIR``, say).
    """
    claims: list[Claim] = []
    fields = set(Claim.__dataclass_fields__)
    required = {name for name, f in Claim.__dataclass_fields__.items() if f.default is MISSING}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not JSON ({err.msg}); remove it from EFFNB_REPORT_DIR, which holds "
                             "only the claim files record_claim writes.") from None
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and required <= set(r) <= fields and r.get("kind", "claim") in KINDS
                and r.get("outcome") in (None, *OUTCOMES) for r in rows):
            raise ValueError(f"{path} is not a claim file written by record_claim; remove it from "
                             "EFFNB_REPORT_DIR, which holds only those.")
        claims.extend(Claim(**row) for row in rows)
    return claims


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


STATUSES: tuple[str, ...] = (*OUTCOMES, "checks")
LETTER = {"reproduced": "R", "not reproduced": "N", "inconclusive": "I"}


def _effect(c: Claim) -> str:
    if c.outcome is None:
        return _cell(c.ours)
    return f"{c.value:.3f} [{c.lo:.3f}, {c.hi:.3f}]"


def claims_markdown(claims: list[Claim], stability: dict[tuple[str, str], list[str]] | None = None) -> str:
    """Markdown for the report page: the counts of reproduced / not reproduced / inconclusive claims and of
    checks; per chapter a table of its claims (verdict, effect with its 95% interval, threshold, and the
    verdicts at the seeds of ``stability``, which maps ``(chapter, claim)`` to one outcome per swept seed,
    ``""`` where that seed has no such claim), a list of its checks, and the paper's figure, this run's and the
    note per claim. Four narrow columns keep the page within 1280 px. A check is never a reproduced claim."""
    if not claims:
        return "No chapter has recorded a claim yet.\n"
    stability = stability or {}
    measured = [c for c in claims if c.kind == "claim"]
    checks = [c for c in claims if c.kind == "check"]
    counts = {o: sum(c.status == o for c in measured) for o in OUTCOMES}
    lines = [f"**{len(measured)} measured claims: {counts['reproduced']} reproduced, {counts['not reproduced']} "
             f"not reproduced, {counts['inconclusive']} inconclusive. {len(checks)} checks: "
             f"{sum(c.reproduced for c in checks)} passed** (a check is never counted as a reproduced claim).", "",
             "| chapter | claims | reproduced | not reproduced | inconclusive | checks passed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    chapters: dict[str, list[Claim]] = {}
    for c in claims:
        chapters.setdefault(c.chapter, []).append(c)
    for ch, cs in chapters.items():
        m, k = [c for c in cs if c.kind == "claim"], [c for c in cs if c.kind == "check"]
        lines.append(f"| {_cell(ch)} | {len(m)} | " + " | ".join(str(sum(c.status == o for c in m)) for o in OUTCOMES)
                     + f" | {sum(c.reproduced for c in k)} of {len(k)} |")
    for ch, cs in chapters.items():
        lines += ["", f"### {ch}", ""]
        m, k = [c for c in cs if c.kind == "claim"], [c for c in cs if c.kind == "check"]
        if m:
            lines += ["| claim | verdict | effect, 95% CI | threshold | at other seeds |", "| --- | --- | --- | --- | --- |"]
            for c in m:
                seeds = " ".join(LETTER.get(o, o[:1].upper() or "·") for o in stability.get((c.chapter, c.claim), []))
                mark = c.status if c.status == "reproduced" else f"**{c.status}**"
                bound = "" if c.threshold is None else f"{'≥' if c.direction == 'higher' else '≤'} {c.threshold:g}"
                floor = "" if c.floor is None else f", A/A ±{c.floor:.3f}"
                lines.append(f"| {_cell(c.claim)} | {mark} | {_effect(c)} | {bound}{floor} | {seeds or '—'} |")
        if k:
            lines += [""] + [f"- check {'passed' if c.reproduced else '**FAILED**'}: {_cell(c.claim)} ({_cell(c.ours)})"
                             for c in k]
        if m:
            lines += [""] + [f"- *{_cell(c.claim)}*. Paper: {_cell(c.paper)}. This run: {_cell(c.ours)}."
                             + (f" {_cell(c.note)}" if c.note else "") for c in m]
    return "\n".join(lines) + "\n"


def forest_plot(claims: list[Claim]):
    """One row per judged claim, grouped by chapter: the effect (dot) and its 95% interval (bar), the threshold
    (dashed line) and the A/A band (grey, null ± floor), each row on its own axis since units differ; the
    colour is the verdict. Returns the matplotlib figure, or ``None`` when no claim carries an interval."""
    from matplotlib.figure import Figure

    from effnb.plot import color, use_style

    rows = [c for c in claims if c.kind == "claim" and c.outcome is not None]
    if not rows:
        return None
    use_style()
    fig = Figure(figsize=(7.5, 0.62 * len(rows) + 0.9))     # the page's width: no pyplot, nothing global to close
    axes = fig.subplots(len(rows), 1, squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.7 / fig.get_figheight(), bottom=0.3 / fig.get_figheight(),
                        hspace=2.0)
    for ax, c, previous in zip(axes[:, 0], rows, [None, *rows[:-1]]):
        ends = [c.lo, c.hi, c.threshold] + ([] if c.floor is None else [c.null - c.floor, c.null + c.floor])
        pad = 0.08 * ((max(ends) - min(ends)) or 1.0)
        ax.set_xlim(min(ends) - pad, max(ends) + pad)
        if c.floor is not None:
            ax.axvspan(c.null - c.floor, c.null + c.floor, color="#bbbbbb", alpha=0.5, lw=0)
        ax.axvline(c.threshold, color="#000000", ls="--", lw=1)
        ax.plot([c.lo, c.hi], [0, 0], color=color(c.outcome), lw=3, solid_capstyle="butt")
        ax.plot([c.value], [0], "o", color=color(c.outcome), ms=6)
        ax.set_yticks([]), ax.grid(False), ax.tick_params(axis="x", labelsize=7.5, length=2, pad=1)
        ax.spines[["left", "top", "right"]].set_visible(False)
        claim = c.claim if len(c.claim) <= 96 else c.claim[:60] + " … " + c.claim[-33:]   # keep the distinguishing end
        ax.set_title(f"{c.chapter[:2]} · {claim}", loc="left", fontsize=8.5, pad=3)   # the claim above its own axis
        if previous is not None and previous.chapter != c.chapter:       # a rule between chapters
            ax.plot([0.0, 1.0], [2.45, 2.45], transform=ax.transAxes, clip_on=False, color="#888888", lw=0.6)
    fig.suptitle("effect and 95% CI (green reproduced, orange not reproduced, grey inconclusive); dashed: threshold; "
                 "grey band: A/A", fontsize=8, x=0.02, ha="left", y=1 - 0.15 / fig.get_figheight())
    return fig


def median_range(values, digits: int = 3) -> str:
    """``"median [min, max]"`` of a sequence of numbers, each with ``digits`` decimals: how a chapter reports
    a measurement over seeds. Raises ``ValueError`` for an empty sequence. Introduced in Chapter 3."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("median_range needs at least one value (one per seed).")
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return f"{median:.{digits}f} [{ordered[0]:.{digits}f}, {ordered[-1]:.{digits}f}]"
