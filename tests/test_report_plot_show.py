import json

import pytest

from effnb import evidence, plot, report, show


def test_record_claim_without_directory_only_returns(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFNB_REPORT_DIR", raising=False)
    claim = report.record_claim("00_x", "A beats B", "3x", "2.9x", True)
    assert claim.verdict() == "[reproduced] A beats B"
    assert not list(tmp_path.iterdir())


def test_record_claim_writes_replaces_and_renders(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path))
    report.record_claim("01_y", "fast", "3x", "1.2x", False, note="small scale")
    report.record_claim("01_y", "small", "4 MB", "4.1 MB", True)
    report.record_claim("01_y", "fast", "3x", "1.4x", False, note="small | scale")
    report.record_claim("00_x", "exact", "1", "1", True)
    claims = report.load_claims(tmp_path)
    assert [(c.chapter, c.claim) for c in claims] == [("00_x", "exact"), ("01_y", "small"), ("01_y", "fast")]
    assert json.loads((tmp_path / "01_y.json").read_text())[1]["ours"] == "1.4x"
    table = report.claims_markdown(claims)
    assert "| fast | **not reproduced** | 1.4x |  | — |" in table
    assert "- *fast*. Paper: 3x. This run: 1.4x. small \\| scale" in table
    assert table.startswith("**3 measured claims: 2 reproduced, 1 not reproduced, 0 inconclusive. 0 checks: 0 passed**")
    assert "| 00_x | 1 | 1 | 0 | 0 | 0 of 0 |" in table and "| 01_y | 2 | 1 | 1 | 0 | 0 of 0 |" in table
    assert report.claims_markdown([]) == "No chapter has recorded a claim yet.\n"


def test_checks_are_counted_apart_and_never_as_reproduced(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path))
    check = report.record_claim("00_x", "FLOPs equal the hand count", "2n^3", "2n^3", True, kind="check")
    assert check.verdict() == "[check passed] FLOPs equal the hand count"
    failed = report.record_claim("00_x", "bytes add up", "1", "2", False, kind="check")
    assert failed.verdict() == "[check FAILED] bytes add up"
    report.record_claim("00_x", "latency within 2x of the roofline", "<= 2x", "1.4x", True)
    table = report.claims_markdown(report.load_claims(tmp_path))
    assert table.startswith("**1 measured claims: 1 reproduced, 0 not reproduced, 0 inconclusive. 2 checks: 1 passed**")
    assert "| 00_x | 1 | 1 | 0 | 0 | 1 of 2 |" in table
    assert "- check **FAILED**: bytes add up (2)" in table
    with pytest.raises(ValueError, match="kind='guess' is not valid; use one of 'claim', 'check'"):
        report.record_claim("00_x", "c", "1", "1", True, kind="guess")


def judged(threshold=0.0, aa=None):
    spec = evidence.ClaimSpec("A beats B", "accuracy", "higher", threshold, (0, 1, 2, 3))
    return evidence.judge(spec, (0.9, 0.92, 0.91, 0.93), (0.8, 0.81, 0.8, 0.82), aa)


def test_record_evidence_keeps_the_interval_and_three_way_verdict(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path))
    won = report.record_evidence("02_z", judged(aa=(0.01, -0.01, 0.0, 0.01)), paper="+10 points")
    assert won.verdict() == judged(aa=(0.01, -0.01, 0.0, 0.01)).line() and "95% CI [" in won.verdict()
    assert won.reproduced and won.status == "reproduced" and won.seeds == 4 and won.floor > 0
    unsure = report.record_evidence("02_z", evidence.judge(evidence.ClaimSpec(
        "C beats D", "accuracy", "higher", 0.0, (0, 1, 2)), (0.9, 0.7, 0.85), (0.8, 0.8, 0.8)), paper="+1 point")
    assert unsure.status == "inconclusive" and not unsure.reproduced and "needed)" in unsure.verdict()
    report.check_threshold("02_z", "B has learned", 0.8, 0.5)
    back = report.load_claims(tmp_path)
    assert [c.verdict() for c in back] == [won.verdict(), unsure.verdict(), "[check passed] B has learned"]
    table = report.claims_markdown(back, {("02_z", "A beats B"): ["reproduced", "inconclusive", ""]})
    assert table.startswith("**2 measured claims: 1 reproduced, 0 not reproduced, 1 inconclusive. 1 checks: 1 passed**")
    assert (f"| A beats B | reproduced | {won.value:.3f} [{won.lo:.3f}, {won.hi:.3f}] | ≥ 0, A/A ±{won.floor:.3f} "
            "| R I · |") in table
    assert "| C beats D | **inconclusive** |" in table and "- check passed: B has learned (0.800)" in table
    assert max(len(line) for line in table.splitlines() if line.startswith("| ")) < 200
    with pytest.raises(TypeError, match="what effnb.evidence.judge returns"):
        report.record_evidence("02_z", 0.3, paper="x")


