"""Build the book's PDF edition: every page of the HTML site printed by headless Chromium, in one PDF.

  python scripts/build_pdf.py                       # site from the stored outputs -> _build/pdf/effnb.pdf
  python scripts/build_pdf.py --html _build/html    # print an already built site (e.g. from `make book`)
  python scripts/build_pdf.py --paper Letter --out effnb-letter.pdf

Without ``--html`` the site is rendered from the outputs stored in the notebooks with
``scripts/build_book.py --no-execute`` into ``_build/pdf/site/html`` (about 20 s; nothing is executed).
The site is served by Python's http.server on 127.0.0.1 and every page of ``_toc.yml`` (the root page,
then each part's chapters) is opened in Debian's headless Chromium through selenium and chromedriver,
as tests/test_browser.py does. After the page, its images and MathJax's equations have loaded, a little
print stylesheet is added (code wraps instead of scrolling, figures do not break across pages, the
"Open in Colab" badge, an image from another site, is dropped) and the page is printed with the
DevTools command ``Page.printToPDF``.

pypdf then merges the pages into one PDF: bookmarks for the root page and for each part (its
``_toc.yml`` caption) with one child per chapter (the page's h1), links between pages of the book
pointing into the PDF instead of at the local server, continuous page numbers (a second print of N
numbered, otherwise empty pages, stamped onto the content with ``merge_page``) and the book's title
and author as document metadata. Nothing is fetched from the internet.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import html
import io
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build" / "pdf"
SITE = BUILD / "site"
OUT = BUILD / "effnb.pdf"

# Paper sizes in inches (what Page.printToPDF takes) and the margins around the printed page. The
# bottom margin leaves room for the running footer (chapter title and page number) stamped later.
PAPERS = {"A4": (8.27, 11.69), "Letter": (8.5, 11.0)}
MARGINS = {"marginTop": 0.6, "marginBottom": 0.75, "marginLeft": 0.6, "marginRight": 0.6}
FOOTER_FROM_BOTTOM_IN = 0.45  # baseline area of the footer, inside the bottom margin
SCALE = 0.8  # the theme's screen-sized type at 80 %: about a book's density on A4
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")
INSTALL_BROWSER = "apt-get install -y chromium chromium-driver"

# Added to every page before printing (sphinx-book-theme's own print rules already hide the header,
# the sidebars and the buttons). Code cells and outputs scroll on screen; on paper they must wrap,
# and a scroll container is also unbreakable in Chromium's print layout, which left pages half empty;
# the theme keeps each code block in one piece, which left an empty cell frame at the foot of a page.
PRINT_CSS = """
@media print {
  html { font-size: 100% !important; }
  .bd-article pre, .bd-article div.highlight, .bd-article .cell_output, .bd-article .output,
  .bd-article .pst-scrollable-table-container, .bd-article .table-wrapper, .bd-article .math-wrapper {
    overflow: visible !important; max-height: none !important; }
  .bd-article pre { white-space: pre-wrap !important; overflow-wrap: anywhere !important; orphans: 3; widows: 3; }
  .bd-article div.highlight { break-inside: auto !important; }
  .bd-article img { max-width: 100% !important; height: auto !important; }
  .bd-article img, .bd-article figure, .bd-article svg, .bd-article mjx-container[display="true"],
  .bd-article .cell_output img, .bd-article tr, .bd-article .admonition-title {
    break-inside: avoid !important; page-break-inside: avoid !important; }
  .bd-article h1, .bd-article h2, .bd-article h3, .bd-article h4 {
    break-after: avoid !important; page-break-after: avoid !important; }
  .bd-article mjx-container[display="true"] { overflow: visible !important; }
  a.headerlink { display: none !important; }
  #jb-print-docs-body h1 { font-size: 2.6em !important; }
}
"""

# Drop images from other sites (the "Open in Colab" badge: it cannot load offline and is a button,
# not a figure) together with their link and a paragraph they leave empty; add the stylesheet.
PREPARE_JS = """
const css = document.createElement('style');
css.textContent = arguments[0];
document.head.appendChild(css);
for (const img of Array.from(document.images)) {
  if (img.currentSrc.startsWith(location.origin) || img.src.startsWith(location.origin)) continue;
  let node = img.closest('a') || img;
  const parent = node.parentElement;
  node.remove();
  if (parent && parent.tagName === 'P' && parent.textContent.trim() === '' && !parent.querySelector('img'))
    parent.remove();
}
"""

TITLE_JS = """
const h = document.querySelector('article.bd-article h1') || document.querySelector('main h1, h1');
if (!h) return document.title.split(' \u2014 ')[0];
const copy = h.cloneNode(true);
copy.querySelectorAll('.headerlink').forEach(a => a.remove());
return copy.textContent.trim();
"""

IMAGES_LOADED_JS = "return Array.from(document.images).every(i => i.complete)"
BROKEN_IMAGES_JS = ("return Array.from(document.images).filter(i => !(i.naturalWidth > 0))"
                    ".map(i => i.currentSrc || i.src)")
MATH_TYPESET_JS = ("return !!(window.MathJax && MathJax.startup && MathJax.startup.document"
                   " && MathJax.startup.document.processed !== undefined"
                   " && document.querySelectorAll('mjx-container').length > 0)")
MATH_COUNTS_JS = ("return {rendered: document.querySelectorAll('mjx-container').length,"
                  " errors: document.querySelectorAll('mjx-merror').length,"
                  " raw: document.querySelectorAll('.math:not(:has(mjx-container))').length}")
# Resolves once MathJax's startup typesetting and every web font (MathJax's CHTML fonts) are ready.
FONTS_READY_JS = """
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
ready.then(() => document.fonts.ready).then(() => done(true), () => done(true));
"""


class PdfBuildError(RuntimeError):
    """A step of the PDF build failed; the message is one sentence for the reader."""


@dataclass
class Entry:
    """One page of the book: its ``_toc.yml`` file (no extension) and the part it belongs to."""

    file: str
    part: str | None  # the part's caption; None for the root page
    title: str = ""
    pdf: bytes = b""
    first_page: int = 0  # 0-based index of its first page in the merged PDF
    page_count: int = 0
    anchors: dict[str, tuple[int, float | None, float | None]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- table of contents
def toc_parts(root: Path = ROOT) -> list[tuple[str | None, list[str]]]:
    """The book's pages from ``_toc.yml`` grouped by part: ``[(None, [root]), (caption, [files]), ...]``.

    Every ``file:`` under a part counts, nested ``sections`` included, in the order
    scripts/run_notebooks.py's ``toc_files`` walks them (that module imports torch, so the walk is
    repeated here rather than imported). Chapters outside any part (a toc with ``chapters`` at the top
    level) form a group whose caption is None: like the root, they become top-level bookmarks.
    """
    toc = yaml.safe_load((root / "_toc.yml").read_text())

    def files(node: object) -> list[str]:
        """Every ``file:`` value under ``node``, depth first."""
        found: list[str] = []
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                found.append(node["file"])
            for key, value in node.items():
                if key != "file":
                    found += files(value)
        elif isinstance(node, list):
            for item in node:
                found += files(item)
        return found

    groups: list[tuple[str | None, list[str]]] = [(None, [toc["root"]])]
    for part in toc.get("parts", []):
        groups.append((part.get("caption"), files(part.get("chapters", []))))
    if "chapters" in toc:
        groups.append((None, files(toc["chapters"])))
    return groups


def toc_entries(root: Path = ROOT) -> list[Entry]:
    """Every page of ``_toc.yml`` in reading order, each with its part's caption."""
    return [Entry(file=f, part=caption) for caption, group in toc_parts(root) for f in group]


