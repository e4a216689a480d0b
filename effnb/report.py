"""Record each chapter's claims for the book's *Reproduction report* page.

A chapter's claim cell calls :func:`record_claim` once per claim of the paper. Two kinds are
kept apart (DESIGN, *evidence standard*): a **claim** compares the paper's statement with a
measurement of this run that could have failed; a **check** shows that our code agrees with
itself or with an equation. A check never counts as a reproduced claim. When the
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

__all__ = ["KINDS", "Claim", "check_threshold", "claims_markdown", "load_claims", "median_range", "record_claim"]

Kind = Literal["claim", "check"]
KINDS: tuple[str, ...] = ("claim", "check")


@dataclass(frozen=True)
class Claim:
    """One record: what the paper reports, what this run measured, and whether it agrees.

    ``kind`` is ``"claim"`` (a measurement that could have failed) or ``"check"`` (our code agrees
    with itself or an equation); for a check, ``reproduced`` means "the check passed". ``value`` and
    ``threshold``, when given, are the number the verdict compared and the bound it was compared with:
    ``scripts/seed_sweep.py`` stores them, and ``tests/test_conventions.py`` uses them to show that a
    verdict nbval compares lies far outside its run-to-run spread.
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

    def verdict(self) -> str:
        """A one-line, machine-independent summary, safe to print in an nbval-checked cell."""
        if self.kind == "check":
            return f"[check {'passed' if self.reproduced else 'FAILED'}] {self.claim}"
        return f"[{'reproduced' if self.reproduced else 'NOT reproduced'}] {self.claim}"


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
    record = Claim(chapter, claim, str(paper), str(ours), reproduced, note, kind, value, threshold)
    directory = os.environ.get("EFFNB_REPORT_DIR")
    if directory:
        path = Path(directory) / f"{chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = [c for c in load_claims(path.parent) if c.chapter == chapter and c.claim != claim]
        rows = [asdict(c) for c in existing] + [asdict(record)]
        path.write_text(json.dumps(rows, indent=2) + "\n")
    return record


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
                isinstance(r, dict) and required <= set(r) <= fields and r.get("kind", "claim") in KINDS for r in rows):
            raise ValueError(f"{path} is not a claim file written by record_claim; remove it from "
                             "EFFNB_REPORT_DIR, which holds only those.")
        claims.extend(Claim(**row) for row in rows)
    return claims


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_markdown(claims: list[Claim]) -> str:
    """Markdown for the report page: a per-chapter summary, then one row per claim or check.

    Measured claims and checks are counted apart: a check that passes is not a reproduced claim.
    The detail table puts the verdict right after the claim so that it stays visible on narrow screens.
    """
    if not claims:
        return "No chapter has recorded a claim yet.\n"
    measured = [c for c in claims if c.kind == "claim"]
    checks = [c for c in claims if c.kind == "check"]
    chapters: dict[str, list[Claim]] = {}
    for c in claims:
        chapters.setdefault(c.chapter, []).append(c)
    lines = [
        f"{sum(c.reproduced for c in measured)} of {len(measured)} measured claims reproduced; "
        f"{sum(c.reproduced for c in checks)} of {len(checks)} checks passed.",
        "",
        "| chapter | measured claims | reproduced | checks | passed |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for ch, cs in chapters.items():
        m = [c for c in cs if c.kind == "claim"]
        k = [c for c in cs if c.kind == "check"]
        lines.append(f"| {_cell(ch)} | {len(m)} | {sum(c.reproduced for c in m)} | {len(k)} | "
                     f"{sum(c.reproduced for c in k)} |")
    lines += ["", "| chapter | kind | claim | verdict | paper | this run | note |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in sorted(claims, key=lambda c: (c.chapter, c.kind != "claim")):
        if c.kind == "check":
            mark = "passed" if c.reproduced else "**FAILED**"
        else:
            mark = "reproduced" if c.reproduced else "**not reproduced**"
        lines.append(f"| {_cell(c.chapter)} | {c.kind} | {_cell(c.claim)} | {mark} | {_cell(c.paper)} | "
                     f"{_cell(c.ours)} | {_cell(c.note)} |")
    return "\n".join(lines) + "\n"


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
