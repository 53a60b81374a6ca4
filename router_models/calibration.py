"""Calibration on held-out teacher answers: temperature, router weights, OOD threshold and tau.

All scoring goes through `gateway.router` (apply_temperature, router_features, router_scores) and the online
rule (ood > threshold -> teacher; s < tau -> teacher; else the specialist), so what is calibrated here is
what the gateway runs.

tau comes from a calibration split that the router was not fitted on, by learn-then-test (Angelopoulos, Bates,
Candès, Jordan and Lei, 2021): for each tau on a fixed grid, scanned from strict to lenient, test whether the
disagreement rate among the inputs it serves exceeds 1 - target, with the Clopper-Pearson upper bound at the
task's `agreement_confidence` (the binomial test's p-value is at most 1 - confidence exactly when that bound is
at most 1 - target). The scan stops at the first grid point whose bound exceeds 1 - target (fixed-sequence
testing), so choosing among many taus does not spend the guarantee: with probability at least the confidence
over the calibration draw, agreement on what the chosen tau serves meets the target on exchangeable traffic.
That is exact while every record weighs 1 (day one). Once shadow records carry importance weights the bound
uses an effective sample size (`disagreement_bound`), an approximation.

The previous rule, conformal risk control, bounded (errors + 1) / (served + 1): a guarantee in expectation over
calibration draws, so a version served below the target about every other night. On the CLINC150 flywheel's
test split it served 82.0% of in-scope inputs at 0.950 agreement; this rule at confidence 0.9, on the same
model, 74.3% at 0.971 (offline, the same day-3 log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.manifest import RouterFeature, RouterSpec
from gateway.router import apply_temperature, router_features, router_scores

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ROUTER_FEATURES: list[RouterFeature] = ["max_prob", "margin", "entropy", "ood_score"]


def fit_temperature(probabilities: FloatArray, label_index: npt.NDArray[np.int64]) -> float:
    """The T minimising the teacher labels' NLL under apply_temperature(p, T), searched on log T.

    Rows are inputs the teacher labelled (declines have no label to fit). T = 1 with fewer than 10 rows."""
    if len(label_index) < 10:
        return 1.0
    from scipy.optimize import minimize_scalar

    logp = np.log(np.clip(probabilities, 1e-12, 1.0))
    picked = logp[np.arange(len(label_index)), label_index]

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        z = logp / t
        zmax = z.max(axis=1)
        lse = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))
        return float((lse - picked / t).mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


# The direction each feature may push s(x): more confidence never lowers the score, more entropy or a higher
# OOD score never raises it. On a few hundred rows an unconstrained fit can give the OOD score a positive
# weight from noise, and a router that trusts stranger inputs more is wrong whatever the data says.
FEATURE_SIGNS: dict[str, int] = {"max_prob": 1, "margin": 1, "entropy": -1, "ood_score": -1}


def fit_router(
    calibrated: FloatArray,
    ood: FloatArray,
    agree: BoolArray,
    in_label: BoolArray,
    ood_quantile: float = 0.99,
    features: list[RouterFeature] | None = None,
    l2: float = 1e-3,
    weights: FloatArray | None = None,
) -> RouterSpec:
    """Sign-constrained logistic regression of agree (specialist label == teacher label; declines count as
    disagreement) on router_features; the OOD threshold is the `ood_quantile` of OOD scores of inputs the
    teacher labelled, each counted with its weight (the traffic it stands for)."""
    features = features or list(ROUTER_FEATURES)
    w = np.ones(len(agree)) if weights is None else np.asarray(weights, dtype=np.float64)
    in_dist = ood[in_label]
    ood_threshold = (
        weighted_quantile(in_dist, w[in_label], ood_quantile) if in_dist.size else float(ood.max(initial=1.0))
    )
    x = router_features(calibrated, ood, features)
    positives = int(agree.sum())
    if positives in (0, len(agree)):
        # One class only: no slope to fit; a constant score at the smoothed agreement rate.
        rate = (positives + 0.5) / (len(agree) + 1.0)
        return RouterSpec(
            features=features,
            weights=[0.0] * len(features),
            bias=math.log(rate / (1 - rate)),
            ood_threshold=ood_threshold,
        )
    theta = _sign_constrained_logistic(x, agree, w, [FEATURE_SIGNS[f] for f in features], l2)
    return RouterSpec(
        features=features, weights=[float(w) for w in theta[1:]], bias=float(theta[0]), ood_threshold=ood_threshold
    )


def fit_energy_mix(
    calibrated: FloatArray,
    unlike: FloatArray,
    energy: FloatArray,
    agree: BoolArray,
    weights: FloatArray | None = None,
    l2: float = 1e-3,
) -> float:
    """The OOD score's weight on energy (`router_models.onnx_head`), in [0, 1].

    Both parts go into the router's regression beside its other features, sign-constrained like the OOD score.
    Their weights, normalised to sum to 1, make one score that carries what both tell about disagreement. The
    OOD threshold and the router are then fitted on that one score, so the gateway's contract is unchanged.
    Measured offline on three CLINC150 day-3 logs, at the best tau on the test split: TF-IDF 78.4% and 78.0%
    of in-scope inputs at 0.97 against 77.4% and 77.5%, MiniLM 89.4% against 87.3%; the OOD score's ROC area
    against out-of-scope inputs 0.958 against 0.926 and 0.925 (TF-IDF), 0.965 against 0.952 (MiniLM). 0 (the
    score without energy) when the fit gives neither part any weight or the rows hold one class only."""
    w = np.ones(len(agree)) if weights is None else np.asarray(weights, dtype=np.float64)
    if int(agree.sum()) in (0, len(agree)):
        return 0.0
    base: list[RouterFeature] = ["max_prob", "margin", "entropy"]
    x = np.column_stack([router_features(calibrated, unlike, base), unlike, energy])
    theta = _sign_constrained_logistic(x, agree, w, [FEATURE_SIGNS[f] for f in base] + [-1, -1], l2)
    w_unlike, w_energy = -float(theta[-2]), -float(theta[-1])
    return w_energy / (w_unlike + w_energy) if w_unlike + w_energy > 0 else 0.0


def _sign_constrained_logistic(
    x: FloatArray, agree: BoolArray, weights: FloatArray, signs: list[int], l2: float
) -> FloatArray:
    """(bias, weights...) of the weighted logistic regression of `agree` on the columns of `x`, each weight
    of the sign `signs` gives it (or zero), L2-penalised."""
    from scipy.optimize import minimize

    y = agree.astype(np.float64)
    w = weights / weights.mean() if len(weights) else weights

    def loss(theta: FloatArray) -> tuple[float, FloatArray]:
        z = theta[0] + x @ theta[1:]
        # log(1 + e^z) - y z, computed stably; its gradient is (sigmoid(z) - y).
        value = float(np.mean(w * (np.logaddexp(0.0, z) - y * z))) + 0.5 * l2 * float(theta[1:] @ theta[1:])
        r = w * (1.0 / (1.0 + np.exp(-z)) - y)
        grad = np.concatenate([[r.mean()], x.T @ r / len(y) + l2 * theta[1:]])
        return value, grad

    bounds = [(None, None)] + [(0.0, None) if sign > 0 else (None, 0.0) for sign in signs]
    result = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    theta: FloatArray = result.x
    return theta


def weighted_quantile(values: FloatArray, weights: FloatArray, q: float) -> float:
    """The smallest value v with at least a share q of the total weight at or below it (numpy's "inverted_cdf"
    quantile when all weights are equal).

    Once a specialist serves, the router-fit split holds every input it escalated with weight 1 and the few it
    served (shadow records) with weight 1 / shadow_rate. An unweighted quantile over-counts the escalated ones,
    whose OOD scores are high: on the CLINC150 flywheel's third day it put the 0.99 threshold at 0.760 where
    the traffic's own 0.99 quantile was 0.672."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    index = int(np.searchsorted(cumulative, q * cumulative[-1] * (1.0 - 1e-12), side="left"))
    return float(values[order][min(index, len(order) - 1)])


