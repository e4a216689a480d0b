"""effnb.evidence on synthetic per-seed values whose answer is known."""
import numpy as np
import pytest

from effnb import evidence as E

SEEDS = tuple(range(8))


def spec(threshold=0.0, direction="higher", comparison="paired", seeds=SEEDS):
    return E.ClaimSpec("method beats baseline", "accuracy", direction, threshold, seeds, comparison)


def test_clearly_better_is_reproduced():
    base = np.linspace(0.70, 0.74, 8)
    ev = E.judge(spec(0.02), base + 0.10 + np.linspace(-0.005, 0.005, 8), base)
    assert ev.outcome == "reproduced" and ev.lo > 0.02 and ev.effect == pytest.approx(0.10)
    assert ev.line().startswith("[reproduced] method beats baseline: 0.100, 95% CI [")


def test_clearly_worse_is_not_reproduced():
    base = np.full(8, 0.8)
    ev = E.judge(spec(0.0), base - 0.05 + np.linspace(-0.01, 0.01, 8), base)
    assert ev.outcome == "not reproduced" and ev.hi < 0


def test_an_interval_across_the_threshold_is_inconclusive_and_says_how_many_seeds():
    diffs = np.array([0.03, -0.02, 0.04, -0.01, 0.02, -0.03, 0.05, 0.0])
    ev = E.judge(spec(0.0), diffs, np.zeros(8))
    assert ev.outcome == "inconclusive" and ev.lo < 0 < ev.hi
    assert ev.needed is not None and ev.needed > 8
    assert f"~{ev.needed} needed" in ev.line()


def test_an_aa_floor_that_swallows_the_effect_keeps_it_from_being_reproduced():
    diffs = np.full(8, 0.03) + np.linspace(-0.002, 0.002, 8)
    aa = np.array([0.06, -0.05, 0.07, -0.06, 0.05, -0.07, 0.06, -0.05])
    without = E.judge(spec(0.0), diffs, np.zeros(8))
    with_floor = E.judge(spec(0.0), diffs, np.zeros(8), aa=aa)
    assert without.outcome == "reproduced"
    assert with_floor.floor > with_floor.hi and with_floor.outcome == "inconclusive"
    assert with_floor.line().endswith("8 seeds; within the A/A floor)"), "held back by the floor, not by the threshold"
    near = E.judge(spec(0.0), np.linspace(0.0, 0.12, 8), np.zeros(8), aa=aa / 2)
    assert near.outcome == "inconclusive" and near.effect > near.floor and near.needed > 8


def test_exact_ties_give_a_zero_width_interval():
    ev = E.judge(spec(0.0), np.full(8, 0.5), np.full(8, 0.5))
    assert (ev.effect, ev.lo, ev.hi) == (0.0, 0.0, 0.0)
    assert ev.outcome == "inconclusive" and ev.needed is None and "on the threshold" in ev.line()
    assert E.judge(spec(-0.01), np.full(8, 0.5), np.full(8, 0.5)).outcome == "reproduced"


def test_an_effect_on_the_threshold_up_to_rounding_needs_no_seed_count():
    """A mean of differences that cancel leaves ~1e-17, not 0: it is on the threshold, not ~1e32 seeds from it."""
    ours = np.array([0.1, 0.7, 0.2, 0.9, 0.3, 0.6, 0.4, 0.8])
    theirs = ours[[1, 0, 3, 2, 5, 4, 7, 6]]                     # the same values, paired differently
    ev = E.judge(spec(0.0), ours, theirs)
    assert abs(ev.effect) < 1e-12 and ev.needed is None and "on the threshold" in ev.line()
    assert E.seeds_needed(1e-3, -0.01, 0.012, 8, 0.0) > 8


def test_lower_and_fixed_claims():
    lower = E.ClaimSpec("error ratio below 0.9", "eps-MSE ratio", "lower", 0.9, SEEDS, "fixed")
    assert E.judge(lower, np.linspace(0.5, 0.6, 8)).outcome == "reproduced"
    assert E.judge(lower, np.linspace(0.95, 1.05, 8)).outcome == "not reproduced"
    assert E.outcome(-0.2, -0.1, 0.0, "lower", floor=0.15) == "inconclusive"
    assert E.outcome(-0.3, -0.2, 0.0, "lower", floor=0.15) == "reproduced"


