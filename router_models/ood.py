"""The out-of-distribution scorer's training side: label centroids and the hidden "teacher declined" class.

An input is out of distribution for the specialist when it resembles what the teacher declined (a learned
extra softmax class, trained on the declines in the log) or resembles no label at all (low cosine to every
label centroid): 1 - (1 - p_decline) * max_k cos(x, centroid_k), in [0, 1], higher = more OOD. The OOD score
mixes that with the labels' free energy (no label's logit is high); `router_models.onnx_head` computes both
inside the ONNX graph and in numpy.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

# A dense float32 array (embeddings) or a scipy CSR matrix (TF-IDF); scipy ships no type information.
FeatureMatrix: TypeAlias = Any


def fit_centroids(features: FeatureMatrix, targets: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Per-label centroids [L, F]: target-weighted means of the training rows, L2-normalised; a label with no
    training mass gets a zero row (cosine 0 to everything)."""
    weighted = features.T @ targets  # [F, L]: sum over rows of target-weighted feature vectors
    centroids = np.asarray(weighted, dtype=np.float64).T
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.divide(centroids, norms, out=np.zeros_like(centroids), where=norms > 0)
    out: npt.NDArray[np.float32] = centroids.astype(np.float32)
    return out


def with_decline_class(targets: npt.NDArray[np.float64], n_declines: int) -> npt.NDArray[np.float64]:
    """Targets [N + D, L + 1]: the label targets with a zero decline column, then D one-hot decline rows."""
    n, n_labels = targets.shape
    out = np.zeros((n + n_declines, n_labels + 1))
    out[:n, :n_labels] = targets
    out[n:, n_labels] = 1.0
    return out
