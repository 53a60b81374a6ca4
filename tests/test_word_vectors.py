"""The TF-IDF student's word-vector block: what it adds, how it is trained, and its per-machine cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from router_models.export import soft_targets_from
from router_models.softmax_regression import SparseDense, fit_soft_softmax
from router_models.students import TfidfStudent
from router_models.word_vectors import WordVectors

LABELS = ["car", "food", "weather"]
TRAIN = [
    ("my car broke down", "car"),
    ("the truck needs new tires", "car"),
    ("where can I park my van", "car"),
    ("the engine of my car is making noise", "car"),
    ("I need an oil change for the truck", "car"),
    ("order a pizza for dinner", "food"),
    ("I want pasta with tomato sauce", "food"),
    ("cook rice and beans", "food"),
    ("a recipe for chicken soup", "food"),
    ("get me a burger and fries", "food"),
    ("what's the weather tomorrow", "weather"),
    ("will it rain today", "weather"),
    ("is it sunny outside", "weather"),
    ("how cold is it this morning", "weather"),
    ("forecast for the weekend", "weather"),
]
# No probe word, nor a close spelling of one, occurs in TRAIN.
PROBES = {
    "automobile": "car",
    "vehicle": "car",
    "motorcycle": "car",
    "spaghetti": "food",
    "sandwich": "food",
    "snow": "weather",
}


def _fit(word_vectors: bool) -> TfidfStudent:
    texts, labels = [t for t, _ in TRAIN], [label for _, label in TRAIN]
    student = TfidfStudent(LABELS, word_vectors=word_vectors, max_iter=50)
    return student.fit(texts, soft_targets_from(labels, LABELS))


def test_words_never_seen_in_training_reach_the_label_of_their_synonyms() -> None:
    probes = list(PROBES)
    with_vectors, _ = _fit(word_vectors=True).predict(probes)
    ngrams_only, _ = _fit(word_vectors=False).predict(probes)
    right = [LABELS[i] == PROBES[p] for p, i in zip(probes, with_vectors.argmax(axis=1), strict=True)]
    right_without = [LABELS[i] == PROBES[p] for p, i in zip(probes, ngrams_only.argmax(axis=1), strict=True)]
    assert all(right), dict(zip(probes, right, strict=True))
    assert sum(right_without) <= len(probes) // 2  # character n-grams alone cannot see these


def test_the_feature_row_is_unit_length_with_both_blocks() -> None:
    student = _fit(word_vectors=True)
    features = student.features(["my car broke down", "zzzz", ""])
    assert isinstance(features, SparseDense)
    norms = np.sqrt(np.asarray(features.sparse.multiply(features.sparse).sum(axis=1)).ravel())
    norms = np.sqrt(norms**2 + (features.dense**2).sum(axis=1))
    np.testing.assert_allclose(norms, [1.0, 1.0, 0.0], atol=1e-6)
    assert np.abs(features.dense[0]).sum() > 0  # known words fill the dense block
    assert np.abs(features.dense[1]).sum() == 0  # an unknown word adds nothing to it


def test_the_solver_gives_the_same_model_for_blocks_and_for_one_stacked_matrix() -> None:
    rng = np.random.default_rng(0)
    sparse = sp.random(200, 50, density=0.1, format="csr", dtype=np.float32, random_state=1)
    dense = rng.normal(size=(200, 8)).astype(np.float32)
    targets = rng.dirichlet(np.ones(4), size=200)
    common = {"c": 5.0, "max_iter": 30, "top_k": 4, "min_prob": 0.0}
    coef_blocks, bias_blocks, _ = fit_soft_softmax(SparseDense(sparse, dense), targets, **common)
    coef_stacked, bias_stacked, _ = fit_soft_softmax(sp.hstack([sparse, dense]).tocsr(), targets, **common)
    np.testing.assert_allclose(coef_blocks, coef_stacked, atol=1e-4)
    np.testing.assert_allclose(bias_blocks, bias_stacked, atol=1e-4)


def test_only_the_first_max_words_words_count_in_python_and_in_the_graph() -> None:
    from gateway.manifest import TextInput
    from router_models.export import OnnxSpecialist, check_parity, tfidf_to_onnx
    from router_models.students import MAX_WORDS

    student = _fit(word_vectors=True)
    capped = " ".join(["car"] * MAX_WORDS)
    longer = capped + " pizza" * 300  # words past the cap: the word block must not see them
    blocks = student.features([capped, longer]).dense
    np.testing.assert_array_equal(blocks[0], blocks[1])
    runner = OnnxSpecialist(tfidf_to_onnx(student), TextInput())
    assert check_parity(runner, student, [capped, longer, "pizza " * 5000, "short one"]) < 1e-4


class CacheOnly(WordVectors):
    """WordVectors that fail if they need the encoder."""

    def _encode(self, words: object) -> np.ndarray:
        raise AssertionError("the encoder ran although the table was cached")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[WordVectors, Path]:
    """One table encoded into an empty cache directory (the encoder runs once for the tests below)."""
    cache_dir = tmp_path_factory.mktemp("word-cache")
    vectors = WordVectors(cache_dir=cache_dir)
    (cached,) = (cache_dir / "word_vectors").glob("*.npz")
    return vectors, cached


def _copy_cache(cached: Path, root: Path) -> Path:
    (root / "word_vectors").mkdir(parents=True)
    copy = root / "word_vectors" / cached.name
    shutil.copyfile(cached, copy)
    return copy


def test_the_word_table_is_encoded_once_then_read_from_the_cache(built, tmp_path: Path) -> None:
    first, cached = built
    _copy_cache(cached, tmp_path)
    again = CacheOnly(cache_dir=tmp_path)
    words, table = again.table(["car"])
    reference_words, reference = first.table(["car"])
    assert words == reference_words and table.shape == (len(words), 128)
    np.testing.assert_array_equal(table, reference)
    with pytest.raises(AssertionError, match="encoder ran"):
        again.table(["zzqxv"])  # a word outside the table needs the encoder


def test_an_unreadable_cache_file_is_encoded_again_not_fatal(built, tmp_path: Path) -> None:
    first, cached = built
    copy = _copy_cache(cached, tmp_path)
    copy.write_bytes(b"not an npz file")  # a torn write or a disk error
    again = WordVectors(cache_dir=tmp_path)
    words, table = again.table([])
    np.testing.assert_array_equal(table, first.table(words)[1][: len(words)])
    with np.load(copy) as rewritten:  # and the cache holds the table again
        assert rewritten["vectors"].shape == (len(words), 128)
