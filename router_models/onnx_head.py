"""The specialist head as ONNX nodes: label probabilities and the OOD score from a feature vector.

Given features x (L2-normalised TF-IDF or embedding rows), the head has L + 1 linear outputs, the task's
labels and a hidden "teacher declined" class, plus L label centroids:

    logits = x @ coef.T + intercept                        [N, L + 1]
    probabilities = softmax(logits[:, :L])                 [N, L]   (the contract's output)
    p_decline = sigmoid(logits[:, L] - logsumexp(logits[:, :L]))    (softmax mass of the decline class)
    max_sim = clip(max_k cos(x, centroid_k), 0, 1)
    unlike = 1 - (1 - p_decline) * max_sim                           in [0, 1]
    energy = -logsumexp(logits[:, :L])                               (the labels' free energy)
    ood_score = (1 - energy_mix) * unlike + energy_mix * energy    [N]

So an input is out of distribution when it resembles what the teacher declined, or resembles no label at
all (no known word: max_sim = 0, unlike = 1), or when no label's logit is high (high energy: Liu et al.,
"Energy-based Out-of-distribution Detection", 2020). `energy_mix` in [0, 1] is fitted by distill
(`calibration.fit_energy_mix`); 0 gives the score before energy. `head_parts` and `mix_ood` are the same
arithmetic in numpy, the reference the parity check holds the graph to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]


def head_parts(
    features: Any, coef: Float32Array, intercept: Float32Array, centroids: Float32Array
) -> tuple[Float64Array, Float64Array, Float64Array]:
    """(probabilities [N, L], unlike [N], energy [N]) in float64 for features [N, F] (dense or scipy sparse):
    the two parts of the OOD score before `energy_mix` weighs them."""
    n_labels = centroids.shape[0]
    logits = np.asarray(features @ coef.astype(np.float64).T, dtype=np.float64) + intercept.astype(np.float64)
    label_logits = logits[:, :n_labels]
    top = label_logits.max(axis=1, keepdims=True)
    exp = np.exp(label_logits - top)
    total = exp.sum(axis=1, keepdims=True)
    probabilities: Float64Array = exp / total
    lse = (top + np.log(total))[:, 0]
    p_decline = 1.0 / (1.0 + np.exp(-(logits[:, n_labels] - lse)))
    sims = np.asarray(features @ centroids.astype(np.float64).T, dtype=np.float64)
    max_sim = np.clip(sims.max(axis=1), 0.0, 1.0)
    unlike: Float64Array = 1.0 - (1.0 - p_decline) * max_sim
    return probabilities, unlike, -lse


def mix_ood(unlike: Float64Array, energy: Float64Array, energy_mix: float) -> Float64Array:
    """The OOD score from its two parts (module docstring)."""
    out: Float64Array = (1.0 - energy_mix) * unlike + energy_mix * energy
    return out


def _sparse_matmul_nodes(x: str, weights: str, n_columns: int, out: str) -> tuple[list[Any], list[Any]]:
    """out = x @ weights, reading only the weight rows of x's non-zero features.

    A TF-IDF vector of 20k features has a handful of non-zeros; a dense MatMul against [20k, 300] weights cost
    about 1.5 ms per request here, this gather about 0.1 ms. Same result (sums of the same products).
    """
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "sp_0"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sp_1"),
        numpy_helper.from_array(np.array([n_columns], dtype=np.int64), "sp_cols"),
    ]
    zero = helper.make_tensor("sp_zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        node("NonZero", [x], ["sp_nz"]),  # [2, K]: (row, feature) of each non-zero
        node("Transpose", ["sp_nz"], ["sp_nz_t"], perm=[1, 0]),  # [K, 2]
        node("GatherND", [x, "sp_nz_t"], ["sp_values"]),  # [K]
        node("Gather", ["sp_nz", "sp_1"], ["sp_feature_2d"], axis=0),  # [1, K]
        node("Squeeze", ["sp_feature_2d", "sp_0"], ["sp_feature"]),  # [K]
        node("Gather", [weights, "sp_feature"], ["sp_rows"], axis=0),  # [K, C]
        node("Unsqueeze", ["sp_values", "sp_1"], ["sp_values_col"]),  # [K, 1]
        node("Mul", ["sp_rows", "sp_values_col"], ["sp_terms"]),  # [K, C]
        node("Gather", ["sp_nz", "sp_0"], ["sp_row_2d"], axis=0),  # [1, K]
        node("Transpose", ["sp_row_2d"], ["sp_row"], perm=[1, 0]),  # [K, 1]
        node("Shape", [x], ["sp_shape"]),
        node("Gather", ["sp_shape", "sp_0"], ["sp_n"]),
        node("Concat", ["sp_n", "sp_cols"], ["sp_out_shape"], axis=0),
        node("ConstantOfShape", ["sp_out_shape"], ["sp_zeros"], value=zero),
        node("ScatterND", ["sp_zeros", "sp_row", "sp_terms"], [out], reduction="add"),  # [N, C]
    ]
    return nodes, inits


def _head_nodes(
    feature_name: str,
    coef: Float32Array,
    intercept: Float32Array,
    centroids: Float32Array,
    *,
    energy_mix: float = 0.0,
    sparse_input: bool = False,
    dense_feature: str | None = None,
    dense_columns: int = 0,
) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers computing "probabilities" and "ood_score" as the module docstring says.

    One product with [coef | centroids] serves both outputs; `sparse_input` (TF-IDF) computes it from the
    non-zero features only. With `dense_feature` [N, `dense_columns`], the features are
    [feature_name | dense_feature] and the last `dense_columns` weight rows multiply the dense block with a
    plain MatMul.
    """
    from onnx import helper, numpy_helper

    n_labels = centroids.shape[0]
    if coef.shape[0] != n_labels + 1 or intercept.shape[0] != n_labels + 1:
        raise ValueError(f"coef/intercept need {n_labels + 1} rows (labels + decline), got {coef.shape[0]}")
    weights = np.concatenate([coef, centroids], axis=0).T.astype(np.float32)
    n_dense = 0 if dense_feature is None else dense_columns
    weights, dense_weights = weights[: weights.shape[0] - n_dense], weights[weights.shape[0] - n_dense :]

    def ints(name: str, *values: int) -> Any:
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    def floats(name: str, value: float) -> Any:
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)

    inits = [
        numpy_helper.from_array(weights, "head_weights"),
        numpy_helper.from_array(intercept.astype(np.float32), "head_bias"),
        ints("head_0", 0), ints("head_l", n_labels), ints("head_l1", n_labels + 1),
        ints("head_end", 2 * n_labels + 1), ints("head_axis", 1),
        floats("head_one", 1.0), floats("head_zero", 0.0),
        floats("head_mix", energy_mix), floats("head_keep", 1.0 - energy_mix),
    ]  # fmt: skip
    first = "head_z" if dense_feature is None else "head_z_first"
    if sparse_input:
        product, product_inits = _sparse_matmul_nodes(feature_name, "head_weights", weights.shape[1], first)
        inits += product_inits
    else:
        product = [helper.make_node("MatMul", [feature_name, "head_weights"], [first])]
    if dense_feature is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(dense_weights), "head_weights_dense"))
        product += [
            helper.make_node("MatMul", [dense_feature, "head_weights_dense"], ["head_z_dense"]),
            helper.make_node("Add", [first, "head_z_dense"], ["head_z"]),
        ]
    node = helper.make_node
    nodes = [
        *product,
        node("Slice", ["head_z", "head_0", "head_l1", "head_axis"], ["head_logits_raw"]),
        node("Add", ["head_logits_raw", "head_bias"], ["head_logits_all"]),
        node("Slice", ["head_logits_all", "head_0", "head_l", "head_axis"], ["head_logits"]),
        node("Softmax", ["head_logits"], ["probabilities"], axis=1),
        node("Slice", ["head_logits_all", "head_l", "head_l1", "head_axis"], ["head_decline_logit"]),  # [N, 1]
        node("ReduceLogSumExp", ["head_logits"], ["head_lse"], axes=[1], keepdims=1),
        node("Sub", ["head_decline_logit", "head_lse"], ["head_decline_z"]),
        node("Sigmoid", ["head_decline_z"], ["head_p_decline"]),
        node("Slice", ["head_z", "head_l1", "head_end", "head_axis"], ["head_sims"]),
        node("ReduceMax", ["head_sims"], ["head_max_sim_raw"], axes=[1], keepdims=1),
        node("Clip", ["head_max_sim_raw", "head_zero", "head_one"], ["head_max_sim"]),
        node("Sub", ["head_one", "head_p_decline"], ["head_p_keep"]),
        node("Mul", ["head_p_keep", "head_max_sim"], ["head_in_dist"]),
        node("Sub", ["head_one", "head_in_dist"], ["head_unlike"]),
        node("Neg", ["head_lse"], ["head_energy"]),
        node("Mul", ["head_unlike", "head_keep"], ["head_unlike_part"]),
        node("Mul", ["head_energy", "head_mix"], ["head_energy_part"]),
        node("Add", ["head_unlike_part", "head_energy_part"], ["head_ood_col"]),
        node("Squeeze", ["head_ood_col", "head_axis"], ["ood_score"]),
    ]
    return nodes, inits


def attach_head(
    model: Any,
    feature_name: str,
    coef: Float32Array,
    intercept: Float32Array,
    centroids: Float32Array,
    *,
    energy_mix: float = 0.0,
    sparse_input: bool = False,
    dense_feature: str | None = None,
    dense_columns: int = 0,
) -> Any:
    """Replace `model`'s outputs with "probabilities" [N, L] and "ood_score" [N] computed from `feature_name`
    (and `dense_feature`, see `_head_nodes`)."""
    from onnx import TensorProto, checker, helper

    nodes, inits = _head_nodes(
        feature_name, coef, intercept, centroids, energy_mix=energy_mix, sparse_input=sparse_input,
        dense_feature=dense_feature, dense_columns=dense_columns,
    )  # fmt: skip
    graph = model.graph
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, centroids.shape[0]]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, [None]),
        ]
    )
    checker.check_model(model)
    return model
