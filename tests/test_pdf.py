"""The PDF edition (scripts/build_pdf.py): built once, then read back with pypdf and Debian's poppler-utils.

The module builds the site from the stored outputs and prints it with headless Chromium into
``_build/pdf-test/`` (about a minute; a PDF in ``_build/pdf`` from ``make pdf`` is left alone), then
checks the text (every chapter's title, equations typeset rather than raw TeX), the bookmarks against
``_toc.yml``, the figures (image XObjects in every chapter's pages) and the page numbers, and renders
three pages as PNG into ``_build/pdf/pages/`` to look at. It needs chromium and chromium-driver (as
tests/test_browser.py) and pdftotext/pdftoppm from poppler-utils; without them it is skipped with the
reason, or fails under ``CI=true``.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from build_pdf import MARGINS, toc_parts  # noqa: E402
from conftest import skip_or_fail  # noqa: E402

BUILD = ROOT / "_build" / "pdf-test"
PDF = BUILD / "effnb.pdf"
PAGES = ROOT / "_build" / "pdf" / "pages"
RAW_TEX = ("$$", "\\frac", "\\mathrm", "\\begin{", "\\(", "\\[", "\\cdot")


def require_tools() -> None:
    """Skip (locally) or fail (under CI=true) when chromium, chromedriver or poppler-utils is missing."""
    if not ((shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver")):
        skip_or_fail("PDF test: Debian's chromium and chromium-driver are not installed "
                     "(`apt-get install -y chromium chromium-driver`, which `make test` tries when run as root)")
    if not (shutil.which("pdftotext") and shutil.which("pdftoppm")):
        skip_or_fail("PDF test: pdftotext and pdftoppm are not installed (`apt-get install -y poppler-utils`)")


@pytest.fixture(scope="module", autouse=True)
def _tools_present() -> None:
    """Runs before the module's other fixtures, so nothing is built when a tool is missing."""
    require_tools()


