"""The MiniLM student's merged ONNX graph (int8 encoder + pooling + head + OOD) reproduces the Python model,
and the gateway loads it as a token-input specialist."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.specialist import Specialist
from router_models.export import ODD_TEXTS, OnnxSpecialist, check_parity, make_manifest, soft_targets_from
from router_models.export_minilm import minilm_to_onnx
from router_models.registry import version_name, write_version
from router_models.students import MiniLMStudent

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


@pytest.fixture(scope="module")
def fitted():
    data = json.loads(CLINC.read_text())
    labels = sorted({label for _, label in data["train"]})[:12]
    counts: dict[str, int] = {}
    rows = []
    for text, label in data["train"]:
        if label in labels and counts.get(label, 0) < 25:
            counts[label] = counts.get(label, 0) + 1
            rows.append((text, label))
    student = MiniLMStudent(labels, max_iter=100)
    student.fit([t for t, _ in rows], soft_targets_from([lab for _, lab in rows], labels))
    model, spec, extra = minilm_to_onnx(student)
    test = [t for t, lab in data["test"] if lab in labels][:60] + [t for t, _ in data["oos_test"][:20]]
    return student, model, spec, extra, labels, test


def test_parity_on_clinc_and_odd_inputs(fitted):
    student, model, spec, extra, labels, test = fitted
    assert spec.kind == "tokens" and extra["tokenizer.json"].is_file()
    runner = OnnxSpecialist(model, spec, extra["tokenizer.json"])
    odd = [*ODD_TEXTS, "İstanbul'da hava", "東京の天気は", "emoji 🎉 only"]
    assert check_parity(runner, student, test + odd) < 1e-4
    probs, ood = runner.predict(test)
    assert probs.shape == (len(test), len(labels))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Out-of-scope queries sit further from the label centroids than in-scope ones.
    assert np.median(ood[-20:]) > np.median(ood[:60])


def test_the_energy_mix_is_in_the_merged_graph_as_in_python(fitted):
    import copy

    student, _, _, _, _, test = fitted
    mixed = copy.copy(student)
    mixed.energy_mix_ = 0.5
    model, spec, extra = minilm_to_onnx(mixed)
    runner = OnnxSpecialist(model, spec, extra["tokenizer.json"])
    assert check_parity(runner, mixed, test) < 1e-4
    _, unlike, energy = student.predict_parts(test)
    np.testing.assert_allclose(runner.predict(test)[1], 0.5 * unlike + 0.5 * energy, atol=1e-4)


def test_the_gateway_loads_and_runs_the_minilm_version(fitted, tmp_path):
    student, model, spec, extra, labels, test = fitted
    sha = hashlib.sha256(model).hexdigest()
    version = version_name(sha)
    from gateway.manifest import RouterSpec

    manifest = make_manifest(
        task="intent", version=version, student="minilm", labels=labels, input_spec=spec, temperature=1.0,
        router=RouterSpec(features=["max_prob"], weights=[10.0], bias=-5.0, ood_threshold=2.0), tau=0.5,
        target_agreement=0.97, model_sha256=sha,
    )  # fmt: skip
    vdir = write_version(tmp_path, "intent", {"model.onnx": model, **extra}, manifest)
    specialist = Specialist.load(vdir, task="intent", labels=labels)
    probs, _ = student.predict(test[:10])
    for text, row in zip(test[:10], probs, strict=True):
        decision = specialist.decide(text, top_k=0)
        assert decision.label == labels[int(row.argmax())]
        assert decision.probability == pytest.approx(row.max(), abs=1e-4)


def test_the_gateway_refuses_a_tokenizer_that_is_not_the_one_the_manifest_names(fitted, tmp_path):
    """The tokenizer turns text into the ids the graph reads: its sha256 is checked like the model's, and
    the manifest may only name a file of the version directory."""
    import shutil

    from gateway.manifest import RouterSpec
    from gateway.specialist import SpecialistLoadError

    _, model, spec, extra, labels, _ = fitted
    assert spec.tokenizer_sha256 == hashlib.sha256(extra["tokenizer.json"].read_bytes()).hexdigest()
    sha = hashlib.sha256(model).hexdigest()
    manifest = make_manifest(
        task="intent", version=version_name(sha), student="minilm", labels=labels, input_spec=spec,
        temperature=1.0, router=RouterSpec(features=["max_prob"], weights=[10.0], bias=-5.0, ood_threshold=2.0),
        tau=0.5, target_agreement=0.97, model_sha256=sha,
    )  # fmt: skip
    vdir = write_version(tmp_path, "intent", {"model.onnx": model, **extra}, manifest)
    tokenizer = vdir / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(original.replace(b'"[UNK]"', b'"[UNKNOWN]"', 1))  # still a valid tokenizer
    with pytest.raises(SpecialistLoadError) as caught:
        Specialist.load(vdir, task="intent", labels=labels)
    assert caught.value.reason == "sha_mismatch"
    tokenizer.write_bytes(original)
    outside = tmp_path / "other" / vdir.name
    shutil.copytree(vdir, outside)
    data = json.loads((outside / "manifest.json").read_text())
    data["input"]["tokenizer"] = "../tokenizer.json"
    (outside / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(SpecialistLoadError) as caught:
        Specialist.load(outside, task="intent", labels=labels)
    assert caught.value.reason == "bad_manifest" and "input.tokens.tokenizer" in caught.value.detail
