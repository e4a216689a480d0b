"""Record each chapter's claims for the book's *Reproduction report* page.

A chapter's claim cell calls :func:`record_claim` once per claim of the paper. When the
environment variable ``EFFNB_REPORT_DIR`` is set (the book build sets it), the claims are
written to ``<dir>/<chapter>.json``; ``scripts/build_book.py`` then turns every file into the
report page with :func:`claims_markdown`. Introduced in Chapter 0.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Claim", "claims_markdown", "load_claims", "record_claim"]


@dataclass(frozen=True)
class Claim:
    """One claim: what the paper reports, what this run measured, and whether it agrees."""

    chapter: str
    claim: str
    paper: str
    ours: str
    reproduced: bool
    note: str = ""

    def verdict(self) -> str:
        """A one-line, machine-independent summary, safe to print in an nbval-checked cell."""
        return f"[{'reproduced' if self.reproduced else 'NOT reproduced'}] {self.claim}"


def record_claim(chapter: str, claim: str, paper: str, ours: str, reproduced: bool, note: str = "") -> Claim:
    """Record one claim; write it under ``EFFNB_REPORT_DIR`` when that is set.

    ``chapter`` is the notebook's stem (``"00_measuring_efficiency"``), ``paper`` the paper's
    figure as text, ``ours`` this run's figure as text. A claim recorded again with the same
    text replaces the earlier record. Raises ``TypeError`` unless ``reproduced`` is a bool.
    Introduced in Chapter 0.
    """
    if not isinstance(reproduced, bool):
        raise TypeError(f"reproduced={reproduced!r} must be True or False, computed from the measurement.")
    if not chapter or not claim:
        raise ValueError("record_claim needs a non-empty chapter name and claim text.")
    record = Claim(chapter, claim, str(paper), str(ours), reproduced, note)
    directory = os.environ.get("EFFNB_REPORT_DIR")
    if directory:
        path = Path(directory) / f"{chapter}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = [c for c in load_claims(path.parent) if c.chapter == chapter and c.claim != claim]
        rows = [asdict(c) for c in existing] + [asdict(record)]
        path.write_text(json.dumps(rows, indent=2) + "\n")
    return record


def load_claims(directory: str | os.PathLike) -> list[Claim]:
    """Read every ``*.json`` claim file in ``directory``, sorted by chapter; ``[]`` if none."""
    claims: list[Claim] = []
    for path in sorted(Path(directory).glob("*.json")):
        claims.extend(Claim(**row) for row in json.loads(path.read_text()))
    return claims


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def claims_markdown(claims: list[Claim]) -> str:
    """Markdown for the report page: a per-chapter summary, then one row per claim.

    The detail table puts the verdict right after the claim so that it stays visible on narrow screens.
    """
    if not claims:
        return "No chapter has recorded a claim yet.\n"
    done = sum(c.reproduced for c in claims)
    chapters: dict[str, list[Claim]] = {}
    for c in claims:
        chapters.setdefault(c.chapter, []).append(c)
    lines = [f"{done} of {len(claims)} claims reproduced.", "", "| chapter | claims | reproduced |", "| --- | ---: | ---: |"]
    lines += [f"| {_cell(ch)} | {len(cs)} | {sum(c.reproduced for c in cs)} |" for ch, cs in chapters.items()]
    lines += ["", "| chapter | claim | reproduced | paper | this run | note |", "| --- | --- | --- | --- | --- | --- |"]
    for c in claims:
        mark = "yes" if c.reproduced else "**no**"
        lines.append(
            f"| {_cell(c.chapter)} | {_cell(c.claim)} | {mark} | {_cell(c.paper)} | {_cell(c.ours)} | {_cell(c.note)} |"
        )
    return "\n".join(lines) + "\n"