def test_a_ratio_claim_measures_its_floor_from_its_null():
    ratio = E.ClaimSpec("binary beats float", "speed-up", "higher", 1.0, SEEDS, "fixed", "float timed against float",
                        null=1.0)
    aa = 1 + np.array([0.05, -0.04, 0.03, -0.05, 0.04, -0.03, 0.05, -0.04])
    assert E.judge(ratio, np.linspace(1.5, 1.6, 8), aa=aa).outcome == "reproduced"
    swallowed = E.judge(ratio, np.linspace(1.02, 1.03, 8), aa=aa)
    assert swallowed.lo > 1.0 and 0 < swallowed.floor < 0.06 and swallowed.outcome == "inconclusive"
    assert "A/A floor" not in E.ClaimSpec("x", "m", "higher", 0.8, SEEDS, "fixed", None).declaration()
    rounds = E.ClaimSpec("x", "speed-up", "higher", 1.0, SEEDS, "paired", None, unit="rounds")
    assert "paired by round) >= 1, 8 rounds [0," in rounds.declaration()
    assert "8 rounds; on the threshold)" in E.judge(rounds, np.full(8, 2.0), np.ones(8)).line()
    images = E.ClaimSpec("x", "share kept", "lower", 0.125, tuple(range(300)), "fixed", None, unit="test images")
    assert "300 test images [0, 1, ..., 299]" in images.declaration()


def test_the_declaration_is_printed_before_the_run():
    text = spec(0.01).declaration()
    assert text.startswith("[declared] method beats baseline: accuracy (method - baseline, paired by seed) >= 0.01")
    assert "8 seeds" in text and "A/A floor" in text


def test_few_seeds_get_students_t_interval_not_their_range():
    from scipy import stats

    three = [0.10, 0.12, 0.14]
    mean, lo, hi = E.interval(three)
    t = stats.ttest_1samp(three, 0.0).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((t.low, t.high)) and lo < 0.08 and hi > 0.16, "wider than the range of 3 values"
    many = np.random.default_rng(1).normal(0.5, 0.1, 200)
    _, lo, hi = E.interval(many)
    boot = stats.bootstrap((many,), np.mean, method="percentile", n_resamples=9999,
                           random_state=np.random.default_rng(0)).confidence_interval
    assert lo <= boot.low and hi >= boot.high and hi - lo == pytest.approx(boot.high - boot.low, rel=0.1)


def test_the_interval_comes_from_scipy_and_is_reproducible():
    values = [0.1, 0.3, 0.2, 0.5, 0.4]
    assert E.interval(values) == E.interval(values)
    mean, lo, hi = E.interval(values)
    assert lo < mean < hi and mean == pytest.approx(0.3)


@pytest.mark.parametrize("make, message", [
    (lambda: E.ClaimSpec("x", "m", "up", 0.0, SEEDS), "direction"),
    (lambda: E.ClaimSpec("x", "m", "higher", 0.0, (0,)), "at least 2 seeds"),
    (lambda: E.ClaimSpec("", "m", "higher", 0.0, SEEDS), "needs a statement"),
    (lambda: E.judge(spec(), [1.0] * 7, [0.0] * 8), "7 method values for 8 seeds"),
    (lambda: E.judge(spec(), [1.0] * 8), "a paired claim needs one baseline value per seed"),
    (lambda: E.judge(spec(), [1.0] * 8, [0.0] * 8, aa=[0.0] * 3), "same seed count"),
    (lambda: E.interval([1.0]), "at least 2 per-seed values"),
    (lambda: E.interval([1.0, float("nan")]), "finite"),
    (lambda: E.outcome(0.0, 1.0, 0.0, "higher", floor=-1), "magnitude"),
])
def test_bad_input_gets_one_sentence(make, message):
    with pytest.raises(ValueError, match=message):
        make()
