"""Calibration: tau keeps agreement on served held-out traffic at the target with the asked confidence;
temperature and router fitting behave."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.manifest import RouterSpec
from gateway.router import apply_temperature, router_scores
from router_models.calibration import (
    TauResult,
    conformal_tau,
    coverage_curve,
    decline_recall_floor,
    disagreement_bound,
    evaluate,
    fit_energy_mix,
    fit_router,
    fit_temperature,
    with_decline_recall,
)


def _population(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores in [0, 1] whose agreement probability rises with the score: 0.4 at the bottom, ~1 at the top.
    Served in score order it agrees 0.97 up to 60% coverage, about CLINC150's in-scope curve."""
    scores = rng.beta(5, 1.2, size=n)
    agree = rng.random(n) < 1.0 - 0.6 * (1.0 - scores) ** 1.3
    return scores, agree


def test_tau_meets_the_target_on_held_out_data():
    rng = np.random.default_rng(7)
    target = 0.97
    served_agreement, coverages = [], []
    for _ in range(100):
        cal_s, cal_a = _population(rng, 1500)
        tau = conformal_tau(cal_s, np.ones_like(cal_a), cal_a, target, confidence=0.9).tau
        test_s, test_a = _population(rng, 20000)
        served = test_s >= tau
        coverages.append(served.mean())
        if served.any():
            served_agreement.append(test_a[served].mean())
    # The guarantee holds with probability 0.9 (the default confidence) over calibration draws: at most one
    # draw in ten may serve below the target (0.15 allows for 100 draws' own noise).
    assert np.mean(served_agreement) >= target
    assert np.mean(np.array(served_agreement) < target) <= 0.15
    assert len(served_agreement) >= 75  # "never serve" is a rare outcome, not the usual one
    # ...and the threshold is not trivially strict: compared with the best fixed threshold in hindsight.
    big_s, big_a = _population(rng, 400000)
    _, agreement, _ = coverage_curve(big_s, np.ones(big_s.size, dtype=bool), big_a)
    oracle = (np.nonzero(agreement >= target)[0].max() + 1) / big_s.size
    assert np.mean(coverages) > 0.5 * oracle


def test_the_guarantee_in_expectation_alone_misses_the_target_about_every_other_draw():
    # Confidence 0.5 is about conformal risk control's bound in expectation: the same draws as above now serve
    # below the target far more often than one in ten. That is what the 0.9 default buys.
    rng = np.random.default_rng(7)
    misses = []
    for _ in range(100):
        cal_s, cal_a = _population(rng, 1500)
        tau = conformal_tau(cal_s, np.ones_like(cal_a), cal_a, 0.97, confidence=0.5).tau
        test_s, test_a = _population(rng, 20000)
        if (test_s >= tau).any():
            misses.append(test_a[test_s >= tau].mean() < 0.97)
    assert np.mean(misses) > 0.25


def test_more_confidence_means_a_stricter_tau():
    rng = np.random.default_rng(11)
    s, a = _population(rng, 3000)
    eligible = np.ones(s.size, dtype=bool)
    results = [conformal_tau(s, eligible, a, 0.97, confidence=c) for c in (0.5, 0.9, 0.99)]
    assert results[0].tau < results[1].tau < results[2].tau
    assert results[0].served > results[1].served > results[2].served
    with pytest.raises(ValueError, match="confidence"):
        conformal_tau(s, eligible, a, 0.97, confidence=0.4)


def test_the_bound_is_clopper_pearson_on_the_effective_sample():
    # No disagreement among n: the exact one-sided bound is 1 - (1 - confidence)^(1/n).
    assert disagreement_bound(np.ones(100), np.zeros(100, dtype=bool), 0.9) == pytest.approx(1 - 0.1 ** (1 / 100))
    # 3 of 200, against scipy's own binomial test: at the bound, P(X <= 3) is 1 - confidence.
    from scipy.stats import beta, binom

    bound = disagreement_bound(np.ones(200), np.arange(200) < 3, 0.9)
    assert binom.cdf(3, 200, bound) == pytest.approx(0.1, abs=1e-9)
    # Scaling every weight alike changes nothing; one disagreement on a weight-20 shadow row counts as 20 of the
    # traffic and shrinks the effective sample, so it bounds far higher than one disagreement of weight 1.
    disagree = np.zeros(300, dtype=bool)
    disagree[0] = True
    plain = disagreement_bound(np.ones(300), disagree, 0.9)
    assert disagreement_bound(np.full(300, 7.0), disagree, 0.9) == pytest.approx(plain)
    heavy = np.ones(300)
    heavy[:20] = 20.0
    n_eff = 680.0**2 / (280 + 20 * 400.0)  # Kish: (sum w)^2 / sum w^2
    k = n_eff * 20.0 / 680.0
    assert disagreement_bound(heavy, disagree, 0.9) == pytest.approx(beta.ppf(0.9, k + 1, n_eff - k))
    assert disagreement_bound(heavy, disagree, 0.9) > 6 * plain
    # Weights that are not finite vouch for nothing (a NaN bound would otherwise pass every comparison).
    assert disagreement_bound(np.array([1.0, np.inf, 1.0]), np.zeros(3, dtype=bool), 0.9) == 1.0
    assert disagreement_bound(np.ones(5), np.ones(5, dtype=bool), 0.9) == 1.0


