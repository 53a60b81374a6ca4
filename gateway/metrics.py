"""Prometheus metrics, all prefixed `apprentice_`, owned by one `Metrics` object per app.

Single process: metrics live in the app's own CollectorRegistry. Several uvicorn workers: set
PROMETHEUS_MULTIPROC_DIR before start (`apprentice serve` does, and wipes it); values are then written to
files there and /metrics aggregates every worker's files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))
M = TypeVar("M", bound=MetricWrapperBase)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def forget_dead_workers(directory: str) -> list[int]:
    """Remove the live gauges' files of workers that no longer run; returns their pids.

    A worker that crashes never reaches its own shutdown, and uvicorn starts another in its place: the dead
    one's `live*` gauge files would keep their last values (a version it served, its share of the shadow
    window) in every scrape. Each worker calls this as it starts."""
    dead: set[int] = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        number = path.stem.rsplit("_", 1)[-1]
        if number.isdigit() and int(number) != os.getpid() and not _running(int(number)):
            dead.add(int(number))
    for pid in sorted(dead):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # `_created` series double the scrape size and no dashboard here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = multiprocess_dir() is not None
        # In multiprocess mode metrics must not sit in a registry that is also scraped through the collector.
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        reg = None if self.multiprocess else self.registry

        self.requests = Counter(
            "apprentice_requests", "Chat completion requests by model (task or passthrough model), route, "
            "reason and HTTP status", ["model", "route", "reason", "status"], registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "apprentice_request_duration_seconds", "Total time to the end of the response",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.overhead = Histogram(
            "apprentice_gateway_overhead_seconds", "Gateway time excluding the upstream",
            ["route"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "apprentice_upstream_duration_seconds", "Time spent waiting on the upstream",
            ["upstream"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "apprentice_upstream_errors", "Failed upstream attempts by kind (status code, timeout, connect)",
            ["upstream", "kind"], registry=reg,
        )  # fmt: skip
        self.upstream_retries = Counter(
            "apprentice_upstream_retries", "Retried upstream attempts", ["upstream"], registry=reg
        )
        self.upstream_fallbacks = Counter(
            "apprentice_upstream_fallbacks", "Requests handed to a fallback upstream",
            ["from_upstream", "to_upstream"], registry=reg,
        )  # fmt: skip
        self.tokens = Counter(
            "apprentice_tokens", "Tokens reported by the upstream or estimated for the specialist",
            ["model", "route", "kind"], registry=reg,
        )  # fmt: skip
        self.cost = Counter(
            "apprentice_cost_usd", "Cost in USD: teacher usage x price; specialist CPU seconds x price",
            ["model", "route"], registry=reg,
        )  # fmt: skip
        self.cost_unknown = Counter(
            "apprentice_cost_unknown", "Responses whose cost is unknown (no price or no usage)",
            ["model"], registry=reg,
        )  # fmt: skip
        self.savings = Counter(
            "apprentice_savings_usd", "Teacher cost avoided by requests the specialist served",
            ["task"], registry=reg,
        )  # fmt: skip
        self.router_score = Histogram(
            "apprentice_router_score", "Router score s(x) per task request", ["task"],
            buckets=SCORE_BUCKETS, registry=reg,
        )  # fmt: skip
        self.specialist_latency = Histogram(
            "apprentice_specialist_inference_seconds", "Router + ONNX inference time", ["task"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.specialist_info = Gauge(
            "apprentice_specialist_info", "1 for the specialist version each task serves",
            ["task", "version"], registry=reg, multiprocess_mode="livemax",
        )  # fmt: skip
        self.registry_refused = Gauge(
            "apprentice_registry_current_refused", "1 while the version a task's current pointer names is refused "
            "by this gateway (the reason: apprentice_registry_loads_total and the log)", ["task"], registry=reg,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.registry_loads = Counter(
            "apprentice_registry_loads", "Specialist loads by result (loaded or the reason it was refused)",
            ["task", "result"], registry=reg,
        )  # fmt: skip
        self.shadow = Counter(
            "apprentice_shadow_requests", "Shadow requests by outcome (agree, disagree, error, skipped)",
            ["task", "outcome"], registry=reg,
        )  # fmt: skip
        self.shadow_agreement = Gauge(
            "apprentice_shadow_agreement", "Live agreement of the specialist with the teacher over this process's "
            "shadow window (NaN until the serving version's first shadow answer)", ["task"], registry=reg,
            multiprocess_mode="livemostrecent",
        )  # fmt: skip
        # The window's answers and agreements as sums over live processes: their ratio pools every worker (and,
        # summed in PromQL, every replica), which no mode of the agreement gauge itself can do.
        self.shadow_window = Gauge(
            "apprentice_shadow_window_answers", "Shadow answers in the live agreement window of the serving version",
            ["task"], registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.shadow_window_agreeing = Gauge(
            "apprentice_shadow_window_agreeing", "Of those, the answers that agreed with the teacher",
            ["task"], registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.target_agreement = Gauge(
            "apprentice_target_agreement", "Each task's configured target_agreement, for alert rules to compare "
            "live agreement with", ["task"], registry=reg, multiprocess_mode="max",
        )  # fmt: skip
        self.log_queue_depth = Gauge(
            "apprentice_log_queue_depth", "Inference-log records waiting to be written",
            registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.log_records = Counter(
            "apprentice_log_records", "Inference-log records by outcome (written, spooled, replayed, dropped, "
            "rejected, unspooled; write_errors counts failed store attempts)", ["outcome"], registry=reg,
        )  # fmt: skip
        for outcome in ("written", "spooled", "replayed", "dropped", "rejected", "unspooled", "write_errors"):
            self.log_records.labels(outcome=outcome)

    def child(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)` (values in label-name order), remembered: labels() validates and locks on
        every call, about 4 us here, and a request touches up to eight series. Only for series that are never
        removed; the cache holds what the metric itself keeps."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
