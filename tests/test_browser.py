"""The rendered book in a real browser: headless Chromium (Debian's package) driven by selenium.

The site is built once per session with ``scripts/build_book.py --no-execute`` (stored outputs,
about a minute) into ``_build/browser-test/html``, so a ``make book`` site in ``_build/html`` is left
alone, and served by Python's http.server on 127.0.0.1. Screenshots of the home page, a chapter,
the reproduction report and the notation page (equations) go to ``_build/screenshots/``. MathJax is vendored under book/_static, so
equations really render offline and the test checks MathJax's output; only pictures hosted elsewhere
(the Colab badge) cannot load here, and the test ignores images that are not served by the site.
``make test`` installs chromium and chromium-driver when it runs as root with apt-get; without them
this module is skipped with the reason, or fails under ``CI=true``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from conftest import require_chromium, start_chromium  # noqa: E402
from build_pdf import serve  # noqa: E402
from run_notebooks import toc_notebooks  # noqa: E402

BUILD = ROOT / "_build" / "browser-test"
SHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = [p.stem for p in toc_notebooks()]
SEARCH_WORD, SEARCH_HIT = "prefill", "notebooks/01_llm_roofline.html"


@pytest.fixture(scope="module", autouse=True)
def _chromium_present() -> None:
    """Runs before the module's other fixtures, so nothing is built when the browser is missing."""
    require_chromium()


@pytest.fixture(scope="module")
def site() -> str:
    """Build the book from stored outputs, serve it on 127.0.0.1, yield its base URL."""
    cmd = [sys.executable, str(ROOT / "scripts" / "build_book.py"), "--no-execute", "--build-dir", str(BUILD)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    with serve(BUILD / "html") as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with the flags that work as root and offline."""
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def open_page(driver, url: str) -> None:
    """Load ``url`` and wait until the document and its images have loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def wait_for_math(driver) -> dict:
    """Wait for MathJax to typeset; return counts of rendered equations and TeX errors."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return !!(window.MathJax && MathJax.startup && MathJax.startup.document"
        " && MathJax.startup.document.processed !== undefined"
        " && document.querySelectorAll('mjx-container').length > 0)"))
    return driver.execute_script(
        "return {rendered: document.querySelectorAll('mjx-container').length,"
        " errors: document.querySelectorAll('mjx-merror').length,"
        " raw: document.querySelectorAll('.math:not(:has(mjx-container))').length}")


def local_images(driver, base: str) -> list[dict]:
    """The page's images served by the site, with whether each decoded."""
    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({src: i.currentSrc || i.src,"
        " ok: i.complete && i.naturalWidth > 0}))")
    return [img for img in images if img["src"].startswith(base)]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_shows_its_figures_math_and_launch_buttons(site, browser, chapter):
    open_page(browser, f"{site}/notebooks/{chapter}.html")
    assert chapter.split("_", 1)[0].lstrip("0") in browser.title or "Chapter" in browser.title, browser.title
    images = local_images(browser, site)
    assert images, "no figure on the chapter page"
    broken = [img["src"] for img in images if not img["ok"]]
    assert not broken, f"broken images: {broken}"
    colab = f"https://colab.research.google.com/github/effnb/effnb/blob/main/notebooks/{chapter}.ipynb"
    assert browser.execute_script(f"return !!document.querySelector('.dropdown-launch-buttons a[href=\"{colab}\"]')"), \
        "no Colab launch button in the page header"
    assert browser.execute_script(
        f"return !!document.querySelector('.dropdown-download-buttons a.btn-download-source-button[href$=\"{chapter}.ipynb\"]')"), \
        "no .ipynb download button in the page header"
    if browser.execute_script("return document.querySelectorAll('.math').length") > 0:
        math = wait_for_math(browser)
        assert math["rendered"] > 0 and math["errors"] == 0, math


def test_notation_page_renders_its_equations(site, browser):
    open_page(browser, f"{site}/book/notation.html")
    math = wait_for_math(browser)
    assert math["rendered"] >= 10 and math["errors"] == 0 and math["raw"] == 0, math


def test_bibliography_lists_every_paper(site, browser):
    open_page(browser, f"{site}/book/references.html")
    text = browser.find_element("tag name", "main").text.lower()
    for title in ("Roofline", "Triple Speed-Up", "Distilling Long-tailed Datasets", "Dataset Quantization", "PTQ4DiT",
                  "QuEST", "Efficient Multitask Dense Predictor", "Fully Binary Point Transformer",
                  "PruMerge", "Online Multi-spectral Neuron Tracing", "LLM Inference Unveiled"):
        assert title.lower() in text, f"{title} missing from the bibliography"


def test_search_finds_a_chapter_by_a_word_in_it(site, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, f"{site}/search.html?q={SEARCH_WORD}")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.querySelectorAll('#search-results ul.search li').length > 0"))
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('#search-results ul.search li a')).map(a => a.href)")
    assert any(SEARCH_HIT in link for link in links), links


def test_screenshots_of_home_chapter_and_report(site, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    pages = {"home": "book/intro.html", "chapter": f"notebooks/{CHAPTERS[0]}.html",
             "reproduction": "book/reproduction.html", "notation": "book/notation.html"}
    for name, page in pages.items():
        open_page(browser, f"{site}/{page}")
        if name == "notation":
            wait_for_math(browser)
            browser.execute_script("document.querySelector('#arithmetic-intensity-and-the-roofline').scrollIntoView()")
        path = SHOTS / f"{name}.png"
        assert browser.save_screenshot(str(path)), f"could not save {path}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    print(f"screenshots in {SHOTS}")
