"""One way to do one thing: a single wording for "not one of" errors, one profile tuple, one loss name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from effnb import config, diffusion, train

EFFNB = Path(__file__).resolve().parents[1] / "effnb"
# Modules another engineer is changing at the same time; the lead moves them over (issue 8, item 8).
PENDING: set[str] = set()


@pytest.mark.parametrize("module", sorted(p.name for p in EFFNB.glob("*.py") if p.name not in PENDING | {"config.py"}))
def test_choice_errors_go_through_check_choice(module):
    source = (EFFNB / module).read_text()
    own = re.findall(r"raise \w+\([^\n]*(?:use one of|known:)", source)
    assert own == [], f"{module} words its own 'one of' error; call effnb.config.check_choice instead"
    assert "def _check_choice" not in source


def test_sizes_are_the_profiles():
    assert not hasattr(diffusion, "SIZES"), "diffusion model sizes are the profiles: effnb.config.PROFILES"
    for build in (diffusion.tiny_dit, diffusion.tiny_unet):
        with pytest.raises(ValueError, match=re.escape(f"size='xl' is not valid; use one of {', '.join(map(repr, config.PROFILES))}.")):
            build("xl")


def test_both_histories_call_their_losses_losses():
    assert train.History().losses == [] and diffusion.TrainHistory().losses == []
    assert not hasattr(train.History(), "loss")