def served_mask(scores: FloatArray, ood: FloatArray, router: RouterSpec, tau: float) -> BoolArray:
    """The online rule: the specialist answers iff ood <= threshold and s >= tau."""
    mask: BoolArray = (ood <= router.ood_threshold) & (scores >= tau)
    return mask


@dataclass
class TauResult:
    tau: float
    bound: float | None
    served: int
    errors: int
    n: int
    grid: list[dict[str, float]] = field(default_factory=list)
    # Why tau stopped where it did, in words for the report (most useful when it is 1.0: never serve).
    reason: str = ""
    # The task's decline_recall (`decline_recall_floor`): the floor it set under tau, and the weighted share of
    # the calibration split's declines that the final tau escalates. None without a target or without declines.
    decline_floor: float | None = None
    decline_recall: float | None = None


def conformal_tau(
    scores: FloatArray,
    eligible: BoolArray,
    agree: BoolArray,
    target: float,
    grid_points: int = 100,
    start_fraction: float = 0.1,
    weights: FloatArray | None = None,
    *,
    confidence: float,
) -> TauResult:
    """The smallest tau on a fixed grid, scanned from strict to lenient, whose upper confidence bound on the
    disagreement among served calibration inputs (`disagreement_bound`) stays <= 1 - target.

    `eligible` marks inputs the OOD threshold lets through. The grid runs over score quantiles from the
    first point that serves max(3 x the fewest inputs that could pass, start_fraction of the eligible inputs)
    down to all eligible inputs; it depends on the scores only, never on the labels, as fixed-sequence testing
    requires. Starting there rather than at the very top keeps one early disagreement among a handful of
    inputs from ending the scan. tau = 1.0 (never serve) when the first point fails or there are too few
    eligible inputs.
    """
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    alpha = 1.0 - target
    n = len(scores)
    candidates = np.sort(scores[eligible])[::-1]
    # With no disagreement at all the bound is 1 - (1 - confidence)^(1/m): m must reach this before any tau passes.
    min_served = max(1, math.ceil(math.log(1.0 - confidence) / math.log(1.0 - alpha)))
    result = TauResult(tau=1.0, bound=None, served=0, errors=0, n=n)
    if candidates.size < min_served:
        result.reason = (
            f"never serve: {candidates.size} eligible calibration inputs, and at least {min_served} are needed to "
            f"bound disagreement by {alpha:.4g} at confidence {confidence}"
        )
        return result
    first = min(candidates.size, max(3 * min_served, math.ceil(start_fraction * candidates.size)))
    counts = np.unique(np.linspace(first, candidates.size, grid_points).round().astype(int))
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    for tau in dict.fromkeys(float(candidates[c - 1]) for c in counts):  # strict -> lenient, ties once
        served = eligible & (scores >= tau)
        m = int(served.sum())
        errors = int((served & ~agree).sum())
        bound = disagreement_bound(w[served], ~agree[served], confidence)
        result.grid.append({"tau": tau, "served": m, "errors": errors, "bound": bound})
        if not bound <= alpha:  # NaN fails too
            stop = f"serving {m} with {errors} disagreements bounds disagreement at {bound:.4f} > {alpha:.4g}"
            result.reason = (
                f"never serve: the strictest tau tried ({stop})" if result.served == 0 else f"the next tau, {stop}"
            )
            break
        result.tau, result.bound, result.served, result.errors = tau, bound, m, errors
    else:
        result.reason = "every eligible calibration input passes"
    return result


