"""Selection bias after the first specialist: the log holds every escalation but only the shadow share of what
the specialist served. Shadow records carry weight 1/shadow_rate, and tau, evaluation and the gate use it."""

from __future__ import annotations

import numpy as np

from gateway.inference_log import InferenceRecord
from gateway.manifest import RouterSpec
from router_models.calibration import conformal_tau, evaluate, fit_router, weighted_quantile
from router_models.distill import gate
from router_models.distill_data import to_examples

LABELS = ["balance", "transfer"]


def _record(text: str, route: str, t: float) -> InferenceRecord:
    return InferenceRecord(
        task="intent", route=route, reason="shadow" if route == "shadow" else "low_confidence", input_text=text,
        teacher_model="m", teacher_text="balance", teacher_label="balance", label_distribution=None, request={},
        response=None, status=200, latency_ms=1.0, created_at=t,
    )  # fmt: skip


def test_shadow_records_stand_for_one_over_the_shadow_rate():
    records = [_record("a", "teacher", 1.0), _record("b", "shadow", 2.0)]
    examples, _ = to_examples(records, "intent", LABELS, shadow_rate=0.05)
    assert [(e.text, e.weight) for e in examples] == [("a", 1.0), ("b", 20.0)]
    # Without shadow sampling every logged record is one request.
    examples, _ = to_examples(records, "intent", LABELS, shadow_rate=0.0)
    assert [e.weight for e in examples] == [1.0, 1.0]


def test_a_heavy_disagreement_makes_tau_stricter():
    rng = np.random.default_rng(0)
    n = 400
    scores = rng.uniform(size=n)
    agree = np.ones(n, dtype=bool)
    low = np.argsort(scores)[:150]
    agree[low[::40]] = False  # a few disagreements among low scores
    eligible = np.ones(n, dtype=bool)
    unweighted = conformal_tau(scores, eligible, agree, target=0.97, confidence=0.9)
    weights = np.ones(n)
    weights[~agree] = 20.0  # the same disagreements, seen through shadow records
    weighted = conformal_tau(scores, eligible, agree, target=0.97, weights=weights, confidence=0.9)
    assert weighted.tau > unweighted.tau
    assert weighted.served < unweighted.served


def test_weighted_evaluation_counts_shadow_records_as_the_traffic_they_stand_for():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    ood = np.zeros(3)
    router = RouterSpec(features=["max_prob"], weights=[10.0], bias=-5.0, ood_threshold=1.0)
    teacher = ["balance", "transfer", "transfer"]
    predicted = ["balance", "balance", "transfer"]
    plain = evaluate(probs, ood, predicted, teacher, 1.0, router, 0.9, 0.97)
    weighted = evaluate(probs, ood, predicted, teacher, 1.0, router, 0.9, 0.97, weights=np.array([1.0, 20.0, 1.0]))
    assert plain["coverage"] == 2 / 3 and plain["agreement_served"] == 0.5
    assert weighted["coverage"] == 21 / 22
    assert abs(weighted["agreement_served"] - 1 / 21) < 1e-9
    # A decline the version served, seen through a shadow record, weighs what it stands for too.
    declined = evaluate(probs, ood, predicted, ["balance", None, None], 1.0, router, 0.9, 0.97,
                        weights=np.array([1.0, 20.0, 1.0]))  # fmt: skip
    assert (declined["declines"], declined["declines_served"]) == (2, 1)
    assert (declined["declines_weight"], declined["declines_served_weight"]) == (21.0, 20.0)


def test_the_gate_refuses_a_candidate_that_would_serve_nothing():
    current = {"coverage": 0.55, "agreement_served": 0.97, "coverage_at_target": 0.04}
    candidate = {"coverage": 0.0, "agreement_served": None, "coverage_at_target": 0.09}
    promoted, reason = gate(candidate, current, 0.97, 0.01)
    assert not promoted and "coverage" in reason
    promoted, _ = gate({**candidate, "coverage": 0.6, "agreement_served": 0.975}, current, 0.97, 0.01)
    assert promoted


def test_a_candidate_promoted_over_a_current_version_that_could_not_be_scored_must_hold_up_alone():
    good = {"coverage": 0.7, "agreement_served": 0.975, "served_effective_n": 600.0}
    assert gate(good, None, 0.97, 0.01, current_unscored=True)[0]
    for weak in ({"coverage": 0.0, "agreement_served": None}, {**good, "agreement_served": 0.93}):
        promoted, reason = gate(weak, None, 0.97, 0.01, current_unscored=True)
        assert not promoted and reason.startswith("kept current, which could not be scored")
    # With no current version at all there is nothing to keep: the first version is promoted as it is.
    assert gate({"coverage": 0.0, "agreement_served": None}, None, 0.97, 0.01)[0]