def book_metadata(root: Path = ROOT) -> dict[str, str]:
    """The book's title and author from ``_config.yml``."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    return {"title": str(config.get("title", "")), "author": str(config.get("author", ""))}


# ----------------------------------------------------------------------------- site and browser
def build_site(build_dir: Path) -> Path:
    """Render the site from the notebooks' stored outputs into ``build_dir``/html; return that folder.

    Runs ``scripts/build_book.py --no-execute --build-dir build_dir``; its (long) log is shown only
    when it fails, and then :class:`PdfBuildError` is raised.
    """
    cmd = [sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute", "--build-dir", str(build_dir)]
    print(f"building the HTML site from the stored outputs into {rel(build_dir / 'html')} ...", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0 or not (build_dir / "html" / "index.html").exists():
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise PdfBuildError(f"the HTML site build failed (`scripts/build_book.py --no-execute --build-dir "
                            f"{rel(build_dir)}` exited {result.returncode}; "
                            "its log is above), so there is nothing to print")
    print(f"  site built in {time.perf_counter() - start:.0f} s", flush=True)
    return build_dir / "html"


def find_browser() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver; :class:`PdfBuildError` naming the apt-get line when missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p)
        raise PdfBuildError(f"{missing} not found: the PDF is printed by Debian's headless Chromium; "
                            f"install it with `{INSTALL_BROWSER}` (as root)")
    return chromium, driver


class QuietHandler(SimpleHTTPRequestHandler):
    """Serve files without logging every request to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Drop the request log line."""


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port) in a thread; yield the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def start_chromium(profile_dir: Path | str, window: str = "1280,900"):
    """Headless Debian Chromium under selenium, with the flags that work as root and offline (no background
    networking, which a closed network refuses), a profile in ``profile_dir`` and a ``window`` size.

    Shared by ``make pdf`` and the browser, Lab and PDF tests (conftest.py).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--window-size={window}", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    return driver


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """:func:`start_chromium` with a temporary profile folder, quit on exit."""
    with tempfile.TemporaryDirectory(prefix="effnb-pdf-chromium-") as profile:
        driver = start_chromium(profile)
        try:
            yield driver
        finally:
            driver.quit()


