"""`apprentice distill`: inference log -> dataset -> student -> calibration -> ONNX -> gate -> promotion.

Steps (DESIGN.md "Offline path"): read the log window; dedupe by input hash (latest answer wins); declines
become router negatives, never labels; soft targets from the teacher's label distribution with a KD
temperature; a time-ordered split train | router fit | conformal | holdout; the student; temperature,
router weights and OOD threshold on the router-fit split; tau by learn-then-test on the conformal split, at the
task's agreement confidence (`calibration.conformal_tau`); ONNX export and a parity check against Python;
holdout metrics for the candidate and for the current version (its own ONNX through onnxruntime, on the same
holdout); the gate; the version directory written completely; then `current` replaced atomically. A non-dry
run holds the task's registry lock throughout.

Exit semantics for the CLI: a promotion, or the gate keeping the current version, returns a DistillOutcome;
anything that prevents a sound decision raises DistillError.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.inference_log import InferenceRecord
from gateway.manifest import Manifest, RouterSpec
from gateway.router import apply_temperature, router_scores
from router_models import calibration
from router_models.distill_data import Example, Split, read_log, soft_targets, time_split, to_examples, window_start
from router_models.distill_progress import Steps
from router_models.export import ODD_TEXTS, OnnxSpecialist, ParityError, check_parity, load_version, make_manifest
from router_models.minilm import MiniLMNotInstalledError
from router_models.onnx_head import mix_ood
from router_models.registry import (
    DISTILL_LOCK,
    LOCK,
    RegistryError,
    current_version,
    promote,
    prune,
    registry_mark,
    remove_stale_temporaries,
    task_dir,
    task_lock,
    version_name,
    write_version,
)
from router_models.report import report_files
from router_models.student_kinds import build_student, export_student

log = logging.getLogger("apprentice.distill")

if TYPE_CHECKING:
    from gateway.settings import Settings


class DistillError(RuntimeError):
    """Distill could not reach a sound decision (no data, lock held, parity failure, ...)."""


@dataclass
class DistillConfig:
    """Knobs with defaults measured on CLINC150; the task's target agreement and OOD quantile come from the
    settings."""

    # 1.0 keeps the teacher's distribution as it is: on CLINC150 traffic (5k rows) 2.0 gave a student that agrees
    # with the teacher on 88.2% of in-scope test inputs and serves 64% of them at 0.97 agreement (oracle order);
    # 1.0 gave 89.0% / 70%; 4.0 gave 83.7% / 37%.
    kd_temperature: float = 1.0
    train_fraction: float = 0.6
    calibration_fraction: float = 0.25
    router_fit_share: float = 0.4
    gate_tolerance: float = 0.01
    max_iter: int = 60
    max_features: int = 20000
    parity_sample: int = 500
    min_train: int = 20
    # Where the strict-to-lenient tau scan starts (share of eligible calibration inputs served). A bound on
    # disagreement is loosest where few are served: at the top 10-25% of CLINC150's calibration split, three
    # teacher slips among ~130 inputs ended the scan (tau 1.0, nothing served) although the student met the
    # target at 55-75% coverage. Any start fixed before looking keeps the guarantee.
    tau_start_fraction: float = 0.4


@dataclass
class DistillOutcome:
    promoted: bool
    version: str | None
    reason: str
    report_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


def _teacher_labels(examples: list[Example]) -> list[str | None]:
    return [e.label for e in examples]


def _predict(student: Any, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    return student.predict([e.text for e in examples])  # type: ignore[no-any-return]


def _current_holdout(
    registry_dir: Path, task: str, holdout: list[Example], target: float
) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(current version, its holdout metrics through its own ONNX, or a note why it could not be scored).
    A current version whose files are gone comes with neither metrics nor note: no gateway serves it."""
    version = current_version(registry_dir, task)
    if version is None:
        return None, None, None
    vdir = task_dir(registry_dir, task) / "versions" / version
    if not os.path.isfile(vdir / "manifest.json") or not os.path.isfile(vdir / "model.onnx"):  # any OSError: False
        # Nothing a gateway could load either: compared with as no current version at all.
        return version, None, None
    try:
        manifest, runner = load_version(vdir)
        probs, ood = runner.predict([e.text for e in holdout])
    except Exception as exc:  # noqa: BLE001 - an unreadable current version must not block a good candidate (`gate`)
        return version, None, f"current version {version} could not be scored ({type(exc).__name__}: {exc})"
    predicted = [manifest.labels[i] for i in probs.argmax(axis=1)] if len(holdout) else []
    metrics = calibration.evaluate(
        probs, ood, predicted, _teacher_labels(holdout), manifest.temperature, manifest.router, manifest.tau, target,
        weights=_weights(holdout),
    )  # fmt: skip
    return version, metrics, None


