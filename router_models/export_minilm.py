"""ONNX export of the MiniLM student: the int8 all-MiniLM-L6-v2 graph + mean pooling + L2 norm + the head.

The merged graph takes the tokenizer's input_ids / attention_mask / token_type_ids (int64 [N, T]) and
returns "probabilities" and "ood_score" like the TF-IDF graph; the manifest declares input.kind "tokens"
and the version directory carries the tokenizer.json the encoder was trained with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from gateway.manifest import TokenInput
from router_models.minilm import minilm_onnx_path, minilm_tokenizer_path
from router_models.onnx_head import attach_head
from router_models.students import MiniLMStudent


def _pooling_nodes(hidden: str, mask: str) -> tuple[list[Any], list[Any], str]:
    """Mean over unmasked tokens, then divide by the L2 norm (clipped as MiniLMEncoder clips it)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "pool_last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "pool_token_axis"),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "pool_min_count"),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "pool_min_norm"),
    ]
    nodes = [
        helper.make_node("Cast", [mask], ["pool_mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pool_mask_f", "pool_last_axis"], ["pool_mask3"]),
        helper.make_node("Mul", [hidden, "pool_mask3"], ["pool_masked"]),
        helper.make_node("ReduceSum", ["pool_masked", "pool_token_axis"], ["pool_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["pool_mask3", "pool_token_axis"], ["pool_count_raw"], keepdims=0),
        helper.make_node("Max", ["pool_count_raw", "pool_min_count"], ["pool_count"]),
        helper.make_node("Div", ["pool_sum", "pool_count"], ["pool_mean"]),
        helper.make_node("ReduceL2", ["pool_mean"], ["pool_norm_raw"], axes=[1], keepdims=1),
        helper.make_node("Max", ["pool_norm_raw", "pool_min_norm"], ["pool_norm"]),
        helper.make_node("Div", ["pool_mean", "pool_norm"], ["sentence_embedding"]),
    ]
    return nodes, inits, "sentence_embedding"


def minilm_to_onnx(student: MiniLMStudent) -> tuple[bytes, TokenInput, dict[str, Path]]:
    """(model bytes, the manifest's token input spec, {"tokenizer.json": path}) for a fitted student."""
    import onnx

    model = onnx.load(str(minilm_onnx_path()))
    graph = model.graph
    hidden = graph.output[0].name
    nodes, inits, embedding = _pooling_nodes(hidden, "attention_mask")
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    model = attach_head(
        model, embedding, student.coef_, student.intercept_, student.centroids_, energy_mix=student.energy_mix_
    )
    model.doc_string = f"apprentice MiniLM specialist ({len(student.labels)} labels)"
    inputs = {i.name for i in graph.input}
    tokenizer = minilm_tokenizer_path()
    spec = TokenInput(
        max_length=student._encoder().max_length,
        token_type_ids="token_type_ids" if "token_type_ids" in inputs else None,
        tokenizer_sha256=hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
    )
    data: bytes = model.SerializeToString()
    return data, spec, {"tokenizer.json": tokenizer}
