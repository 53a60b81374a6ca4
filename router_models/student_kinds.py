"""The student kinds distill can train ("tfidf", "minilm"): construction and export behind one interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.manifest import TextInput, TokenInput
from router_models.students import MiniLMStudent, TfidfStudent

STUDENT_KINDS = ("tfidf", "minilm")


def build_student(
    kind: str, labels: Sequence[str], max_features: int, max_iter: int, *, word_vectors: bool = True
) -> Any:
    """An unfitted student: `fit(texts, targets, on_iter)`, `predict(texts) -> (probabilities, ood)`.

    `word_vectors` applies to the TF-IDF student only (the MiniLM student embeds whole texts)."""
    if kind == "tfidf":
        return TfidfStudent(labels, max_features=max_features, max_iter=max_iter, word_vectors=word_vectors)
    if kind == "minilm":
        return MiniLMStudent(labels, max_iter=max(max_iter, 200))
    raise ValueError(f"unknown student {kind!r}; choose one of {', '.join(STUDENT_KINDS)}")


def export_student(student: Any) -> tuple[bytes, TextInput | TokenInput, dict[str, Path]]:
    """(model.onnx bytes, the manifest's input spec, extra files for the version directory)."""
    if isinstance(student, TfidfStudent):
        from router_models.export import tfidf_to_onnx

        return tfidf_to_onnx(student), TextInput(), {}
    if isinstance(student, MiniLMStudent):
        from router_models.export_minilm import minilm_to_onnx

        return minilm_to_onnx(student)
    raise TypeError(f"no exporter for {type(student).__name__}")