def _agreement(probs: np.ndarray, teacher: list[str | None], labels: list[str]) -> np.ndarray:
    """Whether the student's top label is the teacher's answer, row by row (a decline never agrees)."""
    return np.array([t is not None and labels[i] == t for i, t in zip(probs.argmax(axis=1), teacher, strict=True)])


def _weights(examples: list[Example]) -> np.ndarray:
    return np.array([e.weight for e in examples], dtype=np.float64)


def gate(
    candidate: dict[str, Any],
    current: dict[str, Any] | None,
    target: float,
    tolerance: float,
    *,
    current_unscored: bool = False,
    decline_recall: float | None = None,
) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the current version on the same holdout: less coverage at
    its own calibrated tau (what it would really serve; beyond `tolerance`), or agreement on served below the
    target beyond sampling noise and below the current's.

    Sampling noise: two standard errors of an agreement of `target` over the served rows' effective sample size
    (Kish, weights counted). The holdout is the newest 15% with shadow rows of weight 1 / shadow_rate: one
    disagreement among them moved agreement by a point and refused candidates that served half as much again
    at the target (measured on the CLINC150 flywheel). tau's confidence bound is the guarantee; the gate only
    catches a candidate that is clearly off it.

    `current_unscored`: a current version exists but could not be scored (a file it cannot read, a graph this
    code cannot run; a version whose files are gone is no current version). The candidate then stands on its
    own: promoted only if it serves something at agreement within sampling noise of the target, so a weak night
    never replaces a good version unseen.

    `decline_recall` (the task's): a current version that escalates less than that share of the holdout's
    declines (weighted, with at least GATE_MIN_DECLINES of them), where the candidate serves something and
    meets it, is not protected by its coverage. Without this the first run after decline_recall was set would
    be refused for serving less than a version that ignores it."""
    n_eff = float(candidate.get("served_effective_n") or candidate.get("served") or 0)
    noise = 2.0 * math.sqrt(target * (1.0 - target) / n_eff) if n_eff > 0 else 0.0
    cand_cov, cand_ag = candidate["coverage"], candidate["agreement_served"]
    if current is None and current_unscored:
        if cand_cov <= 0.0:
            return False, "kept current, which could not be scored: the candidate would serve nothing"
        if cand_ag is None or cand_ag < target - noise:
            return False, (
                f"kept current, which could not be scored: the candidate's agreement on served {cand_ag} is below "
                f"the target {target} by more than sampling noise ({noise:.4f})"
            )
        return True, f"the current version could not be scored; the candidate serves {cand_cov:.4f} at {cand_ag:.4f}"
    if current is None:
        return True, "no current version to compare with"
    cur_cov = current["coverage"]
    cur_rec, cand_rec = _holdout_decline_recall(current), _holdout_decline_recall(candidate)
    # The candidate must itself meet decline_recall and serve something: a version that serves nothing escalates
    # every decline too.
    unsafe_current = (
        decline_recall is not None and cur_rec is not None and cand_rec is not None
        and cur_rec < decline_recall <= cand_rec and cand_cov > 0.0
    )  # fmt: skip
    if unsafe_current:
        if cand_ag is not None and cand_ag < target - noise:
            return False, (
                f"kept current: agreement on served {cand_ag:.4f} is below the target {target} by more than "
                f"sampling noise ({noise:.4f})"
            )
        return True, (
            f"the current version escalates {cur_rec:.3f} of the holdout's declines, below decline_recall "
            f"{decline_recall}; the candidate {cand_rec:.3f} (coverage {cand_cov:.4f} vs {cur_cov:.4f})"
        )
    if cand_cov < cur_cov - tolerance:
        return False, (
            f"kept current: coverage {cand_cov:.4f} is below the current version's "
            f"{cur_cov:.4f} (tolerance {tolerance})"
        )
    cur_ag = current["agreement_served"]
    if cand_ag is not None and cand_ag < target - noise and (cur_ag is None or cand_ag < cur_ag - tolerance):
        return False, (
            f"kept current: agreement on served {cand_ag:.4f} is below the target {target} by more than "
            f"sampling noise ({noise:.4f}) and below the current version's {cur_ag}"
        )
    return True, f"not worse than current: coverage {cand_cov:.4f} vs {cur_cov:.4f}"


# The gate judges decline recall on the holdout only with at least this many declines in it.
GATE_MIN_DECLINES = 20


def _holdout_decline_recall(metrics: dict[str, Any]) -> float | None:
    """The weighted share of the holdout's declines a version escalates (`calibration.evaluate`); None with
    fewer than GATE_MIN_DECLINES of them, too few to judge a version by."""
    if (metrics.get("declines") or 0) < GATE_MIN_DECLINES:
        return None
    total = float(metrics.get("declines_weight") or 0.0)
    return 1.0 - float(metrics.get("declines_served_weight") or 0.0) / total if total > 0.0 else None


@dataclass
class Fitted:
    """A trained and calibrated candidate, before export: the split it came from, the student, the
    temperature, the router (weights and OOD threshold) and tau."""

    split: Split
    train: list[Example]
    model: Any
    temperature: float
    router: RouterSpec
    tau: calibration.TauResult


def fit_specialist(
    examples: list[Example],
    labels: list[str],
    target: float,
    kind: str,
    cfg: DistillConfig,
    steps: Steps,
    task: str,
    ood_quantile: float,
    *,
    word_vectors: bool,
    confidence: float,
    decline_recall: float | None = None,
) -> Fitted:
    """Split, train, calibrate: everything between the deduplicated log and the ONNX export."""
    split = time_split(examples, cfg.train_fraction, cfg.calibration_fraction, cfg.router_fit_share)
    train = [e for e in split.train if e.label is not None]
    if len(train) < cfg.min_train or len({e.label for e in train}) < 2:
        raise DistillError(
            f"not enough teacher-labelled data for task {task!r}: {len(examples)} unique inputs, "
            f"{len(train)} labelled in the training split (need {cfg.min_train} and 2 labels)"
        )
    with steps.step("soft targets"):
        targets = soft_targets(train, labels, cfg.kd_temperature)
    model = build_student(kind, labels, cfg.max_features, cfg.max_iter, word_vectors=word_vectors)
    with steps.step(f"train {kind} student", total=model.max_iter) as advance:
        declined = [e.text for e in split.train if e.label is None]
        model.fit([e.text for e in train], targets, on_iter=lambda i, loss: advance(1), decline_texts=declined)
    with steps.step("calibrate"):
        fit_probs, fit_unlike, fit_energy = model.predict_parts([e.text for e in split.router_fit])
        fit_labels = _teacher_labels(split.router_fit)
        in_label = np.array([t is not None for t in fit_labels], dtype=bool)
        label_idx = np.array([labels.index(t) for t in fit_labels if t is not None], dtype=np.int64)
        temperature = calibration.fit_temperature(fit_probs[in_label], label_idx)
        fit_agree = _agreement(fit_probs, fit_labels, labels)
        model.energy_mix_ = calibration.fit_energy_mix(
            apply_temperature(fit_probs, temperature), fit_unlike, fit_energy, fit_agree,
            weights=_weights(split.router_fit),
        )  # fmt: skip
        fit_ood = mix_ood(fit_unlike, fit_energy, model.energy_mix_)
        router = calibration.fit_router(
            apply_temperature(fit_probs, temperature), fit_ood, fit_agree, in_label, ood_quantile,
            weights=_weights(split.router_fit),
        )  # fmt: skip
        conf_probs, conf_ood = _predict(model, split.conformal)
        conf_scores = router_scores(apply_temperature(conf_probs, temperature), conf_ood, router)
        conf_labels = _teacher_labels(split.conformal)
        conf_agree = _agreement(conf_probs, conf_labels, labels)
        tau_result = calibration.conformal_tau(
            conf_scores, conf_ood <= router.ood_threshold, conf_agree, target,
            start_fraction=cfg.tau_start_fraction, weights=_weights(split.conformal), confidence=confidence,
        )  # fmt: skip
        conf_declined = np.array([t is None for t in conf_labels], dtype=bool)
        tau_result = calibration.with_decline_recall(
            tau_result, conf_scores, conf_ood <= router.ood_threshold, conf_declined, decline_recall,
            weights=_weights(split.conformal),
        )  # fmt: skip
    return Fitted(split, train, model, temperature, router, tau_result)


# How long the write step waits for a promote, rollback or prune that holds the registry's lock (seconds):
# they take a moment, and the run behind the write may have trained for an hour.
REGISTRY_LOCK_WAIT_S = 120.0


@contextmanager
def _maybe_lock(registry_dir: Path, task: str, dry_run: bool, *, name: str, wait_s: float = 0.0) -> Iterator[None]:
    """The task's lock `name` (one distill run at a time; the registry while it changes), none for a dry run;
    a lock held elsewhere is a DistillError."""
    context: AbstractContextManager[None] = (
        nullcontext() if dry_run else task_lock(registry_dir, task, name=name, wait_s=wait_s)
    )
    try:
        with context:
            yield
    except RegistryError as exc:
        raise DistillError(str(exc)) from exc


@contextmanager
def _encoder_required(task: str, kind: str) -> Iterator[None]:
    """A missing MiniLM package (the MiniLM student, or the TF-IDF student's word vectors) as a DistillError
    that names the pip command and, for the TF-IDF student, the setting that does without it."""
    try:
        yield
    except MiniLMNotInstalledError as exc:
        hint = f"; or set tasks.{task}.word_vectors: false to train on character n-grams alone"
        raise DistillError(f"{exc}{hint if kind == 'tfidf' else ''}") from exc


def run_distill(
    settings: Settings,
    task: str,
    *,
    since_s: float | None,
    dry_run: bool,
    student: str | None = None,
    records: Iterable[InferenceRecord] | None = None,
    progress: bool = True,
    config: DistillConfig | None = None,
) -> DistillOutcome:
    """Distill one task. `since_s` is a window length in seconds (None: the whole log); `records` replaces
    the log store as the data source. `dry_run` does everything but write the version and promote: the
    report goes to <registry>/<task>/dry-runs/<version>/."""
    if task not in settings.tasks:
        raise DistillError(f"task {task!r} is not configured")
    task_cfg = settings.tasks[task]
    cfg = config or DistillConfig()
    kind = student or task_cfg.student
    labels = list(task_cfg.labels)
    target = task_cfg.target_agreement
    registry_dir = Path(settings.registry.path)
    since = window_start(since_s)
    # The distill lock for the whole run; the registry's own lock only while this run writes and promotes, so
    # that an operator's rollback is never kept waiting for a training run.
    with _maybe_lock(registry_dir, task, dry_run, name=DISTILL_LOCK), Steps(enabled=progress) as steps:
        if not dry_run:
            remove_stale_temporaries(registry_dir, task)  # left by a run that crashed mid-write
        # What the registry looked like when this run began: a promote or rollback made while it trains (the
        # history grows, even if it returns to the same version) stands, and this run will not promote.
        start_mark = None if dry_run else registry_mark(registry_dir, task)
        with steps.step("read log"):
            bad_rows: list[tuple[str, str]] = []
            try:
                source = (
                    list(records)
                    if records is not None
                    else read_log(settings, task, since, on_bad_row=lambda i, why: bad_rows.append((i, why)))
                )
            except (OSError, ValueError) as exc:
                raise DistillError(f"cannot read the inference log: {exc}") from exc
            if bad_rows:
                row_id, why = bad_rows[0]
                log.warning(
                    "distill %s: passed over %d log row(s) that cannot be read; the first, id %s: %s",
                    task, len(bad_rows), row_id, why,
                )  # fmt: skip
            examples, n_records = to_examples(source, task, labels, since, shadow_rate=task_cfg.shadow_rate)
        with _encoder_required(task, kind):
            fitted = fit_specialist(
                examples, labels, target, kind, cfg, steps, task, task_cfg.ood_quantile,
                word_vectors=task_cfg.word_vectors, confidence=task_cfg.agreement_confidence,
                decline_recall=task_cfg.decline_recall,
            )  # fmt: skip
        split, train, model = fitted.split, fitted.train, fitted.model
        temperature, router, tau_result = fitted.temperature, fitted.router, fitted.tau
        with steps.step("export ONNX + parity"), _encoder_required(task, kind):
            onnx_bytes, input_spec, extra_files = export_student(model)
            # MiniLM runs a transformer per text on both sides: a smaller sample keeps the check in seconds.
            n_parity = cfg.parity_sample if kind == "tfidf" else min(cfg.parity_sample, 200)
            sample = [e.text for e in (split.conformal + split.holdout)[:n_parity]] + list(ODD_TEXTS)
            tokenizer = extra_files.get("tokenizer.json")
            try:
                parity = check_parity(OnnxSpecialist(onnx_bytes, input_spec, tokenizer), model, sample)
            except ParityError as exc:
                raise DistillError(f"ONNX export does not match the Python model: {exc}") from exc
        with steps.step("evaluate on holdout"):
            hold_probs, hold_ood = _predict(model, split.holdout)
            predicted = [labels[i] for i in hold_probs.argmax(axis=1)] if split.holdout else []
            cand = calibration.evaluate(
                hold_probs,
                hold_ood,
                predicted,
                _teacher_labels(split.holdout),
                temperature,
                router,
                tau_result.tau,
                target,
                weights=_weights(split.holdout),
            )
            cur_version, cur, cur_note = _current_holdout(registry_dir, task, split.holdout, target)
        promoted, reason = gate(
            cand, cur, target, cfg.gate_tolerance, current_unscored=cur_note is not None,
            decline_recall=task_cfg.decline_recall,
        )  # fmt: skip
        if cur_note:
            reason = f"{reason}; {cur_note}"
        if tau_result.tau >= 1.0:
            reason = f"{reason}; tau 1.0, this version would serve nothing ({tau_result.reason})"
        sha = hashlib.sha256(onnx_bytes).hexdigest()
        version = version_name(sha)
        metrics: dict[str, float | int | str | None] = {
            "holdout_coverage": round(cand["coverage"], 6),
            "holdout_agreement_served": cand["agreement_served"],
            "holdout_coverage_at_target": round(cand["coverage_at_target"], 6),
            "holdout_accuracy_labelled": cand["accuracy_labelled"],
            "holdout_n": cand["n"],
            "train_n": len(train),
            "conformal_n": tau_result.n,
            "conformal_bound": tau_result.bound,
            "agreement_confidence": task_cfg.agreement_confidence,
            "parity_max_abs_diff": parity,
            "energy_mix": round(float(model.energy_mix_), 6),
            "kd_temperature": cfg.kd_temperature,
            "train_iterations": int(getattr(model, "n_iter_", 0)),
        }
        data_window: dict[str, str | int | None] = {
            "since": _iso(since),
            "until": _iso(examples[-1].created_at) if examples else None,
            "records": n_records,
            "unique_inputs": len(examples),
            "unreadable_rows": len(bad_rows),
        }
        manifest = make_manifest(
            task=task,
            version=version,
            student=kind,
            labels=labels,
            input_spec=input_spec,
            temperature=temperature,
            router=router,
            tau=tau_result.tau,
            target_agreement=target,
            model_sha256=sha,
            metrics=metrics,
            data_window=data_window,
        )
        report: dict[str, Any] = {
            "task": task, "version": version, "student": kind, "dry_run": dry_run,
            "promoted": promoted and not dry_run, "reason": reason if not dry_run else f"dry run; gate: {reason}",
            "target_agreement": target, "agreement_confidence": task_cfg.agreement_confidence,
            "decline_recall_target": task_cfg.decline_recall,
            "tau": tau_result.tau, "temperature": temperature,
            "router": router.model_dump(), "current_version": cur_version,
            "data": {
                **data_window, "declines": sum(e.label is None for e in examples), "train": len(train),
                "router_fit": len(split.router_fit), "conformal": len(split.conformal),
                "holdout": len(split.holdout),
            },
            "conformal": {k: v for k, v in asdict(tau_result).items() if k != "grid"},
            "holdout": {"candidate": cand, "current": cur},
            "metrics": metrics, "parity_max_abs_diff": parity, "parity_inputs": len(sample),
            "timings_s": steps.timings,
        }  # fmt: skip
        lock = _maybe_lock(registry_dir, task, dry_run, name=LOCK, wait_s=REGISTRY_LOCK_WAIT_S)
        with steps.step("write version"), lock:
            if promoted and start_mark is not None and (now := registry_mark(registry_dir, task)) != start_mark:
                # A promote or rollback while this run trained: the operator's choice stands.
                promoted = False
                reason = (
                    f"{reason}; not promoted: current was promoted or rolled back during this run "
                    f"({start_mark[0]} at the start, {now[0]} now; promote {version} by hand if it should serve)"
                )
                report.update(promoted=False, reason=reason)
            outcome = _write(registry_dir, task, manifest, onnx_bytes, extra_files, report, promoted, dry_run)
            keep = settings.registry.keep_versions
            if keep is not None and not dry_run:
                try:
                    prune(registry_dir, task, keep, lock=False)  # this run holds the registry's lock
                except (RegistryError, OSError) as exc:  # the version is written and promoted: only warn
                    log.warning("distill %s: pruning old versions failed: %s", task, exc)
    return outcome


def _write(
    registry_dir: Path,
    task: str,
    manifest: Manifest,
    onnx_bytes: bytes,
    extra_files: dict[str, Path],
    report: dict[str, Any],
    promoted: bool,
    dry_run: bool,
) -> DistillOutcome:
    files: dict[str, bytes | Path] = {"model.onnx": onnx_bytes, **extra_files, **report_files(report)}
    if dry_run:
        out = task_dir(registry_dir, task) / "dry-runs" / manifest.version
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            if name.startswith("report."):
                (out / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
        (out / "manifest.json").write_text(manifest.model_dump_json(indent=2))
        return DistillOutcome(False, manifest.version, report["reason"], out, report["metrics"])
    try:
        path = write_version(registry_dir, task, files, manifest)
        if promoted:
            promote(registry_dir, task, manifest.version, lock=False)
    except RegistryError as exc:
        raise DistillError(str(exc)) from exc
    return DistillOutcome(promoted, manifest.version, report["reason"], path, report["metrics"])


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
