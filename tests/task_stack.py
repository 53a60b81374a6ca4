"""A CLINC150 specialist and a running gateway in front of a fake teacher, for the task-path e2e tests.

`clinc_model()` trains a real TF-IDF student (router_models.export) on 40 training utterances of each of 12
intents, once per test session; `put_version` writes it (or a broken variant) into a registry as a new version
and promotes it. Its router is s = sigmoid(8 max_prob - 4) with OOD threshold 0.95 and tau = 0.95:
in-distribution test utterances it is sure of are served (`confident_inputs` picks them with the artifact
itself), text with no known word is `ood` (OOD_TEXTS), a sentence mixing two intents is `low_confidence`
(MIXED_TEXT).

`task_stack(tmp, tasks, specialists=..., poll_s=...)` starts the fake upstream (the teacher, `gpt-4o`, which
litellm prices) and `apprentice serve` with one task per entry of `tasks` (name -> shadow_rate), every task over
the same intents, a SQLite inference log and admin/client keys. The fake answers the text named by the
request's `metadata` `x-fake-content`, with OpenAI-shaped logprobs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam
from procs import Proc, metric_total, scrape_metrics, start_fake_upstream, start_gateway, stop_all

from gateway.inference_log import InferenceRecord
from gateway.logstore import LogStore
from gateway.manifest import RouterSpec, TextInput
from gateway.specialist import Specialist

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"
INTENTS = sorted([
    "alarm", "balance", "book_flight", "calculator", "definition", "goodbye", "greeting", "pay_bill",
    "restaurant_reservation", "timer", "translate", "weather",
])  # fmt: skip
TRAIN_PER_INTENT = 40
TEACHER = "gpt-4o"
TAU = 0.95
ROUTER = RouterSpec(features=["max_prob"], weights=[8.0], bias=-4.0, ood_threshold=0.95)
CLIENT_KEY = "sk-task-client"
ADMIN_KEY = "sk-task-admin"
# Far from the training text: no word of the first, and no pair of characters of the second (Cyrillic), is in
# it, so the OOD score is above the threshold (1 for the second, whose TF-IDF vector is empty).
OOD_TEXTS = ("qzxv plokij wmbtr", "Собака спит под столом")
# Two intents in one sentence: the specialist's top probability is far from 1, so s(x) < tau.
MIXED_TEXT = "set an alarm and what is the weather"

T = TypeVar("T")


@functools.cache
def clinc() -> dict[str, list[list[str]]]:
    data: dict[str, list[list[str]]] = json.loads(CLINC.read_text(encoding="utf-8"))
    return data


@functools.cache
def clinc_model() -> bytes:
    """model.onnx of a TF-IDF student on the first TRAIN_PER_INTENT training utterances of each intent;
    built once per test session (training and the skl2onnx export take a few seconds)."""
    from threadpoolctl import threadpool_limits

    from router_models.export import build_tfidf_artifact

    seen: dict[str, int] = {}
    texts, targets = [], []
    for text, label in clinc()["train"]:
        if label in INTENTS and seen.get(label, 0) < TRAIN_PER_INTENT:
            seen[label] = seen.get(label, 0) + 1
            texts.append(text)
            targets.append(label)
    # One BLAS thread: on two cores shared with the gateway and other test runs, OpenBLAS's threads spin
    # against each other and the fit takes three times as long.
    with threadpool_limits(limits=1):
        model: bytes = build_tfidf_artifact(texts, targets, INTENTS)[0]
    return model


_version_seconds = itertools.count(1)


def put_version(
    registry: Path,
    task: str,
    *,
    model: bytes | None = None,
    labels: list[str] | None = None,
    tau: float = TAU,
    router: RouterSpec = ROUTER,
    promote: bool = True,
) -> str:
    """Write a complete version of `task` (the CLINC model unless `model` is given) and promote it."""
    from router_models.export import make_manifest
    from router_models.registry import promote as promote_version
    from router_models.registry import version_name, write_version

    onnx_bytes = clinc_model() if model is None else model
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    # Copies of one model share the sha: distinct timestamps keep their version names apart.
    version: str = version_name(sha, datetime.now(UTC) + timedelta(seconds=next(_version_seconds)))
    manifest = make_manifest(
        task=task, version=version, student="tfidf", labels=labels or INTENTS, input_spec=TextInput(),
        temperature=1.0, router=router, tau=tau, target_agreement=0.97, model_sha256=sha,
    )  # fmt: skip
    write_version(registry, task, {"model.onnx": onnx_bytes}, manifest)
    if promote:
        promote_version(registry, task, version)
    return version


def load_specialist(registry: Path, task: str, version: str) -> Specialist:
    return Specialist.load(registry / task / "versions" / version, task=task, labels=INTENTS)


def confident_inputs(specialist: Specialist, count: int) -> list[tuple[str, str]]:
    """(text, intent) pairs from CLINC's test split that the specialist serves, and serves correctly."""
    picked = []
    for text, label in clinc()["test"]:
        if label in INTENTS:
            decision = specialist.decide(text)
            if decision.route == "specialist" and decision.label == label and decision.score >= TAU + 0.01:
                picked.append((text, label))
                if len(picked) == count:
                    return picked
    raise AssertionError(f"the specialist serves fewer than {count} test utterances confidently")


