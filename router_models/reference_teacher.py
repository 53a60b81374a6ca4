"""The reference teacher: an offline stand-in for a frontier LLM on a classification dataset. It is NOT an LLM.

MiniLM sentence embeddings plus a multinomial logistic-regression head, trained on a fixed share of the
train split (per label, chosen by a seed) that the replayed traffic never contains, so that the specialist
distilled from traffic learns from the teacher's answers and not from the teacher's own training data.

It answers like an LLM asked for a bare label would: by greedy decoding over label tokens
(`label_tokens`: "credit_limit_change" -> "credit", "_limit", "_change"), the first token's probabilities
being the head's probabilities summed per first token. Out-of-scope inputs get a decline text outside the
label set: the decline competes with the labels as first token "I" with probability
d(x) = sigmoid((threshold - confidence(x)) / scale), confidence = max head probability + 2 x max cosine to
the teacher's training examples; the threshold is fitted on the val split so that the teacher declines a target
share of its out-of-scope inputs (default 0.9). The trained head is cached on disk by dataset sha256 + seed.
The HTTP server lives in `router_models.reference_teacher_server`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router_models.datasets import Dataset, Example

MODEL_ID = "reference-teacher-minilm-not-an-llm"
DECLINE_TEXT = "I'm sorry, I can't help with that request."
DEFAULT_CACHE_DIR = Path(".apprentice/cache")
_CACHE_FORMAT = 1
# Tokens like OpenAI's: a word carries its leading space; punctuation and "'m"-style suffixes stand alone.
_TEXT_TOKEN = re.compile(r"'[a-z]+|\s?\w+|\s?[^\w\s]")
_LABEL_TOKEN = re.compile(r"[_\s]*[^_\s]+|[_\s]+")

Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TeacherConfig:
    """Training settings; part of the cache key."""

    teacher_fraction: float = 0.3
    C: float = 10.0
    # confidence = max probability + cosine_weight * max cosine to a training example (CLINC150 val: AUROC
    # 0.974 for oos vs in-scope at weight 2, 0.969 at 0.5).
    cosine_weight: float = 2.0
    oos_recall: float = 0.9
    # With no out-of-scope examples in val: decline this share of in-scope val inputs instead.
    in_scope_decline_fallback: float = 0.03
    decline_scale: float = 0.05
    max_iter: int = 1000


@dataclass(frozen=True)
class TokenChoice:
    """One generated token: its probability and the alternatives at its position (most likely first)."""

    token: str
    prob: float
    alternatives: list[tuple[str, float]]


@dataclass(frozen=True)
class TeacherAnswer:
    text: str
    label: str | None
    tokens: list[TokenChoice]


def label_tokens(label: str) -> list[str]:
    """How the teacher spells a label: split before each "_" (or space) run."""
    return _LABEL_TOKEN.findall(label) or [label]


def text_tokens(text: str) -> list[str]:
    return _TEXT_TOKEN.findall(text) or [text]


def split_teacher_traffic(dataset: Dataset, seed: int, teacher_fraction: float = 0.3) -> tuple[list[int], list[int]]:
    """(teacher indices, traffic indices) into `dataset.split("train")`, disjoint and covering it.

    The teacher gets round(fraction * n) in-scope examples of each label (at least one), chosen by `seed`;
    everything else, out-of-scope examples included, is traffic for the flywheel to replay.
    """
    train = dataset.split("train")
    rng = np.random.default_rng(seed)
    teacher: list[int] = []
    for label in dataset.labels:
        idx = np.array([i for i, e in enumerate(train) if e.label == label])
        if len(idx) == 0:
            continue
        k = max(1, round(teacher_fraction * len(idx)))
        teacher.extend(int(i) for i in rng.permutation(idx)[:k])
    chosen = set(teacher)
    return sorted(chosen), [i for i in range(len(train)) if i not in chosen]


def traffic_examples(dataset: Dataset, seed: int, teacher_fraction: float = 0.3) -> list[Example]:
    """The train examples the reference teacher never trained on, in file order: the traffic to replay."""
    train = dataset.split("train")
    return [train[i] for i in split_teacher_traffic(dataset, seed, teacher_fraction)[1]]


@dataclass
class ReferenceTeacher:
    """A trained head plus the decline rule; `answer(text)` gives the reply and its token logprobs."""

    labels: list[str]
    coef: Float32Array  # [L, 384]
    intercept: Float32Array  # [L]
    anchors: Float32Array  # [M, 384] embeddings of the teacher's training examples
    threshold: float
    scale: float
    dataset_sha256: str
    seed: int
    config: TeacherConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    _encoder: Any = field(default=None, repr=False)
    _tokens: list[list[str]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._tokens = [label_tokens(label) for label in self.labels]

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from router_models.minilm import MiniLMEncoder

            # One thread: the server runs requests concurrently and shares the machine with the gateway.
            self._encoder = MiniLMEncoder(threads=1)
        return self._encoder

    def scores(self, embeddings: Float32Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(label probabilities [N, L], confidence [N]) for L2-normalised embeddings."""
        return _scores(embeddings, self.coef, self.intercept, self.anchors, self.config.cosine_weight)

    def decline_probability(self, confidence: float) -> float:
        return _sigmoid((self.threshold - confidence) / self.scale)

    def answer(self, text: str) -> TeacherAnswer:
        probs, conf = self.scores(self.encoder.encode([text]))
        return self.decode(probs[0], float(conf[0]))

    def decode(self, probs: npt.NDArray[np.float64], confidence: float) -> TeacherAnswer:
        """Greedy decoding over label tokens, with the decline as one more first-token alternative."""
        d = self.decline_probability(confidence)
        first: dict[str, float] = {}
        for spelled, p in zip(self._tokens, probs, strict=True):
            first[spelled[0]] = first.get(spelled[0], 0.0) + (1.0 - d) * float(p)
        decline = text_tokens(DECLINE_TEXT)
        first[decline[0]] = first.get(decline[0], 0.0) + d
        alternatives = sorted(first.items(), key=lambda kv: -kv[1])
        best, best_p = alternatives[0]
        if best == decline[0] and d >= best_p - d:  # the decline, not a label sharing its first token, won
            tokens = [TokenChoice(best, best_p, alternatives)]
            tokens += [TokenChoice(t, 0.9999, [(t, 0.9999)]) for t in decline[1:]]
            return TeacherAnswer(DECLINE_TEXT, None, tokens)
        chosen = [TokenChoice(best, best_p, alternatives)]
        candidates = [i for i, t in enumerate(self._tokens) if t[0] == best]
        depth = 1
        while True:
            stop = sum(float(probs[i]) for i in candidates if len(self._tokens[i]) == depth)
            nxt: dict[str, float] = {}
            for i in candidates:
                if len(self._tokens[i]) > depth:
                    tok = self._tokens[i][depth]
                    nxt[tok] = nxt.get(tok, 0.0) + float(probs[i])
            total = stop + sum(nxt.values())
            if not nxt or (stop > 0.0 and stop >= max(nxt.values())):
                break
            # An LLM's end-of-answer token is never listed, so the alternatives are the continuations only.
            options = sorted(((t, m / total) for t, m in nxt.items()), key=lambda kv: -kv[1])
            tok, p = options[0]
            chosen.append(TokenChoice(tok, p, options))
            candidates = [i for i in candidates if len(self._tokens[i]) > depth and self._tokens[i][depth] == tok]
            depth += 1
        label = next(self.labels[i] for i in candidates if len(self._tokens[i]) == depth)
        return TeacherAnswer(label, label, chosen)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _scores(
    emb: Float32Array, coef: Float32Array, intercept: Float32Array, anchors: Float32Array, cosine_weight: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    logits = emb.astype(np.float64) @ coef.T.astype(np.float64) + intercept
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    cosine = (emb @ anchors.T).max(axis=1).astype(np.float64)
    return probs, probs.max(axis=1) + cosine_weight * cosine


def _declines(
    probs: npt.NDArray[np.float64], conf: npt.NDArray[np.float64], labels: list[str], t: float, s: float
) -> npt.NDArray[np.bool_]:
    """The greedy decision, vectorised: the decline wins when d > (1 - d) * the largest first-token mass."""
    firsts = sorted({label_tokens(lab)[0] for lab in labels})
    col = {tok: j for j, tok in enumerate(firsts)}
    agg = np.zeros((len(firsts), len(labels)))
    for i, lab in enumerate(labels):
        agg[col[label_tokens(lab)[0]], i] = 1.0
    top_first = (probs @ agg.T).max(axis=1)
    d = 1.0 / (1.0 + np.exp(-np.clip((t - conf) / s, -500, 500)))
    return np.asarray(d > (1.0 - d) * top_first)


def _fit_threshold(
    probs: npt.NDArray[np.float64],
    conf: npt.NDArray[np.float64],
    is_oos: npt.NDArray[np.bool_],
    labels: list[str],
    config: TeacherConfig,
) -> float:
    """Smallest threshold reaching the target oos recall (or in-scope decline rate when val has no oos)."""
    if is_oos.any():
        rows, target = is_oos, config.oos_recall
    else:
        rows, target = ~is_oos, config.in_scope_decline_fallback
    lo, hi = float(conf.min()) - 1.0, float(conf.max()) + 1.0
    for _ in range(60):  # declines grow monotonically with the threshold: bisect
        mid = (lo + hi) / 2
        rate = _declines(probs[rows], conf[rows], labels, mid, config.decline_scale).mean()
        lo, hi = (lo, mid) if rate >= target else (mid, hi)
    return hi


def build_reference_teacher(
    dataset: Dataset,
    seed: int = 0,
    *,
    config: TeacherConfig | None = None,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    encoder: Any = None,
    log: bool = True,
) -> ReferenceTeacher:
    """Trains (or loads from the cache) the reference teacher for `dataset` and `seed`."""
    config = config or TeacherConfig()
    key = _cache_key(dataset, seed, config)
    path = cache_dir / "reference_teacher" / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        teacher = _load(path, dataset, seed, config)
        if teacher is not None:
            teacher._encoder = encoder
            return teacher
    from sklearn.linear_model import LogisticRegression

    if encoder is None:
        from router_models.minilm import MiniLMEncoder

        encoder = MiniLMEncoder()
    train = dataset.split("train")
    teacher_idx, _ = split_teacher_traffic(dataset, seed, config.teacher_fraction)
    fit_ex = [train[i] for i in teacher_idx]
    cal_ex = dataset.split("val")
    if not any(not e.is_oos for e in cal_ex):
        # No val split: calibrate on a fifth of the teacher's own share (never on traffic).
        order = np.random.default_rng(seed + 1).permutation(len(fit_ex))
        n_cal = max(1, len(fit_ex) // 5)
        cal_ex = [fit_ex[i] for i in order[:n_cal]]
        fit_ex = [fit_ex[i] for i in sorted(order[n_cal:])]
    if log:
        print(
            f"reference teacher: embedding {len(fit_ex)} training + {len(cal_ex)} calibration examples "
            f"({len(dataset.labels)} labels; cached afterwards)",
            file=sys.stderr,
            flush=True,
        )
    x_fit = encoder.encode([e.text for e in fit_ex])
    x_cal = encoder.encode([e.text for e in cal_ex])
    head = LogisticRegression(C=config.C, max_iter=config.max_iter)
    head.fit(x_fit, [e.label for e in fit_ex])
    index = {label: j for j, label in enumerate(head.classes_)}
    order_ = [index[label] for label in dataset.labels if label in index]
    labels = [str(head.classes_[j]) for j in order_]
    coef = head.coef_[order_].astype(np.float32)
    intercept = head.intercept_[order_].astype(np.float32)
    probs, conf = _scores(x_cal, coef, intercept, x_fit, config.cosine_weight)
    is_oos = np.array([e.is_oos for e in cal_ex])
    threshold = _fit_threshold(probs, conf, is_oos, labels, config)
    declined = _declines(probs, conf, labels, threshold, config.decline_scale)
    predicted = np.array(labels)[probs.argmax(axis=1)]
    truth = np.array([e.label for e in cal_ex])
    metrics = {
        "train_examples": len(fit_ex),
        "calibration_examples": len(cal_ex),
        "val_in_scope_accuracy": float(((predicted == truth) & ~declined)[~is_oos].mean()),
        "val_in_scope_declined": float(declined[~is_oos].mean()),
        "val_oos_recall": float(declined[is_oos].mean()) if is_oos.any() else None,
    }
    teacher = ReferenceTeacher(
        labels=labels,
        coef=coef,
        intercept=intercept,
        anchors=x_fit.astype(np.float32),
        threshold=threshold,
        scale=config.decline_scale,
        dataset_sha256=dataset.sha256,
        seed=seed,
        config=config,
        metrics=metrics,
        _encoder=encoder,
    )
    if path is not None:
        _save(path, teacher)
    return teacher


def _cache_key(dataset: Dataset, seed: int, config: TeacherConfig) -> str:
    settings = json.dumps({"format": _CACHE_FORMAT, **asdict(config)}, sort_keys=True)
    return f"{dataset.sha256[:16]}-seed{seed}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def _save(path: Path, teacher: ReferenceTeacher) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                labels=np.array(teacher.labels),
                coef=teacher.coef,
                intercept=teacher.intercept,
                anchors=teacher.anchors,
                threshold=np.float64(teacher.threshold),
                meta=np.array(json.dumps({"dataset_sha256": teacher.dataset_sha256, "metrics": teacher.metrics})),
            )
        os.replace(tmp, path)  # a concurrent start never reads half a file
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load(path: Path, dataset: Dataset, seed: int, config: TeacherConfig) -> ReferenceTeacher | None:
    try:
        with np.load(path) as z:
            labels = [str(x) for x in z["labels"]]
            meta = json.loads(str(z["meta"]))
            if meta["dataset_sha256"] != dataset.sha256 or not set(labels) <= set(dataset.labels):
                return None
            return ReferenceTeacher(
                labels=labels,
                coef=z["coef"],
                intercept=z["intercept"],
                anchors=z["anchors"],
                threshold=float(z["threshold"]),
                scale=config.decline_scale,
                dataset_sha256=dataset.sha256,
                seed=seed,
                config=config,
                metrics=meta["metrics"],
            )
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is rebuilt