def print_options(paper: str, **extra: object) -> dict:
    """Arguments of ``Page.printToPDF`` for ``paper`` (A4 or Letter) with the book's margins and scale."""
    width, height = PAPERS[paper]
    options = {"printBackground": True, "paperWidth": width, "paperHeight": height, "scale": SCALE,
               "preferCSSPageSize": False, "displayHeaderFooter": False, **MARGINS}
    options.update(extra)
    return options


def print_page(driver, url: str, paper: str = "A4") -> tuple[bytes, str]:
    """Open ``url``, wait for its images, equations and fonts, and print it; return (PDF bytes, its h1).

    Raises :class:`PdfBuildError` when one of the site's images does not load or MathJax leaves an
    equation untypeset or in error, so a PDF with a missing figure or raw TeX is never written.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    name = urlsplit(url).path
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
        driver.execute_script(PREPARE_JS, PRINT_CSS)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(IMAGES_LOADED_JS))
        if driver.execute_script("return document.querySelectorAll('.math').length") > 0:
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(MATH_TYPESET_JS))
        driver.set_script_timeout(60)
        driver.execute_async_script(FONTS_READY_JS)
    except TimeoutException as exc:
        raise PdfBuildError(f"{name} did not finish loading (its images or MathJax) within the time limit") from exc
    broken = driver.execute_script(BROKEN_IMAGES_JS)
    if broken:
        raise PdfBuildError(f"{name}: {len(broken)} image(s) did not load, e.g. {broken[0]}")
    math = driver.execute_script(MATH_COUNTS_JS)
    if math["raw"] or math["errors"]:
        raise PdfBuildError(f"{name}: MathJax left {math['raw']} equation(s) as raw TeX and {math['errors']} in error")
    title = driver.execute_script(TITLE_JS)
    data = driver.execute_cdp_cmd("Page.printToPDF", print_options(paper))["data"]
    return base64.b64decode(data), title


def footer_html(labels: list[str], paper: str) -> str:
    """An HTML document of ``len(labels)`` pages of ``paper`` size, each empty but for a footer:
    the page's label (its chapter's title) on the left and its number, 1..N, on the right."""
    width, height = PAPERS[paper]
    left, right = MARGINS["marginLeft"], MARGINS["marginRight"]
    pages = "".join(
        f'<div class="page"><div class="footer"><span>{html.escape(label)}</span><span>{number}</span></div></div>'
        for number, label in enumerate(labels, start=1))
    # Each page box is a little shorter than the paper so rounding never spills a blank page.
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><style>
@page {{ size: {width}in {height}in; margin: 0; }}
html, body {{ margin: 0; padding: 0; background: transparent; }}
.page {{ position: relative; width: {width}in; height: {height - 0.05}in; overflow: hidden;
         break-after: page; page-break-after: always; }}
.page:last-child {{ break-after: auto; page-break-after: auto; }}
.footer {{ position: absolute; left: {left}in; right: {right}in; top: {height - FOOTER_FROM_BOTTOM_IN - 0.12}in;
           display: flex; justify-content: space-between; gap: 2em; border-top: 0.5pt solid #bbb;
           padding-top: 3pt; font: 8.5pt "DejaVu Sans", sans-serif; color: #555; }}
.footer span:first-child {{ overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }}
</style></head><body>{pages}</body></html>"""


def print_footers(driver, labels: list[str], paper: str) -> bytes:
    """Print :func:`footer_html` of ``labels`` through Chromium at scale 1, no margins; return the PDF."""
    driver.get("data:text/html;base64," + base64.b64encode(footer_html(labels, paper).encode()).decode())
    wait_ready(driver)
    options = print_options(paper, printBackground=False, scale=1.0, marginTop=0, marginBottom=0,
                            marginLeft=0, marginRight=0)
    return base64.b64decode(driver.execute_cdp_cmd("Page.printToPDF", options)["data"])


