"""From inference-log records to a distill dataset: window, dedupe, declines, soft targets, time-ordered split.

A teacher answer whose label is None or outside the task's label set (a decline, an unparseable answer) is
never a training label: it stays in the calibration and holdout splits as an input the specialist must not
serve, so the router learns to send such inputs to the teacher.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gateway.inference_log import UNSUPPORTED_REASON, InferenceRecord

if TYPE_CHECKING:
    from gateway.settings import Settings


CUT_SHORT = frozenset({"length", "content_filter"})  # finish reasons of an answer that is neither label nor decline


@dataclass(frozen=True, slots=True)
class Example:
    """One deduplicated input with the teacher's answer (`label` None = a decline: not a label)."""

    text: str
    label: str | None
    distribution: dict[str, float] | None
    created_at: float
    # How many requests of the traffic this record stands for (see `to_examples`).
    weight: float = 1.0


@dataclass(frozen=True)
class Split:
    train: list[Example]
    router_fit: list[Example]
    conformal: list[Example]
    holdout: list[Example]


def read_log(
    settings: Settings, task: str, since: float | None, on_bad_row: Callable[[str, str], None] | None = None
) -> list[InferenceRecord]:
    """The task's records from the configured log store (settings.log.url), oldest first. Raises ValueError
    naming the store when it cannot be read; rows that cannot be decoded go to `on_bad_row(id, why)`."""
    if settings.log.url.startswith("memory:"):
        raise ValueError("the inference log is memory:// (nothing is kept); configure log.url to distill")
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.logstore import LogStore
    from gateway.logstore_writer import brief

    store = LogStore(settings.log.url, chunk_size=10000, create=False)  # a mistyped path: an error, nothing made
    try:
        return list(store.iter_records(task, since, bodies=False, on_bad_row=on_bad_row))
    except SQLAlchemyError as exc:
        raise ValueError(f"{store.url}: {brief(exc)}") from exc
    finally:
        store.close()


def to_examples(
    records: Iterable[InferenceRecord],
    task: str,
    labels: Sequence[str],
    since: float | None = None,
    shadow_rate: float = 0.0,
) -> tuple[list[Example], int]:
    """Dedupe by input hash keeping the latest answer; returns (examples oldest first, records read).

    Records that are not the teacher's answer to the input text alone are passed over, so that they never
    replace one that is: failed teacher calls and streams the client left early (non-2xx status: no answer,
    or part of one); requests the specialist could not honour (reason `unsupported_request`: tools, an
    image, a JSON response format, a token cap the label does not fit, ...), whose answer replies to more
    than the text; and answers cut short (`finish_reason` "length" or "content_filter"), which are neither
    a label nor a decline.

    Once a specialist serves, the log is not a sample of the traffic: every request the router sent to the
    teacher is there, but of those the specialist answered only the shadow share (`shadow_rate`). Each shadow
    record therefore stands for 1 / shadow_rate requests (a Horvitz-Thompson weight); calibration and
    evaluation weigh by it, so tau is set for the traffic the next specialist will really see, not for the
    hard cases the last one escalated."""
    label_set = set(labels)
    latest: dict[str, InferenceRecord] = {}
    count = 0
    for record in records:
        if record.task != task or not 200 <= record.status < 300:
            continue
        if record.reason == UNSUPPORTED_REASON or record.finish_reason in CUT_SHORT:
            continue
        if since is not None and record.created_at < since:
            continue
        count += 1
        seen = latest.get(record.input_sha256)
        if seen is None or record.created_at >= seen.created_at:
            latest[record.input_sha256] = record
    examples = [
        Example(
            text=r.input_text,
            label=r.teacher_label if r.teacher_label in label_set else None,
            distribution=r.label_distribution,
            created_at=r.created_at,
            weight=1.0 / shadow_rate if r.route == "shadow" and shadow_rate > 0 else 1.0,
        )
        for r in latest.values()
    ]
    examples.sort(key=lambda e: e.created_at)
    return examples, count


