"""Distill's dataset step: window, dedupe (latest answer wins), declines are never labels, soft targets,
time-ordered split; and the soft-label solver minimises scikit-learn's weighted-row objective."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from gateway.inference_log import InferenceRecord
from gateway.settings import LogConfig, Settings, TaskConfig
from router_models import softmax_regression
from router_models.distill_data import Example, read_log, soft_targets, time_split, to_examples
from router_models.softmax_regression import fit_soft_softmax, sparse_targets

LABELS = ["balance", "transfer", "weather"]


def _record(
    text: str,
    label: str | None,
    t: float,
    dist: dict[str, float] | None = None,
    status: int = 200,
    task: str = "intent",
) -> InferenceRecord:
    return InferenceRecord(
        task=task, route="teacher", reason="no_specialist", input_text=text, teacher_model="m",
        teacher_text=label or "I cannot help with that", teacher_label=label, label_distribution=dist,
        request={}, response=None, status=status, latency_ms=1.0, created_at=t,
    )  # fmt: skip


def test_dedupe_keeps_the_latest_answer_and_orders_by_time():
    records = [
        _record("what is my balance", "transfer", 5.0),
        _record("weather today", "weather", 2.0),
        _record("what is my balance", "balance", 9.0),  # the teacher's newer answer wins
        _record("what is my balance", "weather", 1.0),
    ]
    examples, count = to_examples(records, "intent", LABELS)
    assert count == 4
    assert [(e.text, e.label) for e in examples] == [("weather today", "weather"), ("what is my balance", "balance")]


def test_declines_failures_other_tasks_and_the_window():
    records = [
        _record("tell me a joke", None, 1.0),  # a decline
        _record("write a poem", "poem", 2.0),  # a label outside the task's set: also not a label
        _record("balance please", "balance", 3.0, status=502),  # the teacher failed: no answer
        _record("balance please", "balance", 4.0, task="other"),
        _record("old", "balance", 0.5),
    ]
    examples, count = to_examples(records, "intent", LABELS, since=1.0)
    assert count == 2
    assert [(e.text, e.label) for e in examples] == [("tell me a joke", None), ("write a poem", None)]
    with pytest.raises(ValueError, match="decline"):
        soft_targets(examples, LABELS, 1.0)


def test_soft_targets_use_the_distribution_with_temperature_and_fall_back_to_the_label():
    examples = [
        Example("a", "balance", {"balance": 0.8, "transfer": 0.2, "not a label": 0.5}, 1.0),
        Example("b", "weather", None, 2.0),
        Example("c", "transfer", {"unknown": 1.0}, 3.0),
    ]
    t1 = soft_targets(examples, LABELS, 1.0)
    np.testing.assert_allclose(t1, [[0.8, 0.2, 0.0], [0, 0, 1], [0, 1, 0]])
    t2 = soft_targets(examples, LABELS, 2.0)
    expected = np.sqrt([0.8, 0.2]) / np.sqrt([0.8, 0.2]).sum()
    np.testing.assert_allclose(t2[0, :2], expected)
    np.testing.assert_allclose(t2.sum(axis=1), 1.0)


def test_time_split_puts_the_newest_examples_in_the_holdout_and_hashes_the_rest():
    examples = [Example(f"input {i}", "balance", None, float(i)) for i in range(2000)]
    split = time_split(examples, 0.6, 0.25, 0.4)
    assert len(split.holdout) == 300 and split.holdout[0].created_at == 1700.0
    older = split.train + split.router_fit + split.conformal
    assert sorted(e.created_at for e in older) == [float(i) for i in range(1700)]  # disjoint and complete
    # Proportions 0.6 : 0.1 : 0.15 of the whole, up to hashing noise.
    assert abs(len(split.train) - 1200) < 80 and abs(len(split.router_fit) - 200) < 50
    assert abs(len(split.conformal) - 300) < 60
    # Stable: the same inputs land in the same parts on every run.
    again = time_split(list(reversed(examples[:1700])) + examples[1700:], 0.6, 0.25, 0.4)
    assert {e.text for e in again.conformal} == {e.text for e in split.conformal}


def test_time_split_sends_sampled_rows_to_the_conformal_split_with_weights_for_the_same_traffic():
    ordinary = [Example(f"input {i}", "balance", None, float(i)) for i in range(4000)]
    shadow = [Example(f"shadow {i}", "balance", None, 4.0 * i + 0.5, weight=20.0) for i in range(1000)]
    newest = [Example(f"new {i}", "balance", None, 6000.0 + i) for i in range(900)]
    split = time_split(sorted(ordinary + shadow, key=lambda e: e.created_at) + newest, 0.6, 0.25, 0.4)
    assert all(e.text.startswith("new") for e in split.holdout)
    # Every sampled row is in the conformal split, where tau is set; none trains or fits the router.
    assert not any(e.weight > 1.0 for e in split.train + split.router_fit)
    sampled = [e for e in split.conformal if e.text.startswith("shadow")]
    assert len(sampled) == 1000
    p_conformal = (1.0 - 0.6 / 0.85) * (1.0 - 0.4)  # an ordinary row's chance to land there
    assert all(e.weight == pytest.approx(20.0 * p_conformal) for e in sampled)
    # Weighted, the conformal split still holds shadow and ordinary traffic in their true 20000 : 4000 ratio.
    w_shadow = sum(e.weight for e in sampled)
    w_ordinary = sum(e.weight for e in split.conformal if e.text.startswith("input"))
    assert w_shadow / w_ordinary == pytest.approx(20000 / 4000, rel=0.1)


def test_sparse_targets_prune_and_renormalise():
    t = np.array([[0.7, 0.2, 0.095, 0.005], [0.25, 0.25, 0.25, 0.25]])
    s = sparse_targets(t, top_k=2, min_prob=0.01).toarray()
    np.testing.assert_allclose(s[0], [0.7 / 0.9, 0.2 / 0.9, 0, 0])
    assert (s[1] > 0).sum() == 2 and s[1].sum() == pytest.approx(1.0)


def test_solver_matches_scikit_learn_on_one_weighted_row_per_label():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    logits = x @ rng.normal(size=(6, 3))
    targets = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    coef, intercept, _ = fit_soft_softmax(x, targets, c=5.0, max_iter=500, top_k=3, min_prob=0.0)
    rows = np.repeat(np.arange(300), 3)
    labels = np.tile(np.arange(3), 300)
    reference = LogisticRegression(C=5.0, max_iter=2000, tol=1e-10)
    reference.fit(x[rows], labels, sample_weight=targets.ravel())
    ours = x @ coef.T + intercept
    theirs = reference.decision_function(x)
    p_ours = np.exp(ours) / np.exp(ours).sum(1, keepdims=True)
    p_theirs = np.exp(theirs) / np.exp(theirs).sum(1, keepdims=True)
    np.testing.assert_allclose(p_ours, p_theirs, atol=2e-3)


def _sparse_rows(n: int, f: int, seed: int) -> sp.csr_matrix:
    """CSR rows with some empty ones, the first and last rows included (their indptr runs are edge cases)."""
    x = sp.random(n, f, density=0.05, format="lil", dtype=np.float32, random_state=seed)
    for row in (0, 3, n // 2, n - 1):
        x[row, :] = 0.0
    return x.tocsr()


def test_the_model_does_not_depend_on_the_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads over two row blocks fit the same model as one pass, to float32 rounding (which 40 L-BFGS
    iterations amplify to about 1e-4 in the weights)."""
    x = _sparse_rows(400, 60, seed=7)
    rng = np.random.default_rng(7)
    logits = x @ rng.normal(size=(60, 4)) * 3.0
    targets = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    common = {"c": 10.0, "max_iter": 40, "top_k": 4, "min_prob": 0.0}
    monkeypatch.setattr(softmax_regression, "MIN_BLOCK_ROWS", 100)
    coef_blocked, bias_blocked, _ = fit_soft_softmax(x, targets, **common)
    monkeypatch.setattr(softmax_regression, "ROW_BLOCKS", 1)
    coef_one, bias_one, _ = fit_soft_softmax(x, targets, **common)
    np.testing.assert_allclose(coef_blocked, coef_one, atol=1e-3)
    np.testing.assert_allclose(bias_blocked, bias_one, atol=1e-3)
    p_blocked = np.exp(x @ coef_blocked.T + bias_blocked)
    p_one = np.exp(x @ coef_one.T + bias_one)
    np.testing.assert_allclose(p_blocked / p_blocked.sum(1)[:, None], p_one / p_one.sum(1)[:, None], atol=1e-4)