def _target(targets: Mapping[str, float] | None, task: str) -> dict[str, float]:
    return {"target_agreement": targets[task]} if targets and task in targets else {}


def write_config(
    tmp: Path,
    upstream_url: str,
    registry: Path,
    tasks: dict[str, float],
    *,
    poll_s: float,
    targets: Mapping[str, float] | None = None,
) -> Path:
    """An apprentice.yaml: `tasks` maps task name -> shadow_rate, all over INTENTS with gpt-4o as teacher;
    `targets` gives some tasks a target_agreement other than the default."""
    config = {
        "server": {"host": "127.0.0.1"},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "upstreams": {"teacher": {"api_base": upstream_url + "/v1", "models": [TEACHER], "retry": {"max_retries": 0}}},
        "tasks": {
            name: {"teacher": TEACHER, "labels": INTENTS, "shadow_rate": rate, **_target(targets, name)}
            for name, rate in tasks.items()
        },
        "registry": {"path": str(registry), "poll_interval_s": poll_s},
        "log": {"url": f"sqlite:///{tmp / 'inference.db'}", "spool_dir": str(tmp / "spool"), "flush_interval_s": 0.05},
    }
    path = tmp / "apprentice.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = 10.0, every_s: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=20)


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "Classify the intent."}, {"role": "user", "content": text}]


@dataclass
class TaskStack:
    """The processes of one module and what tests ask them; `versions` maps task -> version at start."""

    upstream: Proc
    gateway: Proc
    registry: Path
    store: LogStore
    confident: list[tuple[str, str]]
    versions: dict[str, str] = field(default_factory=dict)

    def teacher_calls(self) -> int:
        stats: dict[str, int] = httpx.get(self.upstream.url + "/_stats", timeout=10).json()
        return stats.get("chat_completions", 0)

    def sent_to_teacher(self, marker: str) -> list[dict[str, Any]]:
        """Bodies the teacher received from requests sent with user=marker."""
        bodies: list[dict[str, Any]] = httpx.get(self.upstream.url + "/_requests", timeout=10).json()
        return [b for b in bodies if b.get("user") == marker]

    def records(self, task: str, marker: str, count: int = 1) -> list[InferenceRecord]:
        """The inference-log records of requests sent with user=marker, once `count` of them are written."""

        def found() -> list[InferenceRecord]:
            hits = [r for r in self.store.iter_records(task) if r.request.get("user") == marker]
            return hits if len(hits) >= count else []

        return wait_for(found, f"{count} log record(s) of {task} for {marker}")

    def metrics(self) -> dict[Any, float]:
        return scrape_metrics(self.gateway.url)

    def metric(self, name: str, **labels: str) -> float:
        return metric_total(self.metrics(), name, **labels)

    def ask(self, client: httpx.Client, task: str, text: str) -> httpx.Response:
        body = {"model": task, "messages": user(text)}
        return client.post(self.gateway.url + "/v1/chat/completions", json=body)

    def admin_tasks(self) -> dict[str, dict[str, Any]]:
        with admin(self.gateway.url) as api:
            return {t["task"]: t for t in api.get("/admin/tasks").json()["data"]}

    def serving(self, task: str) -> str | None:
        version: str | None = self.admin_tasks()[task]["specialist_version"]
        return version


def openai_client_fixture(api_key: str) -> Any:
    """A module-scoped fixture: an OpenAI client of the module's `stack` gateway with `api_key` and no
    client-side retries. It overrides conftest's session `client` / `admin_client` of the same name."""

    @pytest.fixture(scope="module")
    def fixture(stack: TaskStack) -> Iterator[openai.OpenAI]:
        with openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=20) as c:
            yield c

    return fixture


def intent_stack_fixture(targets: Mapping[str, float] | None = None) -> Any:
    """A module-scoped `stack`: tasks `intent` (a specialist) and `intent_empty` (nothing in the registry), no
    shadow traffic, `targets` as the tasks' target agreement where given."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStack]:
        tasks = {"intent": 0.0, "intent_empty": 0.0}
        with task_stack(
            tmp_path_factory.mktemp("tasks"), tasks, specialists=["intent"], poll_s=0.5, targets=targets
        ) as started:
            yield started

    return fixture


@contextlib.contextmanager
def task_stack(
    tmp: Path,
    tasks: dict[str, float],
    *,
    specialists: Sequence[str],
    poll_s: float,
    targets: Mapping[str, float] | None = None,
) -> Iterator[TaskStack]:
    """A registry with a promoted CLINC version for each of `specialists`, the fake teacher and the gateway."""
    registry = tmp / "registry"
    versions = {task: put_version(registry, task) for task in specialists}
    first = versions[specialists[0]]
    confident = confident_inputs(load_specialist(registry, specialists[0], first), 8)
    started: list[Proc] = []
    store = None
    try:
        upstream = start_fake_upstream(log_dir=tmp)
        started.append(upstream)
        config = write_config(tmp, upstream.url, registry, tasks, poll_s=poll_s, targets=targets)
        gateway = start_gateway(config=config, log_dir=tmp)
        started.append(gateway)
        store = LogStore(f"sqlite:///{tmp / 'inference.db'}")
        yield TaskStack(upstream, gateway, registry, store, confident, versions)
    finally:
        stop_all(reversed(started))
        if store is not None:
            store.close()