def wait_ready(driver) -> None:
    """Wait until the current document has loaded and its fonts are ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    driver.set_script_timeout(30)
    driver.execute_async_script("const done = arguments[0]; document.fonts.ready.then(() => done(true));")


# ----------------------------------------------------------------------------- merging
def merge(entries: list[Entry], footers: bytes | None, base: str, metadata: dict[str, str]):
    """One :class:`pypdf.PdfWriter` of every entry's pages, with bookmarks, links, numbers and metadata.

    ``entries`` carry their printed PDF; ``footers`` is :func:`print_footers`' output (one page per
    content page, stamped on top of it) or None; ``base`` is the URL the site was served from, so
    that links between the book's pages can be pointed at the right page of the PDF.
    """
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for entry in entries:
        reader = PdfReader(io.BytesIO(entry.pdf))
        entry.first_page = len(writer.pages)
        entry.page_count = len(reader.pages)
        for page in reader.pages:
            writer.add_page(page)
        for name, dest in reader.named_destinations.items():
            try:
                number = reader.get_destination_page_number(dest)
            except Exception:  # noqa: BLE001 - a destination without a page is simply not kept
                continue
            if number >= 0:
                entry.anchors[str(name).lstrip("/")] = (entry.first_page + number, _num(dest.left), _num(dest.top))
    if footers is not None:
        stamps = PdfReader(io.BytesIO(footers))
        if len(stamps.pages) != len(writer.pages):
            raise PdfBuildError(f"the page-number overlay has {len(stamps.pages)} pages for "
                                f"{len(writer.pages)} pages of content")
        for page, stamp in zip(writer.pages, stamps.pages):
            page.merge_page(stamp)
            page.compress_content_streams()  # merge_page leaves the joined stream uncompressed (10x larger)
    add_destinations(writer, entries)
    relink(writer, entries, base)
    add_outline(writer, entries)
    writer.add_metadata({"/Title": metadata["title"], "/Author": metadata["author"],
                         "/Subject": "PDF edition, printed from the HTML book", "/Creator": "scripts/build_pdf.py"})
    writer.page_mode = "/UseOutlines"
    return writer


def _num(value: object) -> float | None:
    """A destination coordinate as a float, or None when it is unset."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def anchor_name(file: str, anchor: str) -> str:
    """The merged PDF's name for the element ``#anchor`` of page ``file`` (names are per page in the site)."""
    return f"{file}#{anchor}"


def add_destinations(writer, entries: list[Entry]) -> None:
    """Register every page's anchors as named destinations of the merged PDF (see :func:`anchor_name`)."""
    from pypdf.generic import ArrayObject, FloatObject, NameObject, NullObject

    for entry in entries:
        for anchor, (number, left, top) in entry.anchors.items():
            array = ArrayObject([writer.pages[number].indirect_reference, NameObject("/XYZ"),
                                 NullObject() if left is None else FloatObject(left),
                                 NullObject() if top is None else FloatObject(top), NullObject()])
            writer.add_named_destination_array(anchor_name(entry.file, anchor), writer._add_object(array))


def relink(writer, entries: list[Entry], base: str) -> None:
    """Point the links of the merged PDF inside it.

    Chromium writes a link within a page as a named destination of that page's own PDF (renamed by
    :func:`add_destinations`) and a link to another page of the site as a URL on the local server,
    which is gone once the PDF is written: such a link goes to the anchor's place in the PDF, or the
    page's first page, and a link to a page the PDF does not hold (the index, a download) is removed.
    Links to other sites are kept.
    """
    from pypdf.generic import ArrayObject, NameObject, TextStringObject

    by_file = {entry.file: entry for entry in entries}
    owner = [entry for entry in entries for _ in range(entry.page_count)]
    for number, page in enumerate(writer.pages):
        annots = page.get("/Annots")
        if annots is None:
            continue
        annots = annots.get_object()
        keep = []
        for ref in annots:
            annot = ref.get_object()
            target: object = "keep"
            if annot.get("/Subtype") == "/Link":
                if "/Dest" in annot and not isinstance(annot["/Dest"], ArrayObject):
                    target = (owner[number].file, str(annot["/Dest"]).lstrip("/"))
                elif "/A" in annot and str(annot["/A"].get_object().get("/URI", "")).startswith(base):
                    url = urlsplit(str(annot["/A"].get_object()["/URI"]))
                    path = unquote(url.path).lstrip("/")
                    path = path[: -len(".html")] if path.endswith(".html") else path
                    target = (path, url.fragment) if path in by_file else None
            if target is None:
                continue
            if isinstance(target, tuple):
                file, anchor = target
                entry = by_file.get(file)
                if entry is None:
                    continue
                annot.pop("/A", None)
                if anchor in entry.anchors:
                    annot[NameObject("/Dest")] = TextStringObject(anchor_name(file, anchor))
                else:
                    annot[NameObject("/Dest")] = ArrayObject([writer.pages[entry.first_page].indirect_reference,
                                                             NameObject("/Fit")])
            keep.append(ref)
        page[NameObject("/Annots")] = ArrayObject(keep)