def _log_settings(url: str) -> Settings:
    return Settings(tasks={"intent": TaskConfig(name="intent", teacher="m", labels=LABELS)}, log=LogConfig(url=url))


def test_reading_a_log_that_is_not_there_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "inference.db"
    with pytest.raises(ValueError, match=f"there is no inference log at {missing}"):
        read_log(_log_settings(f"sqlite:///{missing}"), "intent", None)
    assert not (tmp_path / "typo").exists()


def test_reading_an_unreachable_postgresql_names_the_store_without_its_password() -> None:
    url = "postgresql+psycopg://apprentice:s3cret@127.0.0.1:1/test"
    with pytest.raises(ValueError) as caught:
        read_log(_log_settings(url), "intent", None)
    message = str(caught.value)
    assert message.startswith("postgresql+psycopg://apprentice:***@127.0.0.1:1/test: ") and "s3cret" not in message


@pytest.mark.parametrize("with_dense", [True, False], ids=["sparse+dense", "sparse"])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_the_loss_and_gradient_over_row_blocks_are_the_textbook_ones(
    monkeypatch: pytest.MonkeyPatch, blocks: int, with_dense: bool
) -> None:
    """Each block's thread does X W, the softmax and X^T G on its own rows (97 rows: blocks of unequal size,
    empty rows first, last and between): the loss and gradient must still be soft cross-entropy plus the L2
    term, computed here in float64 on the stacked matrix, on every call (the partial sums are reused)."""
    from router_models.softmax_regression import SparseDense, _Objective

    monkeypatch.setattr(softmax_regression, "ROW_BLOCKS", blocks)
    monkeypatch.setattr(softmax_regression, "MIN_BLOCK_ROWS", 10)
    rng = np.random.default_rng(blocks)
    sparse = _sparse_rows(97, 30, seed=blocks)
    dense = rng.normal(size=(97, 5 if with_dense else 0)).astype(np.float32)
    f = 30 + dense.shape[1]
    logits = rng.normal(size=(97, 6)) * 2
    targets = sparse_targets(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), top_k=3, min_prob=0.0)
    w = rng.normal(size=f * 6 + 6).astype(np.float32) * 0.3
    calls = []
    with ThreadPoolExecutor(blocks) as pool:
        objective = _Objective(SparseDense(sparse, dense) if with_dense else sparse, targets, c=2.0, pool=pool)
        assert objective.products is not None and len(objective.products.blocks) == blocks
        for _ in range(2):
            grad = np.full_like(w, np.nan)  # every entry must be written
            calls.append((objective(w, grad), grad))
    x = np.hstack([sparse.toarray(), dense]).astype(np.float64)
    weights, bias = w[: f * 6].reshape(f, 6).astype(np.float64), w[f * 6 :].astype(np.float64)
    z = x @ weights + bias
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    t = targets.toarray()
    l2 = 1.0 / (2.0 * 97)
    expected_loss = -(t * log_p).sum() / 97 + 0.5 * l2 * (weights**2).sum()
    residual = (np.exp(log_p) - t) / 97
    expected_grad = np.concatenate([(x.T @ residual + l2 * weights).ravel(), residual.sum(0)])
    for loss, grad in calls:
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_a_window_reaching_back_before_1970_is_the_whole_log() -> None:
    """`--since 999999999d` once crashed after the whole training run, printing the window's start date."""
    from router_models.distill_data import window_start

    assert window_start(3600.0, now=10_000.0) == 6_400.0
    assert window_start(86400.0 * 999_999_999, now=10_000.0) == 0.0
    assert window_start(None) is None