@pytest.fixture(scope="module")
def pdf() -> Path:
    """The PDF edition, built once for the module into _build/pdf-test/effnb.pdf."""
    cmd = [sys.executable, str(ROOT / "scripts" / "build_pdf.py"), "--build-dir", str(BUILD / "site"),
           "--out", str(PDF)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"PDF build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return PDF


@pytest.fixture(scope="module")
def reader(pdf):
    """The PDF opened with pypdf."""
    from pypdf import PdfReader

    return PdfReader(pdf)


def flatten(reader) -> list[tuple[int, str, int]]:
    """The bookmarks as (depth, title, 0-based page) in order."""
    items: list[tuple[int, str, int]] = []

    def walk(nodes, depth: int) -> None:
        """Append ``nodes`` (pypdf's nested lists: a list follows its parent item) at ``depth``."""
        for node in nodes:
            if isinstance(node, list):
                walk(node, depth + 1)
            else:
                items.append((depth, node.title, reader.get_destination_page_number(node)))

    walk(reader.outline, 0)
    return items


@pytest.fixture(scope="module")
def chapters(reader) -> dict[str, range]:
    """Each page of the book (its _toc.yml file) and its range of 0-based pages in the PDF, from the bookmarks."""
    starts = [page for depth, _, page in flatten(reader) if depth == 1 or (depth == 0 and page == 0)]
    files = [f for _, group in toc_parts() for f in group]
    assert len(starts) == len(files), (starts, files)
    ends = starts[1:] + [len(reader.pages)]
    return {f: range(a, b) for f, a, b in zip(files, starts, ends)}


def source_title(file: str) -> str:
    """The title a page's source gives it: the first ``# `` line of its .md, or of its notebook's first
    markdown cell (which is the page's h1)."""
    path = ROOT / f"{file}.md"
    if path.exists():
        lines = path.read_text().splitlines()
    else:
        nb = nbformat.read(ROOT / f"{file}.ipynb", as_version=4)
        lines = next(c for c in nb.cells if c.cell_type == "markdown").source.splitlines()
    title = next(line[2:] for line in lines if line.startswith("# "))
    return re.sub(r"[`*_]", "", title).strip()


def words(text: str) -> str:
    """``text`` with every run of white space made one space (pdftotext breaks long headings)."""
    return " ".join(text.split())


def squash(text: str) -> str:
    """``text`` without white space and hyphens: pdftotext joins a heading broken after a hyphen
    ("Hands-" / "On" reads "HandsOn"), so titles are compared in this form."""
    return re.sub(r"[\s\-\u00ad\u2010\u2011]", "", text)


def page_text(pdf: Path, page: int, reader, part: str = "body") -> str:
    """pdftotext of 1-based ``page``: its ``body`` (above the bottom margin) or its ``footer`` (the margin)."""
    height = float(reader.pages[page - 1].mediabox.height)
    margin = MARGINS["marginBottom"] * 72
    top, span = (0, height - margin) if part == "body" else (height - margin, margin)
    cmd = ["pdftotext", "-q", "-f", str(page), "-l", str(page), "-x", "0", "-y", str(int(top)),
           "-W", "10000", "-H", str(int(span)), str(pdf), "-"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def image_count(page) -> int:
    """Image XObjects drawn on ``page``, also inside its form XObjects."""
    def count(resources, seen: set) -> int:
        """Images among ``resources``' XObjects, recursing into forms; ``seen`` guards against cycles."""
        total = 0
        xobjects = (resources or {}).get("/XObject") or {}
        for ref in xobjects.values():
            key = getattr(ref, "idnum", id(ref))
            if key in seen:
                continue
            seen.add(key)
            obj = ref.get_object()
            if obj.get("/Subtype") == "/Image":
                total += 1
            elif obj.get("/Subtype") == "/Form":
                total += count(obj.get("/Resources"), seen)
        return total

    return count(page.get("/Resources"), set())


def test_every_chapter_title_and_the_intro_are_in_the_text(pdf, reader, chapters):
    for file, pages in chapters.items():
        title = source_title(file)
        first = page_text(pdf, pages.start + 1, reader)
        assert squash(title) in squash(first), \
            f"{file}: {title!r} is not on its first page ({pages.start + 1}): {words(first)[:300]!r}"
    assert squash("Efficient Deep Learning, Hands-On") in squash(page_text(pdf, 1, reader))


def test_bookmarks_follow_the_toc(reader):
    items = flatten(reader)
    expected: list[tuple[int, str]] = []
    for caption, group in toc_parts():
        if caption is None:
            expected += [(0, source_title(f)) for f in group]
        else:
            expected += [(0, caption)] + [(1, source_title(f)) for f in group]
    assert [(depth, words(title)) for depth, title, _ in items] == [(d, words(t)) for d, t in expected]
    assert items[0][2] == 0, "the intro is not the first page"
    pages = [page for depth, _, page in items if depth == 1]
    assert pages == sorted(pages) and len(set(pages)) == len(pages), f"chapters out of order: {pages}"
    for (depth, title, page), nxt in zip(items, items[1:]):
        if depth == 0 and nxt[0] == 1:
            assert page == nxt[2], f"part {title!r} does not point at its first chapter"


def test_document_title_metadata(reader):
    assert reader.metadata.title == "Efficient Deep Learning, Hands-On"


def test_every_notebook_chapter_has_its_figures(reader, chapters):
    counts = {file: sum(image_count(reader.pages[i]) for i in pages) for file, pages in chapters.items()}
    missing = [file for file, n in counts.items() if file.startswith("notebooks/") and n == 0]
    assert not missing, f"no image in the pages of {missing}: {counts}"
    assert sum(counts.values()) >= 3 * sum(f.startswith("notebooks/") for f in counts), counts


def test_equations_are_typeset_not_raw_tex(pdf, reader, chapters):
    text = "".join(page_text(pdf, i + 1, reader) for i in chapters["book/notation"])
    raw = [marker for marker in RAW_TEX if marker in text]
    assert not raw, f"raw TeX {raw} on the notation pages"
    assert any(ch in text for ch in "πβα"), "no typeset Greek letter on the notation pages"


def test_pages_are_numbered_continuously(pdf, reader, chapters):
    last = len(reader.pages)
    assert words(page_text(pdf, last, reader, "footer")).split()[-1] == str(last)
    middle = chapters["notebooks/00_measuring_efficiency"].start + 2
    footer = words(page_text(pdf, middle, reader, "footer"))
    assert footer.endswith(str(middle)) and "Chapter 0" in footer, footer


def render(pdf: Path, page: int, name: str) -> Path:
    """``pdftoppm -png -r 60`` of 1-based ``page`` into _build/pdf/pages/NAME.png; return the path."""
    PAGES.mkdir(parents=True, exist_ok=True)
    subprocess.run(["pdftoppm", "-png", "-r", "60", "-f", str(page), "-l", str(page), "-singlefile",
                    str(pdf), str(PAGES / name)], check=True)
    return PAGES / f"{name}.png"


def test_render_title_figure_and_equation_pages(pdf, reader, chapters):
    first_chapter = chapters["notebooks/00_measuring_efficiency"]
    figure = next(i for i in first_chapter if image_count(reader.pages[i]))
    notation = chapters["book/notation"]
    width_in = float(reader.pages[0].mediabox.width) / 72
    for name, page in (("title", 1), ("chapter-figure", figure + 1), ("equations", notation.stop)):
        path = render(pdf, page, name)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        width, height = struct.unpack(">II", data[16:24])
        assert abs(width - round(60 * width_in)) <= 2 and height > width, (path, width, height)
        assert len(data) > 15_000, f"{path} is only {len(data)} bytes: an empty page?"
    print(f"pages rendered in {PAGES}")
