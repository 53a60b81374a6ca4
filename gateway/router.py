"""The router score s(x): the estimated probability that the specialist's answer equals the teacher's.

One implementation shared by the gateway (per request) and by distill (to fit the weights and calibrate tau),
so that what was calibrated offline is exactly what runs online.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from gateway.manifest import RouterFeature, RouterSpec

FloatArray = npt.NDArray[np.float64]


def apply_temperature(probabilities: npt.ArrayLike, temperature: float) -> FloatArray:
    """softmax(logits / T) from probabilities: p_i^(1/T) renormalised (log p = logit - log Z). Rows sum to 1."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    logp = np.log(p) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out = np.exp(logp)
    out /= out.sum(axis=-1, keepdims=True)
    return out


def router_features(
    probabilities: npt.ArrayLike, ood_score: npt.ArrayLike, features: list[RouterFeature]
) -> FloatArray:
    """Feature matrix [N, len(features)] from calibrated probabilities [N, L] and OOD scores [N]."""
    p = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    ood = np.asarray(ood_score, dtype=np.float64).reshape(-1)
    n_labels = p.shape[1]
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    columns: dict[str, FloatArray] = {
        "max_prob": top2[:, 0],
        "margin": top2[:, 0] - top2[:, 1],
        "entropy": -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1) / math.log(n_labels),
        "ood_score": ood,
    }
    return np.stack([columns[name] for name in features], axis=1)


def router_scores(probabilities: npt.ArrayLike, ood_score: npt.ArrayLike, spec: RouterSpec) -> FloatArray:
    """s(x) for each row: sigmoid(bias + features @ weights)."""
    x = router_features(probabilities, ood_score, spec.features)
    z = spec.bias + x @ np.asarray(spec.weights, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-z))
