"""The experiments tier: effnb.experiments (the stored sweeps a chapter reads), scripts/experiments.py (the
resumable runner) and every stored data/results/<chapter>.json against the code that would write it."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from effnb import experiments as E  # noqa: E402
from effnb.evidence import ClaimSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import experiments as runner  # noqa: E402
from sweeps import notebook_definitions, notebook_functions  # noqa: E402


def stored(points=3, seeds=5, effect=0.5) -> dict:
    rng = np.random.default_rng(0)
    return {"chapter": "99_fake", "axis": "steps", "axis_label": "training steps",
            "provenance": {k: "x" for k in E.PROVENANCE},
            "points": [{"config": {"steps": 10 ** (i + 1)}, "seeds": list(range(seeds)),
                        "values": {"method": list(effect * i + rng.normal(0, 0.01, seeds)),
                                   "A/A": list(rng.normal(0, 0.01, seeds))}} for i in range(points)]}


def write(tmp_path, data) -> None:
    (tmp_path / f"{data['chapter']}.json").write_text(json.dumps(data))


def test_load_reads_a_stored_sweep_and_finds_its_points(tmp_path):
    write(tmp_path, stored())
    sweep = E.load("99_fake", tmp_path)
    assert sweep.xs == [10, 100, 1000] and sweep.at(100).seeds == (0, 1, 2, 3, 4)
    assert sweep.at(1000).arm("method").shape == (5,)
    with pytest.raises(KeyError, match="stored points are"):
        sweep.at(7)
    with pytest.raises(KeyError, match="stored arms are"):
        sweep.at(10).arm("nope")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("axis"), "lacks"),
    (lambda d: d["provenance"].pop("wall_s"), "provenance lacks"),
    (lambda d: d["points"].pop(), "at least 3"),
    (lambda d: d["points"][0].update(seeds=[0, 1, 2, 3]), "at least 5 distinct seeds"),
    (lambda d: d["points"][0].update(seeds=[0, 0, 1, 2, 3]), "distinct"),
    (lambda d: d["points"][1]["values"].update(method=[1.0, 2.0]), "one finite value per seed"),
    (lambda d: d["points"][1]["values"].update(method=[1.0, 2.0, float("nan"), 1.0, 1.0]), "finite"),
    (lambda d: d["points"][2].update(config={"width": 3}), "lacks the axis"),
])
def test_a_broken_sweep_is_refused_with_one_sentence(tmp_path, change, message):
    data = stored()
    change(data)
    with pytest.raises(ValueError, match=message):
        E.validate(data)


def test_a_missing_or_corrupt_sweep_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make experiments CHAPTER=42"):
        E.load("42_nothing", tmp_path)
    (tmp_path / "42_nothing.json").write_text('{"chapter": ')
    with pytest.raises(ValueError, match="not valid JSON.*make experiments CHAPTER=42"):
        E.load("42_nothing", tmp_path)


def test_judge_sweep_gives_each_point_its_verdict_and_names_it(tmp_path):
    write(tmp_path, stored(effect=0.5))
    sweep = E.load("99_fake", tmp_path)
    spec = ClaimSpec("the effect exceeds 0.2", "method", "higher", 0.2, seeds=(0, 1), comparison="fixed",
                     noise_floor="A/A")
    evidence = E.judge_sweep(spec, sweep, "method", aa="A/A")
    assert [e.outcome for e in evidence] == ["not reproduced", "reproduced", "reproduced"]
    assert evidence[1].spec.statement.endswith("[steps = 100]") and evidence[1].spec.seeds == (0, 1, 2, 3, 4)
    ratio = E.judge_sweep(spec, sweep, lambda p: p.arm("method") + 1, aa="A/A")
    assert ratio[0].effect == pytest.approx(evidence[0].effect + 1)
    fig, ax = plt.subplots()
    E.plot_sweep(ax, sweep, evidence, live=evidence[0], live_x=10)
    assert len(ax.get_legend().get_texts()) >= 4
    plt.close(fig)
    fig, ax = plt.subplots()                         # a run that measured two points: two open squares, one label
    E.plot_sweep(ax, sweep, evidence, live={10: evidence[0], 100: evidence[1]})
    squares = [line for line in ax.lines if line.get_marker() == "s"]
    assert len(squares) == 2 and [t.get_text() for t in ax.get_legend().get_texts()].count("this run (live)") == 1
    plt.close(fig)


def test_agrees_widens_the_stored_interval_by_its_floor(tmp_path):
    write(tmp_path, stored())
    sweep = E.load("99_fake", tmp_path)
    spec = ClaimSpec("x", "method", "higher", 0.2, seeds=(0, 1), comparison="fixed", noise_floor="A/A")
    point = E.judge_sweep(spec, sweep, "method", aa="A/A")[2]
    ok, lo, hi = E.agrees(point, point.effect)
    assert ok and lo == pytest.approx(point.lo - point.floor) and hi == pytest.approx(point.hi + point.floor)
    assert not E.agrees(point, point.hi + point.floor + 1e-6)[0]


def fake_module(tmp_path, calls, fail_at=None) -> types.ModuleType:
    source = tmp_path / "fake_sweep.py"
    source.write_text("# a sweep for the tests\n")
    module = types.ModuleType("fake_sweep")
    module.__file__ = str(source)
    module.CHAPTER, module.AXIS, module.AXIS_LABEL = "99_fake", "width", "network width"
    module.POINTS, module.EFFNB_MODULES = {"cpu": [8, 16, 32]}, ["evidence"]
    module.config = lambda x: {"width": x, "lr": 0.1}
    module.setup = lambda device: {"sources": {"f": "def f(): pass"}}

    def run(ctx, x, seed):
        if fail_at == (x, seed):
            raise KeyboardInterrupt
        calls.append((x, seed))
        return {"method": x + seed / 10, "A/A": seed / 100}
    module.run = run
    return module


def test_the_runner_writes_every_point_and_resumes_where_it_stopped(tmp_path):
    calls = []
    results, partial = tmp_path / "results", tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(fake_module(tmp_path, calls, fail_at=(16, 2)), torch.device("cpu"), list(range(5)),
                         results, partial)
    assert calls == [(8, s) for s in range(5)] + [(16, 0), (16, 1)]
    assert not (results / "99_fake.json").exists(), "nothing half-written"
    calls.clear()
    path = runner.run_sweep(fake_module(tmp_path, calls), torch.device("cpu"), list(range(5)), results, partial)
    assert calls == [(16, s) for s in range(2, 5)] + [(32, s) for s in range(5)], "finished runs are reused"
    sweep = E.load("99_fake", results)
    assert path == results / "99_fake.json" and sweep.xs == [8, 16, 32]
    assert list(sweep.at(16).arm("method")) == pytest.approx([16, 16.1, 16.2, 16.3, 16.4])
    assert sweep.at(32).config == {"width": 32, "lr": 0.1}
    assert {"commit", "code", "cpu", "torch", "date", "wall_s"} <= set(sweep.provenance)
    assert sweep.provenance["code"] == json.loads((partial / "99_fake-cpu.json").read_text())["fingerprint"]


def test_the_runner_refuses_a_plan_too_small_before_it_runs(tmp_path):
    calls = []
    module = fake_module(tmp_path, calls)
    module.POINTS = {"cpu": [8, 16]}
    with pytest.raises(SystemExit, match="at least 3 points and 5 distinct seeds"):
        runner.run_sweep(module, torch.device("cpu"), list(range(5)), tmp_path / "r", tmp_path / "p")
    module.POINTS = {"cpu": [8, 16, 32]}
    with pytest.raises(SystemExit, match="fix POINTS or SEEDS"):
        runner.run_sweep(module, torch.device("cpu"), [0, 1, 2, 3], tmp_path / "r", tmp_path / "p")
    assert calls == []


def test_the_runner_starts_afresh_when_the_sweep_code_changed(tmp_path, capsys):
    calls = []
    module = fake_module(tmp_path, calls)
    runner.run_sweep(module, torch.device("cpu"), list(range(5)), tmp_path / "r", tmp_path / "p")
    calls.clear()
    Path(module.__file__).write_text("# changed\n")
    runner.run_sweep(module, torch.device("cpu"), list(range(5)), tmp_path / "r", tmp_path / "p")
    assert len(calls) == 15 and "code changed" in capsys.readouterr().out


def test_the_runner_refuses_bad_arguments_with_the_fix():
    with pytest.raises(SystemExit, match="no sweep in the experiments tier"):
        runner.sweep_module("06")
    with pytest.raises(SystemExit, match="at least 5"):
        runner.main(["--chapter", "02", "--seeds", "3"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cpu"):
            runner.main(["--chapter", "02", "--device", "cuda"])


def test_notebook_functions_takes_the_chapters_own_definitions(tmp_path):
    nb = {"cells": [{"cell_type": "code", "source": ["!pip install x\n", "ARMS = {'a': 1}\n",
                                                     "def twice(x):\n", "    return 2 * x\n", "print(1)\n"]},
                    {"cell_type": "markdown", "source": ["def not_code(): pass"]}]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    namespace = {}
    sources = notebook_functions(path, ["twice", "ARMS"], namespace)
    assert namespace["twice"](3) == 6 and namespace["ARMS"] == {"a": 1} and "return 2 * x" in sources["twice"]
    with pytest.raises(LookupError, match="defines no top-level"):
        notebook_functions(path, ["not_code"], {})


@pytest.mark.parametrize("number", sorted(runner.SWEEPS))
def test_each_stored_sweep_is_complete_matches_its_code_and_is_read_by_its_chapter(number):
    module = runner.sweep_module(number)
    path = E.RESULTS_DIR / f"{module.CHAPTER}.json"
    if not path.exists():
        pytest.fail(f"{path} is missing; run make experiments CHAPTER={number} and commit it.")
    sweep = E.load(module.CHAPTER)
    assert sweep.chapter == module.CHAPTER and sweep.axis == module.AXIS
    assert sweep.xs == module.POINTS["cpu"], "the stored points are the sweep's"
    for point, x in zip(sweep.points, sweep.xs):
        assert point.config == json.loads(json.dumps(module.config(x))), f"stored config at {x} != what runs now"
    notebook = ROOT / "notebooks" / f"{module.CHAPTER}.ipynb"
    code = "".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code")
    assert f'load("{module.CHAPTER}")' in code, "the chapter reads its stored sweep"
    notebook_definitions(notebook, module.FUNCTIONS)
    outputs = "".join("".join(o.get("text", "")) for c in json.loads(notebook.read_text())["cells"]
                      if c["cell_type"] == "code" for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "the settings of the stored point" in outputs, (
        "the chapter's stored ci run no longer has the settings of a stored point: the chapter or the sweep drifted; "
        f"align them, then make experiments CHAPTER={number} and make outputs")
