"""Hot reload of specialists in a running `apprentice serve`: swaps under load, the admin reload, refusals.

One gateway serves two tasks over the CLINC150 intents of task_stack.py: `intent` (versions swapped while
threads keep sending requests, then reloaded through the admin API) and `guarded` (broken artifacts promoted
while it serves: each must be refused, counted, logged, and the old version must keep answering).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from procs import metric_total, scrape_metrics
from task_stack import (
    CLIENT_KEY,
    INTENTS,
    TaskStack,
    admin,
    clinc_model,
    put_version,
    task_stack,
    wait_for,
)

from gateway.manifest import Manifest
from router_models.registry import promote

pytestmark = pytest.mark.e2e

POLL_S = 0.5
# Scheduling slack on two shared cores: the poller sleeps POLL_S, then loads a session in a thread.
SLACK_S = 1.5
LOAD_S = 4.0
LOAD_THREADS = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStack]:
    tasks = {"intent": 0.0, "guarded": 0.0}
    # The teacher is never asked here: every request is one the specialist is sure of.
    with task_stack(tmp_path_factory.mktemp("reload"), tasks, specialists=list(tasks), poll_s=POLL_S) as started:
        yield started


def loads(stack: TaskStack, task: str, result: str) -> float:
    return stack.metric("apprentice_registry_loads_total", task=task, result=result)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=20) as client:
        yield client


@dataclass(frozen=True)
class Sample:
    start: float
    end: float
    status: int
    version: str | None
    route: str | None
    content: str | None
    expected: str


def load_loop(stack: TaskStack, task: str, until: float, out: list[Sample], errors: list[BaseException]) -> None:
    """One client thread: confident requests back to back until `until` (time.monotonic)."""
    i = 0
    with httpx.Client(headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=20) as client:
        while time.monotonic() < until:
            text, label = stack.confident[i % len(stack.confident)]
            i += 1
            start = time.monotonic()
            try:
                resp = stack.ask(client, task, text)
                content = resp.json()["choices"][0]["message"]["content"] if resp.status_code == 200 else None
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever it is
                errors.append(exc)
                continue
            headers = resp.headers
            version, route = headers.get("x-apprentice-specialist-version"), headers.get("x-apprentice-route")
            out.append(Sample(start, time.monotonic(), resp.status_code, version, route, content, label))


def test_a_version_swapped_under_load_fails_no_request(stack: TaskStack) -> None:
    old = stack.serving("intent")
    assert old is not None
    assert stack.metric("apprentice_specialist_info", task="intent", version=old) == 1
    new = put_version(stack.registry, "intent", promote=False)
    samples: list[Sample] = []
    errors: list[BaseException] = []
    until = time.monotonic() + LOAD_S
    threads = [
        threading.Thread(target=load_loop, args=(stack, "intent", until, samples, errors)) for _ in range(LOAD_THREADS)
    ]
    for thread in threads:
        thread.start()
    time.sleep(LOAD_S / 4)
    promote(stack.registry, "intent", new)
    promoted_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=LOAD_S + 30)
    assert not errors, f"{len(errors)} requests failed, first: {errors[0]!r}"
    assert len(samples) >= 20, "the load loop hardly ran"
    bad = [s for s in samples if s.status != 200 or s.route != "specialist" or s.content != s.expected]
    assert not bad, f"{len(bad)} of {len(samples)} requests were not answered by the specialist: {bad[:3]}"
    versions = {s.version for s in samples}
    assert versions <= {old, new}, versions
    assert any(s.version == old for s in samples), "the swap came before any request"
    swapped = [s for s in samples if s.version == new]
    assert swapped, "the new version never answered"
    first_new = min(s.end for s in swapped)
    assert first_new - promoted_at <= POLL_S + SLACK_S, f"new version answered {first_new - promoted_at:.2f}s after"
    # once one request saw the new version, every request sent later must see it: no flapping back
    late_old = [s for s in samples if s.start > first_new and s.version != new]
    assert not late_old, f"{len(late_old)} requests sent after the swap answered with {late_old[0].version}"
    assert stack.serving("intent") == new
    samples_after = scrape_metrics(stack.gateway.url)
    assert metric_total(samples_after, "apprentice_specialist_info", task="intent", version=new) == 1
    assert metric_total(samples_after, "apprentice_specialist_info", task="intent", version=old) == 0


def test_admin_reload_loads_a_promoted_version_at_once(stack: TaskStack, http: httpx.Client) -> None:
    version = put_version(stack.registry, "intent", promote=False, tau=0.9)
    promote(stack.registry, "intent", version)
    with admin(stack.gateway.url) as api:
        resp = api.post("/admin/tasks/intent/reload")
    assert resp.status_code == 200
    body = resp.json()
    # the poller may have got there first; either way the reload answers with the version now serving
    assert body["task"] == "intent" and body["version"] == version and body["serving"] == version
    assert body["outcome"] in ("loaded", "unchanged")
    answer = stack.ask(http, "intent", stack.confident[0][0])
    assert answer.headers["x-apprentice-specialist-version"] == version
    with admin(stack.gateway.url) as api:
        again = api.post("/admin/tasks/intent/reload").json()
    assert (again["outcome"], again["serving"]) == ("unchanged", version)


# -- broken artifacts are refused -----------------------------------------------------------------------------


def point_current(registry: Path, task: str, version: str) -> None:
    """Move `current` as the registry writer does (temp file + os.replace), without its checks."""
    directory = registry / task
    tmp = directory / ".current.test.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, directory / "current")


def sha_mismatched_version(stack: TaskStack) -> str:
    """A version whose model.onnx was truncated after its manifest was written (a torn copy)."""
    good = stack.registry / "guarded" / "versions" / stack.versions["guarded"]
    manifest = Manifest.model_validate_json((good / "manifest.json").read_bytes())
    name = put_version(stack.registry, "guarded", promote=False)  # a fresh name; its files are replaced
    directory = stack.registry / "guarded" / "versions" / name
    (directory / "model.onnx").write_bytes(clinc_model()[: len(clinc_model()) // 2])
    manifest = manifest.model_copy(update={"version": name})
    (directory / "manifest.json").write_text(manifest.model_dump_json(), encoding="utf-8")
    point_current(stack.registry, "guarded", name)
    return name


def corrupt_version(stack: TaskStack) -> str:
    """A version whose manifest vouches for a truncated model.onnx: the sha matches, onnxruntime refuses it."""
    return put_version(stack.registry, "guarded", model=clinc_model()[: len(clinc_model()) // 2])


def mismatched_version(stack: TaskStack) -> str:
    """A sound model whose labels are not the task's (one intent renamed)."""
    return put_version(stack.registry, "guarded", labels=[*INTENTS[:-1], "not_a_configured_intent"])