def decline_recall_floor(
    scores: FloatArray, eligible: BoolArray, declined: BoolArray, target: float, weights: FloatArray | None = None
) -> float | None:
    """The most lenient tau at which the calibration inputs the teacher declined are still escalated at a weighted
    share of at least `target`: served means eligible and score >= tau, as online. None without declines.

    Why a second condition beside agreement: agreement on what is served depends on how much of the traffic is
    out of scope, and a version calibrated on traffic with 1% of it serves a day with 18% at an agreement far
    below the target (the CLINC150 flywheel's test split; README). The share of out-of-scope inputs escalated
    does not depend on how many there are. Measured offline on two day-3 flywheel logs (TF-IDF, seeds 0 and 1):
    at 0.9 the floor raised tau from 0.918 to 0.935 and from 0.837 to 0.914, and the test split's agreement went
    from 0.9704 and 0.9523 to 0.9777 and 0.9747, its out-of-scope recall from 0.946 and 0.881 to 0.961 and
    0.943, at an in-scope offload of 0.738 and 0.768 (0.778 and 0.836 before). In whole flywheel runs at 0.9
    (825e6c5), where every day's version has the floor: seed 1 gave 0.821 / 0.9694 / 0.931 / cost 0.358, seed 0
    0.631 / 0.9884 / 0.986 / 0.514 (the floor raised day 3's tau from 0.930 to 0.961, with 68 declines in the
    calibration split), and the MiniLM student on seed 1 still escalated only 0.852 of the test split's
    out-of-scope inputs. So it is off unless a task sets it."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w[declined].sum())
    if total <= 0.0:
        return None
    servable = declined & eligible
    ranked = np.argsort(-scores[servable], kind="stable")
    top = scores[servable][ranked]
    allowed = (1.0 - target) * total
    # k: the most declines, in score order, whose weight stays within what may be served (a float tolerance
    # keeps an exact fit, such as 1 of 10 at 0.9, from counting as over).
    k = int(np.searchsorted(np.cumsum(w[servable][ranked]), allowed * (1.0 + 1e-9), side="right"))
    if k >= top.size:
        return None  # every servable decline fits within the share: no floor
    # Just above the (k+1)-th score: serves the k above it at most (fewer where scores tie). A score of 1.0 (a
    # saturated router) leaves 1.0, never serve, as tau's range allows.
    return min(float(np.nextafter(top[k], np.inf)), 1.0)


def with_decline_recall(
    result: TauResult,
    scores: FloatArray,
    eligible: BoolArray,
    declined: BoolArray,
    target: float | None,
    weights: FloatArray | None = None,
) -> TauResult:
    """`result` with tau raised to `decline_recall_floor` where that is stricter, and the share of declines
    the final tau escalates recorded; unchanged without a target."""
    if target is None:
        return result
    floor = decline_recall_floor(scores, eligible, declined, target, weights)
    tau = result.tau if floor is None else max(result.tau, floor)
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w[declined].sum())
    served = eligible & (scores >= tau)
    recall = None if total <= 0.0 else 1.0 - float(w[declined & served].sum()) / total
    reason = result.reason
    if tau > result.tau:
        reason = (
            f"{reason}; raised from {result.tau:.4f} to {tau:.4f} so that at least {target} of the "
            f"{int(declined.sum())} calibration inputs the teacher declined (weighed as the traffic they stand for) "
            f"are escalated; bound, served and errors are those of {result.tau:.4f}"
        )
    return replace(result, tau=tau, reason=reason, decline_floor=floor, decline_recall=recall)


def disagreement_bound(weights: FloatArray, disagree: BoolArray, confidence: float) -> float:
    """Clopper-Pearson upper bound, at `confidence`, on the disagreement rate of the traffic `weights` stand for.

    Equal weights give the exact binomial bound on `disagree.sum()` of `len(disagree)`. With importance weights
    (a shadow record stands for 1 / shadow_rate requests) the rate is the weighted share and the sample size
    Kish's effective n, (sum w)^2 / sum w^2: Clopper-Pearson on an effective sample size, as Korn and Graubard
    (1998) bound a weighted survey proportion (they estimate that size from the design; Kish's formula assumes
    disagreement independent of the weight, so this is an approximation). A disagreement on a shadow record of
    weight 20 moves the bound as one observation of that weight does; counting the rows as if they all weighed 1
    would overstate the evidence. Weights that are not finite give 1.0 (nothing can be vouched for)."""
    from scipy.stats import beta

    total = float(weights.sum())
    if not (math.isfinite(total) and total > 0.0):
        return 1.0
    n_eff = total**2 / float((weights**2).sum())
    k = n_eff * float(weights[disagree].sum()) / total
    if k >= n_eff:
        return 1.0
    return float(beta.ppf(confidence, k + 1.0, n_eff - k))


def coverage_curve(
    scores: FloatArray, eligible: BoolArray, agree: BoolArray, weights: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(coverage, agreement among served, tau) when serving the top-k eligible inputs by score, k = 1...

    With `weights`, coverage and agreement are shares of the weighted traffic."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-np.where(eligible, scores, -np.inf), kind="stable")[: int(eligible.sum())]
    hits = np.cumsum(w[order] * agree[order])
    k = np.cumsum(w[order])
    return k / max(float(w.sum()), 1e-12), hits / np.maximum(k, 1e-12), scores[order]


def evaluate(
    probabilities: FloatArray,
    ood: FloatArray,
    predicted: list[str],
    teacher: list[str | None],
    temperature: float,
    router: RouterSpec,
    tau: float,
    target: float,
    weights: FloatArray | None = None,
) -> dict[str, Any]:
    """Holdout metrics of one specialist (its own temperature, router and tau) against the teacher.

    `weights` (see distill_data.to_examples) make coverage and agreement estimates for the whole traffic.

    `predicted` holds the specialist's labels (argmax, by name), `teacher` the teacher's labels (None for a
    decline, which is never an agreement)."""
    calibrated = apply_temperature(probabilities, temperature)
    scores = router_scores(calibrated, ood, router)
    agree = np.array([t is not None and p == t for p, t in zip(predicted, teacher, strict=True)], dtype=bool)
    declined = np.array([t is None for t in teacher], dtype=bool)
    eligible = ood <= router.ood_threshold
    served = served_mask(scores, ood, router, tau)
    n = len(teacher)
    n_served = int(served.sum())
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w_total, w_served = float(w.sum()), float(w[served].sum())
    w_served_sq = float((w[served] ** 2).sum())
    coverage, agreement, _ = coverage_curve(scores, eligible, agree, w)
    meets = np.nonzero(agreement >= target)[0]
    labelled = ~declined
    return {
        "n": n,
        "served": n_served,
        "coverage": w_served / w_total if n else 0.0,
        "agreement_served": float((w * agree)[served].sum() / w_served) if n_served else None,
        # Kish's effective sample size of the served rows: a shadow row of weight 20 is one observation, not 20.
        "served_effective_n": w_served**2 / w_served_sq if n_served else 0.0,
        "coverage_at_target": float(coverage[meets[-1]]) if meets.size else 0.0,
        "accuracy_labelled": float(agree[labelled].mean()) if labelled.any() else None,
        "declines": int(declined.sum()),
        "declines_served": int((served & declined).sum()),
        # The same weighed as the traffic they stand for: a served shadow decline is 1 / shadow_rate requests.
        "declines_weight": float(w[declined].sum()),
        "declines_served_weight": float(w[served & declined].sum()),
        "ood_routed": int((~eligible).sum()),
        "curve": _thin_curve(coverage, agreement),
    }


def _thin_curve(coverage: FloatArray, agreement: FloatArray, points: int = 101) -> list[list[float]]:
    if coverage.size == 0:
        return []
    idx = np.unique(np.linspace(0, coverage.size - 1, min(points, coverage.size)).round().astype(int))
    return [[round(float(coverage[i]), 5), round(float(agreement[i]), 5)] for i in idx]