def test_an_uncalibrated_threshold_would_miss_the_target():
    # The same population served at the naive threshold "score >= target" agrees less than the target:
    # the calibration is what makes the promise hold.
    rng = np.random.default_rng(1)
    s, a = _population(rng, 50000)
    assert a[s >= 0.7].mean() < 0.97


def test_too_little_calibration_data_means_never_serve():
    scores = np.linspace(0.9, 1.0, 20)
    result = conformal_tau(scores, np.ones(20, dtype=bool), np.ones(20, dtype=bool), target=0.97, confidence=0.9)
    assert result.tau == 1.0 and result.served == 0
    assert result.reason.startswith("never serve: 20 eligible calibration inputs, and at least 76 are needed")


def test_a_first_grid_point_that_fails_says_why_nothing_is_served():
    agree = np.ones(400, dtype=bool)
    agree[:40] = False  # 10% disagreement among the most confident inputs
    result = conformal_tau(np.linspace(1.0, 0.0, 400), np.ones(400, dtype=bool), agree, 0.97, confidence=0.9)
    assert result.tau == 1.0
    assert result.reason.startswith("never serve: the strictest tau tried (serving 228 with 40 disagreements")


def test_scan_stops_at_the_first_violation():
    # 100 perfect top scores, then a block of errors, then perfect again: the lenient tail must not be reached.
    scores = np.linspace(1.0, 0.0, 300)
    agree = np.ones(300, dtype=bool)
    agree[100:130] = False
    result = conformal_tau(scores, np.ones(300, dtype=bool), agree, target=0.9, confidence=0.9)
    assert result.served <= 110
    assert all(point["bound"] <= 0.1 for point in result.grid[:-1])
    assert result.grid[-1]["bound"] > 0.1


def test_ood_ineligible_inputs_are_never_counted_as_served():
    scores = np.full(200, 0.99)
    agree = np.ones(200, dtype=bool)
    eligible = np.zeros(200, dtype=bool)
    assert conformal_tau(scores, eligible, agree, 0.9, confidence=0.9).tau == 1.0


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, size=(4000, 10))
    true_p = apply_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)
    labels = np.array([rng.choice(10, p=row) for row in true_p])
    # The model reports probabilities at T = 1/2.5 of the truth (overconfident); fitting must undo it.
    reported = apply_temperature(true_p, 1 / 2.5)
    assert fit_temperature(reported, labels) == pytest.approx(2.5, rel=0.1)


def test_router_learns_that_confidence_means_agreement_and_declines_mean_teacher():
    rng = np.random.default_rng(5)
    n = 3000
    max_p = rng.uniform(0.2, 1.0, n)
    probs = np.stack([max_p, 1 - max_p], axis=1)
    ood = rng.uniform(0, 0.5, n)
    declined = rng.random(n) < 0.1
    ood[declined] += 0.5
    agree = (rng.random(n) < max_p) & ~declined
    spec = fit_router(probs, ood, agree, ~declined, ood_quantile=0.99)
    confident, unsure = np.array([[0.95, 0.05]]), np.array([[0.55, 0.45]])
    assert router_scores(confident, [0.1], spec)[0] > router_scores(unsure, [0.1], spec)[0] + 0.2
    assert router_scores(confident, [0.1], spec)[0] > router_scores(confident, [0.8], spec)[0] + 0.2
    assert spec.ood_threshold == np.quantile(ood[~declined], 0.99, method="inverted_cdf")


def test_the_energy_mix_weighs_the_part_of_the_ood_score_that_predicts_disagreement():
    rng = np.random.default_rng(11)
    n = 4000
    max_p = rng.uniform(0.5, 1.0, n)
    probs = np.stack([max_p, 1 - max_p], axis=1)
    strange = rng.random(n) < 0.2  # inputs the specialist should not answer
    telling = np.where(strange, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    noise = rng.uniform(0.0, 1.0, n)
    agree = (rng.random(n) < max_p) & ~strange
    # Energy tells the strange inputs, the other part is noise: the mix goes (nearly) all to energy; and back.
    assert fit_energy_mix(probs, noise, telling, agree) > 0.9
    assert fit_energy_mix(probs, telling, noise, agree) < 0.1
    both = fit_energy_mix(probs, telling, telling, agree)
    assert 0.3 < both < 0.7
    # One class only: nothing to learn, the score without energy.
    assert fit_energy_mix(probs, noise, telling, np.ones(n, bool)) == 0.0
    # A weight is a count of the traffic a row stands for: doubling every weight changes nothing.
    weighted = fit_energy_mix(probs, telling, telling, agree, weights=np.full(n, 2.0))
    assert weighted == pytest.approx(both, abs=1e-6)


def test_evaluate_counts_declines_as_disagreement_and_respects_the_ood_threshold():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    ood = np.array([0.1, 0.1, 0.9, 0.1])
    router = RouterSpec(features=["max_prob"], weights=[10.0], bias=-5.0, ood_threshold=0.5)
    metrics = evaluate(probs, ood, ["a", "a", "a", "b"], ["a", None, "a", "b"], 1.0, router, 0.5, 0.97)
    assert metrics["served"] == 3  # the third input is OOD
    assert metrics["agreement_served"] == pytest.approx(2 / 3)
    assert metrics["declines_served"] == 1
    coverage, agreement, _ = coverage_curve(np.array([0.9, 0.8, 0.7]), np.ones(3, bool), np.array([1, 0, 1], bool))
    assert coverage.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0]) and agreement.tolist() == pytest.approx(
        [1, 0.5, 2 / 3]
    )


