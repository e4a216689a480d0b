"""Under CI=true a missing browser or checkpoint fails the run; locally it is a skip with the reason."""
from __future__ import annotations

import pytest

import conftest
import test_diffusion


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_browser_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(conftest, "CHROMIUM", None)
    with pytest.raises(pytest.fail.Exception, match="chromium and chromium-driver are not installed.*CI"):
        conftest.require_chromium()


def test_a_missing_browser_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(conftest, "CHROMEDRIVER", None)
    with pytest.raises(pytest.skip.Exception, match="chromium and chromium-driver are not installed"):
        conftest.require_chromium()


def test_a_missing_checkpoint_fails_under_ci_and_skips_locally(monkeypatch, tmp_path):
    from effnb import diffusion as D

    monkeypatch.setattr(D, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="dit_digits8.safetensors is missing.*make_diffusion_checkpoints"):
        test_diffusion.require_checkpoint("dit_digits8")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="dit_digits8.safetensors is missing"):
        test_diffusion.require_checkpoint("dit_digits8")