def test_forest_plot_has_one_row_per_judged_claim(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFNB_REPORT_DIR", raising=False)
    rows = [report.record_evidence("02_z", judged(aa=(0.01, -0.01, 0.0, 0.01)), paper="x"),
            report.record_evidence("03_w", judged(0.2), paper="y"),
            report.check_threshold("03_w", "learned", 1, 0), report.record_claim("03_w", "old", "1", "1", True)]
    fig = report.forest_plot(rows)
    assert len(fig.axes) == 2 and fig.get_figwidth() * 110 <= 1280
    assert "A beats B" in fig.axes[0].get_title(loc="left")
    fig.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 1000
    assert report.forest_plot(rows[2:]) is None


@pytest.mark.parametrize("content", ['{"hello": 1}', "not json", '[{"chapter": "x"}]', '[{"chapter": "x", '
                                     '"claim": "c", "paper": "1", "ours": "1", "reproduced": true, "kind": "vibe"}]'])
def test_a_foreign_json_file_in_the_report_dir_gets_one_sentence(tmp_path, content):
    (tmp_path / "other.json").write_text(content)
    with pytest.raises(ValueError, match=r"other\.json is not .*EFFNB_REPORT_DIR"):
        report.load_claims(tmp_path)


def test_reproduced_must_be_a_real_bool():
    with pytest.raises(TypeError, match="must be True or False"):
        report.record_claim("00_x", "c", "1", "1", 1)
    with pytest.raises(ValueError, match="non-empty chapter name"):
        report.record_claim("", "c", "1", "1", True)


def test_check_threshold_keeps_value_and_threshold_and_decides_from_them(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFNB_REPORT_DIR", str(tmp_path))
    at_least = report.check_threshold("00_x", "the baseline learned", 0.9, 0.9)
    at_most = report.check_threshold("00_x", "the error is small", 0.61, 0.6, at_least=False, ours="0.61x")
    assert at_least.verdict() == "[check passed] the baseline learned" and (at_least.value, at_least.threshold) == (0.9, 0.9)
    assert at_most.verdict() == "[check FAILED] the error is small" and at_most.ours == "0.61x"
    assert at_least.paper == ">= 0.9" and at_most.paper == "<= 0.6"
    loaded = {c.claim: c for c in report.load_claims(tmp_path)}
    assert loaded["the error is small"].value == 0.61 and loaded["the error is small"].kind == "check"


def test_colours_are_stable_and_unknown_roles_fail():
    # Pinned: a method keeps its colour in every chapter (Okabe-Ito grey and vermilion).
    assert (plot.color("baseline"), plot.color("method"), plot.color("alternative")) == ("#7f7f7f", "#d55e00", "#0072b2")
    assert len(set(plot.COLORS.values())) >= 8
    with pytest.raises(ValueError, match=r"role='fancy' is not valid; use one of 'alternative', 'baseline'"):
        plot.color("fancy")
    fig, axes = plot.new_figure(ncols=2)
    assert len(axes) == 2 and fig.get_dpi() == 100
    assert plot.new_figure(ncols=2, nrows=3)[1].shape == (3, 2)


def test_sample_grid_puts_each_class_in_its_column():
    import torch

    labels = torch.arange(30) % 10                                      # three of each class
    samples = (labels.float() / 10).view(30, 1, 1, 1).expand(30, 1, 2, 3)  # class c is the constant c / 10
    fig, ax = plot.new_figure()
    plot.sample_grid(ax, samples, labels, "t", per_class=5)              # only 3 per class exist
    image = ax.images[0].get_array()
    assert image.shape == (3 * 2, 10 * 3)
    for c in range(10):                                                 # columns 3c..3c+2 hold class c only
        block = image[:, 3 * c:3 * c + 3]
        assert abs(float(block.min()) - c / 10) < 1e-6 and abs(float(block.max()) - c / 10) < 1e-6, c
    with pytest.raises(ValueError, match="at least one sample of every class"):
        plot.sample_grid(ax, samples[:5], labels[:5], "t")


def test_show_returns_highlighted_source():
    code = show.show(report.record_claim)
    assert "def record_claim" in code.data
    with pytest.raises(TypeError, match="cannot show"):
        show.source(3)


def test_median_range_is_median_min_max():
    from effnb.report import median_range
    assert median_range([0.5, 0.1, 0.3]) == "0.300 [0.100, 0.500]"
    assert median_range([1, 2, 3, 4], digits=1) == "2.5 [1.0, 4.0]"
    with pytest.raises(ValueError, match="at least one value"):
        median_range([])


def test_what_if_draws_the_defaults_once_when_headless(monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.setenv("EFFNB_WIDGETS", "0")
    calls = []

    def draw(stage, batch):
        calls.append((stage, batch))
        fig, ax = plot.new_figure()
        ax.plot([1, 2], [batch, batch])

    assert plot.what_if(draw, stage=("decode", ["prefill", "decode"]), batch=(4, [1, 4, 16])) is None
    assert calls == [("decode", 4)]
    plt.close("all")
    with pytest.raises(ValueError, match="default 3 of 'batch' is not one of its options"):
        plot.what_if(draw, batch=(3, [1, 4, 16]))


def test_what_if_builds_sliders_and_dropdowns_and_redraws_in_a_kernel(monkeypatch):
    import ipywidgets
    import IPython.display

    shown = []
    monkeypatch.setattr(plot, "widgets_enabled", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    calls = []

    def draw(stage, batch):
        calls.append((stage, batch))
        fig, ax = plot.new_figure()
        ax.plot([1, 2], [batch, 2 * batch])

    plot.what_if(draw, stage=("decode", ["prefill", "decode"]), batch=(4, [1, 4, 16]))
    panel = [obj for obj in shown if isinstance(obj, ipywidgets.VBox)][0]
    controls = {c.description: c for c in panel.children[0].children}
    assert isinstance(controls["stage"], ipywidgets.Dropdown) and controls["stage"].value == "decode"
    assert isinstance(controls["batch"], ipywidgets.SelectionSlider) and controls["batch"].options == (1, 4, 16)
    assert calls == [("decode", 4)]
    controls["batch"].value = 16
    assert calls[-1] == ("decode", 16)
    pngs = [obj for obj in shown if isinstance(obj, IPython.display.Image)]
    assert len(pngs) == 2 and all(len(p.data) > 2000 for p in pngs), "each draw shows its figure as a PNG"
