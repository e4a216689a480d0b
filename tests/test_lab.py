"""The chapters in a real JupyterLab, driven by headless Chromium (Debian's package) through selenium.

``scripts/lab.py`` (what ``make lab`` runs) prepares a workspace of chapter copies in a temporary folder,
and JupyterLab serves it on 127.0.0.1 with a token and the app exposed to the page's JavaScript, so the
test can run Lab's own commands (``notebook:run-all-cells``) and read the notebook model. Chapter 0 runs
whole: no error output, and tqdm drew a widget progress bar. Chapter 1 runs up to its what-if panel;
picking another stage in a drop-down must redraw the roofline figure and the per-operator table.
Screenshots go to ``_build/screenshots/lab-*.png``. Skipped (failed under ``CI=true``) without chromium.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from conftest import require_chromium, start_chromium  # noqa: E402
import lab  # noqa: E402

SHOTS = ROOT / "_build" / "screenshots"
CH0, CH1 = "00_measuring_efficiency.ipynb", "01_llm_roofline.ipynb"


@pytest.fixture(scope="module", autouse=True)
def _chromium_present() -> None:
    require_chromium()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab on a fresh workspace (as `make lab` prepares it), yielding (base URL, token, workspace)."""
    workspace = tmp_path_factory.mktemp("workspace")
    assert lab.main(["--prepare-only", "--workspace", str(workspace)]) == 0
    copy = nbformat.read(workspace / CH0, as_version=4)
    assert copy.metadata["kernelspec"]["name"] == "effnb"
    port, token = free_port(), secrets.token_hex(16)
    settings = workspace / ".lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "official Jupyter news?" toast over the screenshots (and no fetch)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = lab.lab_environment() | {"EFFNB_PROGRESS": "1", "JUPYTER_RUNTIME_DIR": str(workspace / ".runtime"),
                                   "JUPYTER_CONFIG_DIR": str(workspace / ".config"),
                                   "JUPYTERLAB_SETTINGS_DIR": str(workspace / ".lab-settings"),
                                   "JUPYTERLAB_WORKSPACES_DIR": str(workspace / ".lab-workspaces")}
    log = open(workspace / ".lab.log", "w")
    server = subprocess.Popen(lab.lab_command(workspace, [
        "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=None", "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]),
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workspace)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start:\n{(workspace / '.lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield base, token, workspace
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"), window="1400,1000")
    yield driver
    driver.quit()


FIND = ("const nb = Array.from(window.jupyterapp.shell.widgets('main'))"
        ".find(w => w.context && w.context.path === arguments[0]);")
NOTEBOOK_STATE = """
const app = window.jupyterapp;
const nb = app && Array.from(app.shell.widgets('main')).find(w => w.context && w.context.path === arguments[0]);
if (!nb || !nb.content || !nb.sessionContext || !nb.sessionContext.session
    || !nb.sessionContext.session.kernel) return null;
const cells = nb.content.widgets.filter(c => c.model.type === 'code');
const errors = [];
for (const [i, c] of cells.entries()) {
  for (const out of c.model.outputs.toJSON()) {
    if (out.output_type === 'error') errors.push(`code cell ${i}: ${out.ename}: ${out.evalue}`);
  }
}
return {kernel: nb.sessionContext.session.kernel.status, cells: cells.length,
        executed: cells.filter(c => c.model.executionCount !== null).length, errors: errors,
        path: nb.context.path};
"""


def open_notebook(driver, base: str, token: str, name: str) -> dict:
    """Open ``name`` in Lab and wait until its kernel (the ``effnb`` one) is idle."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/lab/tree/{name}?token={token}&reset")
    WebDriverWait(driver, 120, poll_frequency=0.5).until(
        lambda d: (d.execute_script(NOTEBOOK_STATE, name) or {}).get("kernel") == "idle")
    return driver.execute_script(  # make it the current notebook, which Lab's commands act on
        FIND + "window.jupyterapp.shell.activateById(nb.id); return nb.sessionContext.session.kernel.name", name)


def run_and_wait(driver, name: str, command: str, until_executed: int, timeout: float) -> dict:
    """Run a Lab command on the open notebook; wait until ``until_executed`` code cells ran and the kernel
    is idle, or an error output appears (Run All stops there)."""
    driver.execute_script(f"window.jupyterapp.commands.execute('{command}')")
    deadline = time.time() + timeout
    state = {}
    while time.time() < deadline:
        time.sleep(1)
        state = driver.execute_script(NOTEBOOK_STATE, name)
        if state["errors"] or (state["executed"] >= until_executed and state["kernel"] == "idle"):
            return state
    pytest.fail(f"{command} did not finish in {timeout:.0f} s: {state}")


def shoot(driver, name: str) -> Path:
    """Save a screenshot of the browser window as _build/screenshots/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every notebook's bytes in ``folder``."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.ipynb"))}


def test_chapter0_runs_all_in_lab_with_widget_progress_bars(lab_server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, workspace = lab_server
    tracked = snapshot(ROOT / "notebooks")
    assert open_notebook(browser, base, token, CH0) == "effnb"
    cells = browser.execute_script(NOTEBOOK_STATE, CH0)["cells"]
    state = run_and_wait(browser, CH0, "notebook:run-all-cells", cells, timeout=240)
    assert not state["errors"], state["errors"]
    bars = browser.execute_script("return document.querySelectorAll('.jp-OutputArea .widget-hprogress').length")
    assert bars >= 1, "no widget progress bar was drawn (tqdm fell back to text)"
    stderr_boxes = browser.execute_script(
        "return Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]'))"
        ".map(e => e.textContent).filter(t => t.includes('it/s') || t.includes('s/it'))")
    assert not stderr_boxes, f"text progress bars in stderr: {stderr_boxes[:2]}"
    browser.execute_script(  # scroll Lab's (windowed) notebook to the cell that drew the bar
        FIND + "const bar = document.querySelector('.jp-OutputArea .widget-hprogress');"
        "const k = nb.content.widgets.findIndex(c => c.node.contains(bar));"
        "nb.content.activeCellIndex = k; return nb.content.scrollToItem(k, 'center')", CH0)
    time.sleep(1)
    print(f"screenshot: {shoot(browser, 'lab-chapter0')}")
    browser.execute_script(FIND + "nb.context.save()", CH0)  # save, as a reader does
    WebDriverWait(browser, 30).until(lambda d: "widget-view" in (workspace / CH0).read_text())
    assert snapshot(ROOT / "notebooks") == tracked, "saving in Lab changed the notebooks in notebooks/"


def test_chapter1_what_if_controls_redraw_in_lab(lab_server, browser):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, token, workspace = lab_server
    open_notebook(browser, base, token, CH1)
    nb = nbformat.read(workspace / CH1, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    panel = next(i for i, c in enumerate(code) if "effnb.plot.what_if(" in c.source)
    index = nb.cells.index(code[panel])
    browser.execute_script(FIND + f"nb.content.activeCellIndex = {index}; window.jupyterapp.shell.activateById(nb.id)", CH1)
    state = run_and_wait(browser, CH1, "notebook:run-all-above", panel, timeout=180)
    assert not state["errors"], state["errors"]
    state = run_and_wait(browser, CH1, "notebook:run-cell", panel + 1, timeout=120)
    assert not state["errors"], state["errors"]

    find_panel = "return document.querySelector('.effnb-what-if')"
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(
        "const p = document.querySelector('.effnb-what-if'); return p && p.querySelector('img') !== null"))
    figure = "const e = document.querySelector('.effnb-what-if img'); return e ? e.src : null"  # null while redrawing
    table = "const e = document.querySelector('.effnb-what-if .jp-OutputArea-output pre'); return e ? e.textContent : null"
    before_img, before_table = browser.execute_script(figure), browser.execute_script(table)
    assert len(before_img) > 20_000, f"the what-if figure is empty ({len(before_img)} characters of PNG)"
    assert "decode on nvidia_A100" in before_table, before_table[:200]
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('.effnb-what-if label')).map(l => l.textContent)")
    for knob in ("model", "hardware", "stage", "batch", "seq_len", "w_bit", "a_bit", "kv_bit"):
        assert knob in labels, f"no {knob} control in {labels}"

    stage = browser.execute_script(
        "return Array.from(document.querySelectorAll('.effnb-what-if .widget-dropdown'))"
        ".find(d => d.querySelector('label').textContent === 'stage').querySelector('select')")
    Select(stage).select_by_visible_text("prefill")
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(figure) not in (None, before_img)
                                     and "prefill on nvidia_A100" in (d.execute_script(table) or ""))
    after_img = browser.execute_script(figure)
    assert len(after_img) > 20_000, f"the redrawn figure is empty ({len(after_img)} characters of PNG)"
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const e = document.querySelector('.effnb-what-if img'); return e && e.complete && e.naturalWidth > 0"))
    browser.set_window_size(1400, 1450)  # the controls, the table and the figure in one picture
    time.sleep(1)
    browser.execute_script(find_panel + ".scrollIntoView({block: 'start'})")
    time.sleep(1)  # let Lab paint the scrolled-in output
    print(f"screenshot: {shoot(browser, 'lab-chapter1-what-if')}")
    assert not browser.execute_script(NOTEBOOK_STATE, CH1)["errors"]