def test_the_gate_forgives_agreement_within_sampling_noise_of_the_target():
    current = {"coverage": 0.45, "agreement_served": 0.985, "served_effective_n": 600.0}
    # 0.962 over an effective 150 served rows is within two standard errors of 0.97 (0.028): promote.
    noisy = {"coverage": 0.70, "agreement_served": 0.962, "served_effective_n": 150.0}
    assert gate(noisy, current, 0.97, 0.01)[0]
    # The same agreement over 3000 effective rows is clearly below the target (noise 0.006): keep current.
    promoted, reason = gate({**noisy, "served_effective_n": 3000.0}, current, 0.97, 0.01)
    assert not promoted and "sampling noise" in reason


def test_a_current_version_that_escalates_too_few_declines_is_not_protected_by_its_coverage():
    # Upgraded to decline_recall 0.9: the holdout has 40 declines; the current version (calibrated without the
    # setting) serves 2 ordinary ones and 2 shadow ones of weight 5, so it covers more; the candidate serves 2.
    def metrics(coverage, agreement, served_weight, declines=40):
        return {"coverage": coverage, "agreement_served": agreement, "served_effective_n": 600.0,
                "declines": declines, "declines_served": 4, "declines_weight": 56.0,
                "declines_served_weight": served_weight}  # fmt: skip

    current, candidate = metrics(0.85, 0.972, 12.0), metrics(0.78, 0.978, 2.0)
    promoted, reason = gate(candidate, current, 0.97, 0.01, decline_recall=0.9)
    assert promoted and "escalates 0.786 of the holdout's declines, below decline_recall 0.9" in reason
    # Without the setting, coverage decides as before.
    assert not gate(candidate, current, 0.97, 0.01)[0]
    # Had its served shadow declines weighed 1, the current would escalate 0.93 and keep its protection.
    rows_only = {**current, "declines_served_weight": 4.0}
    assert not gate(candidate, rows_only, 0.97, 0.01, decline_recall=0.9)[0]
    # The candidate must meet the floor itself, and serve something.
    assert not gate(metrics(0.78, 0.978, 8.0), current, 0.97, 0.01, decline_recall=0.9)[0]
    nothing = {**candidate, "coverage": 0.0, "agreement_served": None, "declines_served_weight": 0.0}
    assert not gate(nothing, current, 0.97, 0.01, decline_recall=0.9)[0]
    # A holdout with too few declines to judge by changes nothing.
    few = (metrics(0.78, 0.978, 2.0, declines=3), metrics(0.85, 0.972, 12.0, declines=3))
    assert not gate(*few, 0.97, 0.01, decline_recall=0.9)[0]
    # The candidate's agreement must still hold up.
    promoted, reason = gate({**candidate, "agreement_served": 0.94}, current, 0.97, 0.01, decline_recall=0.9)
    assert not promoted and "sampling noise" in reason


def test_the_ood_threshold_counts_shadow_records_as_the_traffic_they_stand_for():
    # After a specialist serves: 300 escalated inputs (weight 1) with high OOD scores, 100 shadow records
    # (weight 20, the 2,000 requests the specialist answered) with low ones.
    rng = np.random.default_rng(1)
    ood = np.concatenate([rng.uniform(0.5, 0.9, size=300), rng.uniform(0.0, 0.4, size=100)])
    weights = np.concatenate([np.ones(300), np.full(100, 20.0)])
    probs = np.tile([0.8, 0.2], (400, 1))
    agree = np.ones(400, dtype=bool)
    agree[::7] = False
    labelled = np.ones(400, dtype=bool)
    unweighted = fit_router(probs, ood, agree, labelled, ood_quantile=0.8)
    weighted = fit_router(probs, ood, agree, labelled, ood_quantile=0.8, weights=weights)
    # 2,000 of the 2,300 requests lie below 0.4: the weighted 0.8 quantile is among them.
    assert weighted.ood_threshold < 0.4 < unweighted.ood_threshold
    assert weighted_quantile(ood, np.ones(400), 0.8) == np.quantile(ood, 0.8, method="inverted_cdf")
