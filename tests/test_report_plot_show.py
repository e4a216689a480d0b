import json

import pytest

from effnb import plot, report, show


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
    assert "| 01_y | fast | **no** | 3x | 1.4x | small \\| scale |" in table
    assert table.startswith("2 of 3 claims reproduced.")
    assert "| 00_x | 1 | 1 |" in table and "| 01_y | 2 | 1 |" in table
    assert report.claims_markdown([]) == "No chapter has recorded a claim yet.\n"


def test_reproduced_must_be_a_real_bool():
    with pytest.raises(TypeError, match="must be True or False"):
        report.record_claim("00_x", "c", "1", "1", 1)
    with pytest.raises(ValueError, match="non-empty chapter name"):
        report.record_claim("", "c", "1", "1", True)


def test_colours_are_stable_and_unknown_roles_fail():
    assert plot.color("baseline") == plot.COLORS["baseline"]
    assert len(set(plot.COLORS.values())) >= 8
    with pytest.raises(KeyError, match="no colour for 'fancy'"):
        plot.color("fancy")
    fig, axes = plot.new_figure(ncols=2)
    assert len(axes) == 2 and fig.get_dpi() == 100


def test_show_returns_highlighted_source():
    code = show.show(report.record_claim)
    assert "def record_claim" in code.data
    with pytest.raises(TypeError, match="cannot show"):
        show.source(3)