def add_outline(writer, entries: list[Entry]) -> None:
    """Bookmarks: the root page, then one item per part (its caption) with one child per chapter."""
    parents: dict[str, object] = {}
    for entry in entries:
        if entry.part is None:
            writer.add_outline_item(title=entry.title, page_number=entry.first_page)
            continue
        if entry.part not in parents:
            parents[entry.part] = writer.add_outline_item(title=entry.part, page_number=entry.first_page)
        writer.add_outline_item(title=entry.title, page_number=entry.first_page, parent=parents[entry.part])


# ----------------------------------------------------------------------------- the whole build
def build_pdf(html_dir: Path, out: Path, paper: str = "A4", numbers: bool = True) -> int:
    """Print every ``_toc.yml`` page of the site in ``html_dir`` and write the merged PDF to ``out``.

    Returns the number of pages. Raises :class:`PdfBuildError` (one sentence) when the browser is
    missing, a page of the toc is not in the site, or a page fails to load its figures or equations.
    """
    from pypdf import PdfReader

    find_browser()
    entries = toc_entries()
    missing = [e.file for e in entries if not (html_dir / f"{e.file}.html").exists()]
    if missing:
        raise PdfBuildError(f"{rel(html_dir)} lacks {', '.join(m + '.html' for m in missing)}: "
                            "build the site again (or leave out --html)")
    metadata = book_metadata()
    start = time.perf_counter()
    with serve(html_dir) as base, chromium() as driver:
        print(f"printing {len(entries)} pages with headless Chromium ({paper}) ...", flush=True)
        for i, entry in enumerate(entries, start=1):
            t0 = time.perf_counter()
            entry.pdf, entry.title = print_page(driver, f"{base}/{entry.file}.html", paper)
            entry.page_count = len(PdfReader(io.BytesIO(entry.pdf)).pages)
            print(f"  [{i:2d}/{len(entries)}] {entry.file}: {entry.title!r}, {entry.page_count} pages "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        labels = [entry.title if entry.part is not None else metadata["title"]
                  for entry in entries for _ in range(entry.page_count)]
        footers = print_footers(driver, labels, paper) if numbers else None
        writer = merge(entries, footers, base, metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as stream:
        writer.write(stream)
    tmp.replace(out)
    pages = len(writer.pages)
    print(f"pdf: {rel(out)} ({pages} pages, {out.stat().st_size / 1e6:.1f} MB, "
          f"printed and merged in {time.perf_counter() - start:.0f} s)", flush=True)
    return pages


def rel(path: Path) -> str:
    """``path`` relative to the repository when it is inside it, for shorter messages."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Command line: build (or reuse) the site, print it and write the PDF; 1 with one sentence on failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--html", type=Path,
                        help="print this already built site (e.g. _build/html) instead of building one")
    parser.add_argument("--build-dir", type=Path, default=SITE,
                        help="where to build the site from the stored outputs (default _build/pdf/site)")
    parser.add_argument("--out", type=Path, default=OUT, help="the PDF to write (default _build/pdf/effnb.pdf)")
    parser.add_argument("--paper", choices=sorted(PAPERS), default="A4", help="paper size (default A4)")
    parser.add_argument("--no-page-numbers", dest="numbers", action="store_false",
                        help="leave out the running footer with page numbers")
    args = parser.parse_args(argv)
    try:
        find_browser()  # before the site build: fail in a second, not after it
        if args.html:
            html_dir = args.html.resolve()
            if not (html_dir / "index.html").exists():
                raise PdfBuildError(f"{args.html} is not a built site (no index.html); run `make book` "
                                    "or leave out --html to build one from the stored outputs")
        else:
            html_dir = build_site(args.build_dir.resolve())
        build_pdf(html_dir, args.out.resolve(), args.paper, args.numbers)
    except PdfBuildError as exc:
        print(f"error: {exc}.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