def test_the_decline_recall_floor_is_the_most_lenient_tau_that_escalates_the_share_asked() -> None:
    scores = np.array([0.99, 0.97, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    declined = np.array([False, True, False, True, False, True, False, True, False, True, False, True])
    eligible = np.ones(12, dtype=bool)
    eligible[1] = False  # above the OOD threshold: escalated whatever tau is
    # Six declines; at 0.5 three may be served: the three below the ineligible one that score highest.
    floor = decline_recall_floor(scores, eligible, declined, 0.5)
    assert floor is not None and 0.3 < floor <= 0.3 + 1e-12
    served = eligible & (scores >= floor)
    assert (served & declined).sum() == 3
    # At 0.9 none of the six may be served (0.6 of one is allowed): tau goes just above the top eligible one.
    assert decline_recall_floor(scores, eligible, declined, 0.9) == np.nextafter(0.9, np.inf)
    # Weights count: the top eligible decline standing for 4 requests alone exceeds a third of the weight.
    weights = np.ones(12)
    weights[3] = 4.0
    assert decline_recall_floor(scores, eligible, declined, 0.6, weights) == np.nextafter(0.9, np.inf)
    # No declines, or every one escalated by the OOD threshold: no floor.
    assert decline_recall_floor(scores, eligible, np.zeros(12, dtype=bool), 0.9) is None
    assert decline_recall_floor(scores, ~declined, declined, 0.9) is None
    # Ties: a tau cannot serve one of two equal scores and not the other, so it serves neither.
    tied = np.array([0.8, 0.8, 0.5])
    assert decline_recall_floor(tied, np.ones(3, dtype=bool), np.array([True, True, False]), 0.6) == np.nextafter(
        0.8, np.inf
    )
    with pytest.raises(ValueError, match="target"):
        decline_recall_floor(scores, eligible, declined, 1.0)


def test_the_decline_recall_only_ever_raises_tau_and_records_the_share_escalated() -> None:
    scores = np.linspace(1.0, 0.0, 11)
    declined = np.zeros(11, dtype=bool)
    declined[[2, 9]] = True
    eligible = np.ones(11, dtype=bool)
    lenient = TauResult(tau=0.05, bound=0.02, served=10, errors=1, n=11, reason="every eligible input passes")
    raised = with_decline_recall(lenient, scores, eligible, declined, 0.9)
    assert raised.tau == raised.decline_floor == np.nextafter(scores[2], np.inf) and raised.decline_recall == 1.0
    assert (raised.bound, raised.served, raised.errors) == (0.02, 10, 1)  # what learn-then-test found, kept
    assert "raised from 0.0500" in raised.reason
    strict = TauResult(tau=0.95, bound=0.0, served=1, errors=0, n=11)
    kept = with_decline_recall(strict, scores, eligible, declined, 0.9)
    assert kept.tau == 0.95 and kept.decline_recall == 1.0 and "raised" not in kept.reason
    assert with_decline_recall(lenient, scores, eligible, declined, None) is lenient


def test_the_decline_floor_weighs_declines_as_traffic_allows_an_exact_fit_and_never_passes_one() -> None:
    # Ten declines of weight 1 at 0.9: exactly one may be served (0.1 x 10, a fit floats must not break).
    scores = np.linspace(0.95, 0.05, 10)
    declined = np.ones(10, dtype=bool)
    eligible = np.ones(10, dtype=bool)
    floor = decline_recall_floor(scores, eligible, declined, 0.9)
    assert floor == np.nextafter(scores[1], np.inf)
    # The share escalated is weighed: the served top decline stands for 20 requests of 29.
    weights = np.ones(10)
    weights[0] = 20.0
    lenient = TauResult(tau=0.0, bound=0.01, served=10, errors=0, n=10)
    result = with_decline_recall(lenient, scores, eligible, declined, 0.5, weights)
    assert result.tau == np.nextafter(scores[0], np.inf) and result.decline_recall == 1.0
    unweighted = with_decline_recall(lenient, scores, eligible, declined, 0.5)
    assert unweighted.tau == np.nextafter(scores[5], np.inf) and unweighted.decline_recall == 0.5
    # A saturated router score of 1.0 gives tau 1.0 (never serve), never a tau above 1.
    assert decline_recall_floor(np.array([1.0, 0.5]), np.ones(2, dtype=bool), np.ones(2, dtype=bool), 0.9) == 1.0
