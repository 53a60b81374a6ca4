"""The TF-IDF student's ONNX graph reproduces the Python model (probabilities and OOD within 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.manifest import Manifest, TextInput
from router_models.export import (
    ODD_TEXTS,
    OnnxSpecialist,
    ParityError,
    build_tfidf_artifact,
    check_parity,
    soft_targets_from,
    tfidf_to_onnx,
    write_tfidf_version,
)
from router_models.registry import current_version
from router_models.students import TfidfStudent

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"
UNICODE_TEXTS = [
    "İstanbul'da hava nasıl",
    "Straße nach München?",
    "ÇA VA BIEN",
    "naïve café résumé",
    "Ωμέγα ΣΊΣΥΦΟΣ",
    "привет как дела",
    "東京の天気は",
    "مرحبا كيف حالك",
    "emoji only 🎉🎉🎉",
    "ﬀ ligatures ﬁx",
    "x" * 5000,
    "tabs\tand\nnewlines\r\n",
    "under_score snake_case_words",
    "12 345 6789 1st 2nd",
    "a",
    "İİİ iii",
]


@pytest.fixture(scope="module")
def clinc() -> dict[str, list[list[str]]]:
    data: dict[str, list[list[str]]] = json.loads(CLINC.read_text())
    return data


@pytest.fixture(scope="module", params=[("char", True), ("word", True), ("char", False), ("word", False)], ids=str)
def student_and_model(clinc, request):
    rows = [r for r in clinc["train"] if r[1] in LABELS][:1500]
    texts, targets = [r[0] for r in rows], [r[1] for r in rows]
    analyzer, word_vectors = request.param
    # With words, a small vocabulary cap forces the bigram closure that keeps the ONNX lookup exact.
    student = TfidfStudent(LABELS, analyzer=analyzer, word_vectors=word_vectors, max_features=1500, max_iter=40)
    student.fit(texts, soft_targets_from(targets, LABELS))
    return student, tfidf_to_onnx(student)


LABELS = [
    "balance",
    "bill_due",
    "book_flight",
    "weather",
    "translate",
    "timer",
    "alarm",
    "greeting",
    "goodbye",
    "spelling",
    "calculator",
    "definition",
    "time",
    "date",
    "restaurant_reservation",
]


def test_parity_on_clinc_and_odd_inputs(clinc, student_and_model):
    student, model = student_and_model
    texts = [r[0] for r in clinc["test"][:1500]] + [r[0] for r in clinc["oos_test"][:300]]
    texts += list(ODD_TEXTS) + UNICODE_TEXTS
    runner = OnnxSpecialist(model, TextInput())
    assert check_parity(runner, student, texts) < 1e-4
    probs, ood = runner.predict(texts)
    assert probs.shape == (len(texts), len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert ood.shape == (len(texts),)


def test_outputs_are_named_and_typed_as_the_contract_says(student_and_model):
    import onnxruntime as ort

    _, model = student_and_model
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("text", "tensor(string)")]
    outputs = {o.name: o.type for o in session.get_outputs()}
    assert outputs == {"probabilities": "tensor(float)", "ood_score": "tensor(float)"}
    probs, ood = session.run(None, {"text": np.array([["what is my balance"]], dtype=object)})
    assert probs.shape == (1, len(LABELS)) and ood.shape == (1,)


def test_ood_is_maximal_for_unknown_terms_and_low_for_training_like_text(student_and_model):
    student, _ = student_and_model
    # No word of the first input, nor any pair of its letters (Cyrillic), occurs in the English training text.
    unknown = "zzqx vbnm qwpo" if student.analyzer == "word" else "жщъ ыэю"
    _, ood = student.predict([unknown, "", "what is my bank balance"])
    assert ood[0] == pytest.approx(1.0) and ood[1] == pytest.approx(1.0)
    assert ood[2] < 0.6


def test_parity_check_fails_loudly_on_a_different_model(clinc, student_and_model):
    student, _ = student_and_model
    rows = [r for r in clinc["train"] if r[1] in LABELS][:600]
    other = TfidfStudent(LABELS, max_iter=3).fit([r[0] for r in rows], soft_targets_from([r[1] for r in rows], LABELS))
    with pytest.raises(ParityError, match="worst input"):
        check_parity(OnnxSpecialist(tfidf_to_onnx(other), TextInput()), student, [r[0] for r in rows[:50]])


def test_unseen_labels_keep_a_column_with_negligible_probability():
    texts = ["hello there", "hi friend", "bye now", "see you later"] * 5
    targets = ["greet", "greet", "bye", "bye"] * 5
    onnx_bytes, _ = build_tfidf_artifact(texts, targets, ["bye", "greet", "never_seen"], max_iter=20)
    probs, _ = OnnxSpecialist(onnx_bytes, TextInput()).predict(["hello there"])
    assert probs.shape == (1, 3)
    assert probs[0, 2] < 1e-6 and probs[0, 1] > 0.5


def test_write_tfidf_version_makes_a_valid_promoted_version(tmp_path):
    texts = ["hello there", "hi friend", "bye now", "see you later"] * 5
    path = write_tfidf_version(tmp_path, "chat", texts, ["greet", "greet", "bye", "bye"] * 5, ["bye", "greet"])
    manifest = Manifest.model_validate_json((path / "manifest.json").read_text())
    assert manifest.version == path.name and manifest.input.kind == "text"
    assert current_version(tmp_path, "chat") == path.name


def test_dotted_capital_i_lowercases_as_onnx_does():
    # Python lower-cases "İ" to "i" + U+0307 (so "İstanbul" would tokenise as "stanbul"); ONNX gives "istanbul".
    texts = ["istanbul weather", "weather in istanbul", "stanbul trip", "book a stanbul trip"] * 5
    targets = ["weather", "weather", "travel", "travel"] * 5
    onnx_bytes, student = build_tfidf_artifact(texts, targets, ["travel", "weather"], max_iter=20)
    runner = OnnxSpecialist(onnx_bytes, TextInput())
    assert check_parity(runner, student, ["İstanbul", "İSTANBUL weather"]) < 1e-4
    probs, _ = runner.predict(["İstanbul"])
    assert probs[0, 1] > 0.5


def test_a_batch_scores_each_input_as_it_scores_alone():
    """Short rows of a batch are padded inside the graph; the pad must not read as "#" characters."""
    texts = ["pay bill #12 now", "ticket ## is open", "hello there", "hi friend #1", "bye now"] * 4
    targets = ["bill", "bill", "greet", "greet", "bye"] * 4
    onnx_bytes, student = build_tfidf_artifact(texts, targets, ["bill", "bye", "greet"], max_iter=20)
    assert "##" in student.vectorizer_.vocabulary_
    batch = ["a", " ", "hi", "a much longer input about bill #12 so the others are padded"]
    runner = OnnxSpecialist(onnx_bytes, TextInput())
    together, ood_together = runner.predict(batch)
    alone = [runner.predict([t]) for t in batch]
    np.testing.assert_allclose(together, np.vstack([p for p, _ in alone]), atol=1e-6)
    np.testing.assert_allclose(ood_together, np.concatenate([o for _, o in alone]), atol=1e-6)


def test_python_lower_casing_matches_the_graphs_for_every_bmp_character():
    """onnx_lowercase_compat + str.lower against ONNX StringNormalizer, each character alone and at the end of a
    word (where Python lower-cases a capital sigma to its final form)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from router_models.students import ONNX_LOCALE, onnx_lowercase_compat

    node = helper.make_node("StringNormalizer", ["x"], ["y"], case_change_action="LOWER", locale=ONNX_LOCALE)
    graph = helper.make_graph(
        [node], "lower", [helper.make_tensor_value_info("x", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [None])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    chars = [chr(c) for c in range(0x21, 0x10000) if not 0xD800 <= c <= 0xDFFF]
    texts = chars + ["A" + c for c in chars]
    (lowered,) = session.run(None, {"x": np.array(texts, dtype=object)})
    mismatches = [t for t, got in zip(texts, lowered, strict=True) if onnx_lowercase_compat(t).lower() != got]
    assert mismatches == []


def test_the_energy_mix_is_in_the_graph_as_in_python(clinc, student_and_model):
    import copy

    student, model = student_and_model
    mixed = copy.copy(student)
    mixed.energy_mix_ = 0.6
    texts = [r[0] for r in clinc["test"][:300]] + [r[0] for r in clinc["oos_test"][:100]] + list(ODD_TEXTS)
    runner = OnnxSpecialist(tfidf_to_onnx(mixed), TextInput())
    assert check_parity(runner, mixed, texts) < 1e-4
    probs, ood = runner.predict(texts)
    probs_before, ood_before = OnnxSpecialist(model, TextInput()).predict(texts)
    # The mix moves the OOD score only: 0.4 of the old score plus 0.6 of the labels' free energy.
    np.testing.assert_allclose(probs, probs_before, atol=1e-6)
    _, unlike, energy = student.predict_parts(texts)
    np.testing.assert_allclose(ood_before, unlike, atol=1e-4)
    np.testing.assert_allclose(ood, 0.4 * unlike + 0.6 * energy, atol=1e-4)
