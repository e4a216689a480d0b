"""The tooling: notebook runner, run-time table, report page, book staging."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_book  # noqa: E402
import run_notebooks  # noqa: E402


def test_toc_notebooks_are_the_chapters_in_order():
    names = [p.name for p in run_notebooks.toc_notebooks()]
    assert names[0] == "00_measuring_efficiency.ipynb"
    assert names == sorted(names)


def test_runtime_table_flags_budget_overruns():
    table = run_notebooks.runtime_table({"00_a": 30.0, "01_b": 130.0}, "ci")
    assert "| 00_a | 30.0 | yes |" in table
    assert "| 01_b | 130.0 | **no** |" in table
    assert "| **whole book** | 160.0 | yes |" in table
    assert "cores" in table and "torch" in table
    over = run_notebooks.runtime_table({f"{i:02d}_x": 100.0 for i in range(10)}, "ci")
    assert "| **whole book** | 1000.0 | **no** |" in over


def test_runner_refuses_missing_notebooks_and_full_refresh(capsys):
    with pytest.raises(SystemExit):
        run_notebooks.main(["--out", "x", "notebooks/99_missing.ipynb"])
    assert "no such notebook" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_notebooks.main(["--refresh", "--profile", "full"])
    assert "--refresh stores ci-profile outputs only" in capsys.readouterr().err


def test_strip_run_metadata(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1")])
    nb.metadata["papermill"] = {"duration": 1}
    nb.cells[0].metadata["papermill"] = {"duration": 1}
    nb.cells[0].metadata["execution"] = {"iopub": 1}
    nb.cells[0].metadata["tags"] = ["parameters"]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    run_notebooks.strip_run_metadata(path)
    again = nbformat.read(path, as_version=4)
    assert "papermill" not in again.metadata
    assert again.cells[0].metadata == {"tags": ["parameters"]}


def test_book_staging_and_report_page(tmp_path, monkeypatch):
    monkeypatch.setattr(build_book, "STAGE", tmp_path / "src")
    monkeypatch.setattr(build_book, "CLAIMS", tmp_path / "claims")
    build_book.stage_sources()
    assert (tmp_path / "src" / "_toc.yml").exists()
    assert (tmp_path / "src" / "notebooks" / "00_measuring_efficiency.ipynb").exists()
    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path / "claims"))
    from effnb.report import record_claim

    record_claim("00_measuring_efficiency", "a claim", "1", "1", True)
    build_book.write_report()
    page = (tmp_path / "src" / "book" / "reproduction.md").read_text()
    assert "| a claim | reproduced | 1 |  | — |" in page
    assert "<!-- CLAIMS TABLE -->" not in page and "<!-- SEED SWEEP -->" not in page and "<!-- FOREST" not in page
    assert "## Verdicts at other seeds" in page


def test_sweep_markdown_lists_each_claim_per_seed_and_failures():
    data = {"machine": {"cpu": "AMD EPYC", "cores": 2, "torch": "2.13.0"}, "date": "2026-12-07", "commit": "abc1234",
            "seeds": [10, 11], "runs": {"03_x": {
                "10": {"completed": True, "claims": [{"kind": "claim", "claim": "A > B", "verdict": "[reproduced] A > B"},
                                                     {"kind": "check", "claim": "learned", "verdict": "[check passed] learned"}]},
                "11": {"completed": False, "claims": [{"kind": "claim", "claim": "A > B", "verdict": "[NOT reproduced] A > B"}]}}}}
    page = seed_sweep.sweep_markdown(data)
    assert "| SEED=10 | SEED=11 |" in page and "AMD EPYC" in page and "abc1234" in page
    assert "| 03_x | A > B | reproduced | not reproduced |" in page and "learned" not in page
    assert seed_sweep.stability(data) == {("03_x", "A > B"): ["reproduced", "not reproduced"]}
    assert "**did not complete** at seeds 11" in page
    assert "No seed sweep" in seed_sweep.sweep_markdown({})


# ----------------------------------------------------------------------------- the GPU smoke run
import gpu_smoke  # noqa: E402


def test_gpu_smoke_refuses_without_a_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_smoke.run_notebooks, "gpu_name", lambda: None)
    result = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--result", str(result)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("No CUDA GPU found") and err.count("\n") == 0
    assert not result.exists()


def test_gpu_smoke_runs_every_chapter_on_the_full_profile_with_smoke_set(monkeypatch, tmp_path):
    """The wiring, with a fake GPU: every chapter executed as PROFILE=full, EFFNB_SMOKE=1, and a record naming the card."""
    import json
    import os

    import papermill

    calls = []

    def fake_execute(notebook, output, profile):
        calls.append((notebook.name, profile, os.environ.get("EFFNB_SMOKE")))
        if notebook.name.startswith("01"):
            raise papermill.PapermillExecutionError(0, 1, "", "RuntimeError", "broken on purpose", [])
        return 0.0

    monkeypatch.setenv("EFFNB_SMOKE", "0")  # restored after the test; the script sets it to 1
    monkeypatch.setattr(gpu_smoke.run_notebooks, "gpu_name", lambda: "Fake GPU 80GB")
    monkeypatch.setattr(gpu_smoke.run_notebooks, "execute", fake_execute)
    result = tmp_path / "results" / "gpu-smoke.json"
    assert gpu_smoke.main(["--result", str(result), "--out", str(tmp_path / "out")]) == 1
    chapters = [p.name for p in run_notebooks.toc_notebooks()]
    assert [c[0] for c in calls] == chapters
    assert all(c[1] == "full" and c[2] == "1" for c in calls)
    record = json.loads(result.read_text())
    assert record["card"] == "Fake GPU 80GB" and record["budget_s"] == 480
    assert [r["chapter"] for r in record["chapters"]] == [p.stem for p in run_notebooks.toc_notebooks()]
    failed = [r for r in record["chapters"] if not r["passed"]]
    assert len(failed) == 1 and "broken on purpose" in failed[0]["error"]
    assert record["all_passed"] is False and record["within_budget"] is True


def _tiny_notebook(path: Path, *sources: str) -> bytes:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path.read_bytes()


def test_refresh_keeps_the_source_when_the_notebook_fails(tmp_path, capsys):
    source = tmp_path / "00_fails.ipynb"
    before = _tiny_notebook(source, "print('first cell ran')", "raise RuntimeError('cell two fails')")
    assert run_notebooks.main(["--refresh", str(source)]) == 1
    assert "FAILED 00_fails.ipynb: RuntimeError: cell two fails" in capsys.readouterr().err
    assert source.read_bytes() == before, "a failed run must not overwrite the source"
    assert [p.name for p in tmp_path.iterdir()] == ["00_fails.ipynb"], "no temporary notebook may stay"


def test_refresh_stores_the_outputs_when_the_notebook_succeeds(tmp_path):
    source = tmp_path / "00_works.ipynb"
    _tiny_notebook(source, "print(6 * 7)")
    assert run_notebooks.main(["--refresh", str(source)]) == 0
    cell = nbformat.read(source, as_version=4).cells[0]
    assert cell.outputs[0]["text"] == "42\n" and "papermill" not in cell.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["00_works.ipynb"]


# --- the full edition on several GPUs (scripts/run_notebooks.py: schedule) ---------------------------
def fake_chapters(tmp_path: Path, n: int) -> list[Path]:
    """``n`` empty chapter files (the scheduler only passes their paths on)."""
    paths = [tmp_path / f"{i:02d}_chapter.ipynb" for i in range(n)]
    for path in paths:
        nbformat.write(nbformat.v4.new_notebook(), path)
    return paths


class FakeGpus:
    """A stand-in for running a chapter: records which GPU ran what, and how many ran at once on each."""

    def __init__(self, seconds: float = 0.15, fail: str | None = None):
        import threading

        self.seconds, self.fail, self.lock = seconds, fail, threading.Lock()
        self.running: dict[str, int] = {}
        self.started: list[tuple[str, str]] = []
        self.most_at_once = 0

    def __call__(self, notebook: Path, gpu: str) -> float:
        import time

        with self.lock:
            self.running[gpu] = self.running.get(gpu, 0) + 1
            assert self.running[gpu] == 1, f"two chapters at once on GPU {gpu}"
            self.started.append((notebook.name, gpu))
            self.most_at_once = max(self.most_at_once, sum(self.running.values()))
        time.sleep(self.seconds)
        with self.lock:
            self.running[gpu] -= 1
        if notebook.name == self.fail:
            raise RuntimeError(f"{notebook.name} failed on GPU {gpu}")
        return self.seconds


def test_schedule_runs_one_chapter_per_gpu_and_all_gpus_at_once(tmp_path):
    chapters, gpus = fake_chapters(tmp_path, 5), FakeGpus()
    times = run_notebooks.schedule(chapters, ["0", "1"], gpus)
    assert list(times) == chapters and all(t == gpus.seconds for t in times.values())
    assert gpus.most_at_once == 2 and {gpu for _, gpu in gpus.started} == {"0", "1"}
    assert [name for name, _ in gpus.started][:2] == [chapters[0].name, chapters[1].name]   # _toc.yml order


def test_schedule_on_one_gpu_runs_the_chapters_one_after_another_in_order(tmp_path):
    chapters, gpus = fake_chapters(tmp_path, 3), FakeGpus(seconds=0.05)
    run_notebooks.schedule(chapters, ["0"], gpus)
    assert gpus.most_at_once == 1 and gpus.started == [(c.name, "0") for c in chapters]


def test_schedule_runs_every_chapter_before_reporting_a_failure(tmp_path):
    chapters = fake_chapters(tmp_path, 4)
    gpus = FakeGpus(seconds=0.05, fail=chapters[0].name)
    with pytest.raises(RuntimeError, match="00_chapter.ipynb failed on GPU"):
        run_notebooks.schedule(chapters, ["0", "1"], gpus)
    assert sorted(name for name, _ in gpus.started) == [c.name for c in chapters]


def test_full_profile_spreads_chapters_over_the_visible_gpus(tmp_path, monkeypatch, capsys):
    chapters, gpus = fake_chapters(tmp_path, 3), FakeGpus(seconds=0.05)
    monkeypatch.setattr(run_notebooks.torch.cuda, "device_count", lambda: 3)
    assert run_notebooks.visible_gpus(None) == ["0", "1", "2"] and run_notebooks.visible_gpus("1, 3") == ["1", "3"]
    monkeypatch.setattr(run_notebooks, "execute_on_gpu", lambda nb, out, profile, gpu: gpus(nb, gpu))
    runtimes = tmp_path / "runtimes.md"
    assert run_notebooks.main(["--out", str(tmp_path / "out"), "--profile", "full", "--gpus", "0,1",
                               "--runtimes", str(runtimes), *map(str, chapters)]) == 0
    assert gpus.most_at_once == 2 and "on GPUs 0, 1" in capsys.readouterr().out
    assert all(f"| {c.stem} |" in runtimes.read_text() for c in chapters)
    with pytest.raises(SystemExit):
        run_notebooks.main(["--out", str(tmp_path / "out"), "--profile", "full", "--gpus", "first", str(chapters[0])])
    assert "--gpus 'first' must list GPU indices separated by commas" in capsys.readouterr().err


import lab  # noqa: E402


def test_lab_workspace_copies_chapters_once_and_keeps_the_readers_work(tmp_path):
    source = tmp_path / "notebooks"
    source.mkdir()
    for name in ("00_a.ipynb", "01_b.ipynb"):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, source / name)
    original = {p.name: p.read_bytes() for p in source.iterdir()}
    workspace = tmp_path / "workspace"
    made = lab.prepare_workspace(workspace, source=source)
    assert sorted(p.name for p in made) == ["00_a.ipynb", "01_b.ipynb"]
    copy = nbformat.read(workspace / "00_a.ipynb", as_version=4)
    assert copy.metadata["kernelspec"]["name"] == "effnb" and copy.cells[0].source == "x = 1"
    (workspace / "00_a.ipynb").write_text((workspace / "00_a.ipynb").read_text().replace("x = 1", "x = 2"))
    assert lab.prepare_workspace(workspace, source=source) == [], "existing copies are the reader's work"
    assert "x = 2" in (workspace / "00_a.ipynb").read_text()
    made = lab.prepare_workspace(workspace, fresh=True, source=source)
    assert len(made) == 2 and "x = 1" in (workspace / "00_a.ipynb").read_text()
    backups = list(workspace.glob("old-*/00_a.ipynb"))
    assert len(backups) == 1 and "x = 2" in backups[0].read_text(), "--fresh keeps the old copy aside"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == original, "the tracked notebooks are untouched"
    with pytest.raises(lab.LabError, match="no chapters found"):
        lab.prepare_workspace(workspace, source=tmp_path / "empty")


def test_lab_environment_turns_widgets_on_and_drops_a_non_inline_backend(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("EFFNB_WIDGETS", "0")
    env = lab.lab_environment()
    assert env["EFFNB_WIDGETS"] == "1" and "MPLBACKEND" not in env and env["HF_HUB_OFFLINE"] == "1"
    command = lab.lab_command(Path("/tmp/ws"), ["--no-browser"])
    assert command[1:3] == ["-m", "jupyterlab"] and "--ServerApp.root_dir=/tmp/ws" in command and command[-1] == "--no-browser"


# ----------------------------------------------------------------------------- the seed sweep
import seed_sweep  # noqa: E402


def test_seed_sweep_reads_what_nbval_compares_sanitized_as_nbval_does():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)", outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="[check passed] fast: 12.5 ms at 0x7f00ab\n")]),
        nbformat.v4.new_code_cell("print(2)", outputs=[nbformat.v4.new_output("stream", name="stdout", text="[reproduced] x\n")]),
        nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\n1", outputs=[
            nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=1)])])
    assert seed_sweep.checked_outputs(nb) == ["[check passed] fast: TIME at ADDRESS\n", "1"]


def test_seed_sweep_runs_each_chapter_and_seed_once_and_resumes(tmp_path, monkeypatch):
    calls = []

    def fake_run(notebook, seed, out):
        calls.append((notebook.stem, seed))
        ok = not (notebook.stem == "01_b" and seed == 11)
        return {"completed": ok, "error": None if ok else "cell 3: AssertionError: the baseline did not learn",
                "seconds": 1.0, "claims": [], "nbval": ["[check passed] x\n"]}

    monkeypatch.setattr(seed_sweep, "run_one", fake_run)
    notebooks = []
    for name in ("00_a", "01_b"):
        path = tmp_path / f"{name}.ipynb"
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = '{name}'")]), path)
        notebooks.append(path)
    results, out = tmp_path / "sweep.json", tmp_path / "seeds"
    data = seed_sweep.sweep(notebooks, [10, 11], out, results)
    assert calls == [("00_a", 10), ("01_b", 10), ("00_a", 11), ("01_b", 11)]
    assert data["seeds"] == [10, 11] and {"cpu", "torch", "instruction_sets"} <= set(data["machine"]) and data["commit"]
    assert data["runs"]["01_b"]["11"]["completed"] is False and "did not learn" in data["runs"]["01_b"]["11"]["error"]
    seed_sweep.sweep(notebooks, [10, 11], out, results)            # nothing changed: every run is reused
    assert len(calls) == 4
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 'changed'")]), notebooks[0])
    seed_sweep.sweep(notebooks, [11], out, results)               # a changed chapter runs again, the rest is kept
    assert calls[4:] == [("00_a", 11)]
    assert set(json.loads(results.read_text())["runs"]["00_a"]) == {"10", "11"}


def test_seed_sweep_refuses_a_negative_seed(capsys):
    with pytest.raises(SystemExit):
        seed_sweep.main(["--seeds", "-1"])
    assert "non-negative integers" in capsys.readouterr().err


def test_full_dry_reads_the_last_exception_papermill_prints():
    import full_dry

    stderr = ("Executing: 100%|####| 3/3\nTraceback (most recent call last):\n  File x\n"
              "RuntimeError: Linear holds its parameters on the device but got an input ...\n"
              "papermill.exceptions.PapermillExecutionError: \n")
    assert full_dry._last_error(stderr).startswith("RuntimeError: Linear holds its parameters")
    assert full_dry._last_error("") == "no message"