@pytest.mark.parametrize(
    ("make", "reason"),
    [(sha_mismatched_version, "sha_mismatch"), (corrupt_version, "corrupt"), (mismatched_version, "labels_mismatch")],
    ids=["sha_mismatch", "corrupt", "labels_mismatch"],
)
def test_a_broken_artifact_is_refused_and_the_old_version_keeps_serving(
    stack: TaskStack, http: httpx.Client, make: Callable[[TaskStack], str], reason: str
) -> None:
    serving = stack.serving("guarded")
    assert serving is not None
    before = loads(stack, "guarded", reason)
    bad = make(stack)
    wait_for(lambda: loads(stack, "guarded", reason) > before, f"the {reason} refusal", timeout_s=POLL_S + SLACK_S + 5)
    assert loads(stack, "guarded", reason) == before + 1, "a refused version is tried once, not on every poll"
    for text, label in stack.confident[:3]:
        resp = stack.ask(http, "guarded", text)
        assert resp.status_code == 200
        assert resp.headers["x-apprentice-route"] == "specialist"
        assert resp.headers["x-apprentice-specialist-version"] == serving
        assert resp.json()["choices"][0]["message"]["content"] == label
    assert stack.serving("guarded") == serving
    assert f"version={bad} refused reason={reason}" in stack.gateway.output()
    assert stack.metric("apprentice_registry_current_refused", task="guarded") == 1
    # an admin reload tries again, and refuses again
    with admin(stack.gateway.url) as api:
        result = api.post("/admin/tasks/guarded/reload").json()
    assert (result["outcome"], result["reason"], result["version"]) == ("refused", reason, bad)
    assert result["serving"] == serving
    assert loads(stack, "guarded", reason) == before + 2
    time.sleep(POLL_S * 2)
    assert loads(stack, "guarded", reason) == before + 2


def test_a_good_version_promoted_after_a_refusal_is_loaded(stack: TaskStack, http: httpx.Client) -> None:
    before = loads(stack, "guarded", "labels_mismatch")
    mismatched_version(stack)
    wait_for(lambda: loads(stack, "guarded", "labels_mismatch") > before, "the refusal", timeout_s=POLL_S + SLACK_S + 5)
    good = put_version(stack.registry, "guarded")

    def served() -> bool:
        return stack.ask(http, "guarded", stack.confident[0][0]).headers["x-apprentice-specialist-version"] == good

    wait_for(served, "the good version after a refused one", timeout_s=POLL_S + SLACK_S + 5)
    samples = scrape_metrics(stack.gateway.url)
    assert metric_total(samples, "apprentice_registry_current_refused", task="guarded") == 0
    assert metric_total(samples, "apprentice_specialist_info", task="guarded", version=good) == 1