def soft_targets(examples: Sequence[Example], labels: Sequence[str], kd_temperature: float) -> npt.NDArray[np.float64]:
    """[N, L] targets: the teacher's label distribution restricted to the task labels, sharpened or softened
    as p^(1/T) and renormalised; the one-hot teacher label when there is no usable distribution."""
    index = {label: i for i, label in enumerate(labels)}
    n = len(examples)
    out = np.zeros((n, len(labels)))
    rows: list[int] = []
    keys: list[str] = []
    values: list[float] = []
    hard = np.empty(n, dtype=np.int64)
    # One flat pass over all (label, p) pairs, then one vectorised scatter: a per-row numpy loop costs
    # seconds on 100k rows with 20 pairs each.
    for row, example in enumerate(examples):
        if example.label is None:
            raise ValueError("a decline has no target")
        hard[row] = index[example.label]
        if example.distribution:
            rows.extend([row] * len(example.distribution))
            keys.extend(example.distribution)
            values.extend(example.distribution.values())
    if rows:
        cols = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        vals = np.asarray(values, dtype=np.float64)
        ok = (cols >= 0) & np.isfinite(vals) & (vals > 0)
        out[np.asarray(rows)[ok], cols[ok]] = vals[ok]  # a dict holds each label once: no duplicates
    totals = out.sum(axis=1)
    missing = totals <= 0
    out[missing, hard[missing]] = 1.0
    totals[missing] = 1.0
    out /= totals[:, None]
    out **= 1.0 / kd_temperature
    out /= out.sum(axis=1, keepdims=True)
    return out


def time_split(
    examples: Sequence[Example], train_fraction: float, calibration_fraction: float, router_fit_share: float
) -> Split:
    """The newest examples are the holdout (how a version does on today's traffic); everything older is split
    by a hash of the input into train | router fit | conformal, in the given proportions.

    Why not time order all the way: once a specialist serves, the newest days hold mostly the inputs it
    escalated plus a thin, heavily weighted shadow sample, so a calibration split cut from them alone is too
    noisy to set tau (measured: tau went to 1.0, serving nothing, on the second day of the CLINC150 flywheel).
    Drawing calibration from the whole window, older unfiltered days included, keeps it a weighted sample of
    the same traffic with many more rows. The hash keeps the split stable across runs.

    Sampled records (weight > 1: shadow records, each standing for 1 / shadow_rate requests) all go to the
    conformal split, none to training or the router fit: they are the only sample of what the last specialist
    served, and tau rests on them. Their weights are rescaled by the ratio of inclusion probabilities (an
    ordinary record reaches the conformal split with probability (1 - cut_train) * (1 - router_fit_share), a
    sampled one with probability 1), so every weighted sum still estimates the same traffic (Horvitz-Thompson).
    The smaller their weight beside the ordinary rows', the larger the effective sample size the bound on
    disagreement rests on: one disagreement among a dozen shadow rows of weight 20 decided tau (measured on a
    CLINC150 flywheel day: bound 0.058 with it, 0.022 without).

    Measured on the third day of a CLINC150 flywheel run (7,653 inputs; the test split's in-scope inputs served
    at the tau distill chose, over five draws of the hash): with the shadow rows shared between router fit and
    conformal split as before, 0.78, 0.00, 0.51, 0.49 and 0.79; with all of them in the conformal split, 0.78,
    0.76, 0.80, 0.73 and 0.80. The router fit then sees ordinary records only, which lean to what the last
    specialist escalated; at equal tau out-of-scope recall moved by less than a point.
    """
    items = list(examples)
    n_holdout = round(len(items) * max(0.0, 1.0 - train_fraction - calibration_fraction))
    older, holdout = items[: len(items) - n_holdout], items[len(items) - n_holdout :]
    cut_train = train_fraction / (train_fraction + calibration_fraction)
    cut_fit = cut_train + (1.0 - cut_train) * router_fit_share
    train: list[Example] = []
    router_fit: list[Example] = []
    conformal: list[Example] = []
    # The chance that an ordinary record lands in the conformal split; a sampled one always does.
    p_conformal = (1.0 - cut_train) * (1.0 - router_fit_share)
    for example in older:
        if example.weight > 1.0:
            conformal.append(replace(example, weight=example.weight * p_conformal))
            continue
        u = int.from_bytes(hashlib.sha256(example.text.encode("utf-8")).digest()[:8], "big") / 2**64
        (train if u < cut_train else router_fit if u < cut_fit else conformal).append(example)
    return Split(train=train, router_fit=router_fit, conformal=conformal, holdout=holdout)


def window_start(since_s: float | None, now: float | None = None) -> float | None:
    """`--since DURATION` in seconds -> the epoch time the window starts (None: the whole log)."""
    if since_s is None:
        return None
    # A window reaching back before 1970 is the whole log (and a date the report can still print).
    return max(0.0, (time.time() if now is None else now) - since_s)
