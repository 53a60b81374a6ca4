"""Shadow traffic, the admin API and the metrics of the task path, on a running `apprentice serve`.

Three tasks over the same 12 CLINC150 intents (see task_stack.py): `intent` (a specialist, no shadow traffic),
`intent_shadow` (the same specialist, every answer shadowed to the teacher) and `intent_empty` (no specialist).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from procs import metric_total
from task_stack import (
    ADMIN_KEY,
    CLIENT_KEY,
    INTENTS,
    MIXED_TEXT,
    OOD_TEXTS,
    TAU,
    TEACHER,
    TaskStack,
    admin,
    openai_client_fixture,
    task_stack,
    user,
    wait_for,
)

from gateway.inference_log import InferenceRecord

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStack]:
    tasks = {"intent": 0.0, "intent_shadow": 1.0, "intent_empty": 0.0}
    specialists = ["intent", "intent_shadow"]
    with task_stack(tmp_path_factory.mktemp("shadow"), tasks, specialists=specialists, poll_s=0.5) as started:
        yield started


client = openai_client_fixture(CLIENT_KEY)
admin_client = openai_client_fixture(ADMIN_KEY)


# -- shadow traffic, admin API, metrics ---------------------------------------------------------------------------


def _shadow_of(stack: TaskStack, marker: str, client: openai.OpenAI, text: str, teacher_says: str) -> InferenceRecord:
    raw = client.chat.completions.with_raw_response.create(
        model="intent_shadow", messages=user(text), user=marker, metadata={"x-fake-content": teacher_says}
    )
    assert raw.headers["x-apprentice-route"] == "specialist"
    assert raw.headers["x-apprentice-specialist-version"] == stack.versions["intent_shadow"]
    (record,) = stack.records("intent_shadow", marker)
    return record


def test_shadow_traffic_reaches_the_teacher_and_feeds_live_agreement(stack: TaskStack, client: openai.OpenAI) -> None:
    (text_a, label_a), (text_b, label_b) = stack.confident[:2]
    agree = f"shadow-{uuid.uuid4().hex}"
    record = _shadow_of(stack, agree, client, text_a, teacher_says=label_a)
    assert (record.route, record.reason) == ("shadow", "shadow")
    assert (record.specialist_label, record.teacher_label) == (label_a, label_a)
    assert record.specialist_version == stack.versions["intent_shadow"]
    assert record.label_distribution is not None
    (sent,) = stack.sent_to_teacher(agree)
    assert (sent["model"], sent["logprobs"], sent["top_logprobs"]) == (TEACHER, True, 20)

    with admin(stack.gateway.url) as api:

        def shadow_state(window: int) -> dict[str, Any] | None:
            state: dict[str, Any] = {t["task"]: t for t in api.get("/admin/tasks").json()["data"]}["intent_shadow"]
            return state if state["live_agreement_window"] >= window else None

        assert wait_for(lambda: shadow_state(1), "one shadow answer")["live_agreement"] == 1.0
        disagree = f"shadow-{uuid.uuid4().hex}"
        other = next(label for label in INTENTS if label != label_b)
        record = _shadow_of(stack, disagree, client, text_b, teacher_says=other)
        assert (record.specialist_label, record.teacher_label) == (label_b, other)
        assert wait_for(lambda: shadow_state(2), "two shadow answers")["live_agreement"] == 0.5
    samples = stack.metrics()
    assert metric_total(samples, "apprentice_shadow_agreement", task="intent_shadow") == 0.5
    assert metric_total(samples, "apprentice_shadow_requests_total", task="intent_shadow", outcome="agree") >= 1
    assert metric_total(samples, "apprentice_shadow_requests_total", task="intent_shadow", outcome="disagree") >= 1


def test_a_streamed_specialist_answer_is_shadowed_too(stack: TaskStack, client: openai.OpenAI, marker: str) -> None:
    text, label = stack.confident[3]
    chunks = list(
        client.chat.completions.create(
            model="intent_shadow", messages=user(text), user=marker, stream=True, metadata={"x-fake-content": label}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == label
    (record,) = stack.records("intent_shadow", marker)
    assert (record.route, record.teacher_label, record.specialist_label) == ("shadow", label, label)
    (sent,) = stack.sent_to_teacher(marker)
    assert not sent.get("stream"), "the shadow call reads one JSON answer, so it must not ask for a stream"


def test_a_failing_shadow_call_never_reaches_the_client(stack: TaskStack, client: openai.OpenAI) -> None:
    text, label = stack.confident[2]

    def errors() -> float:
        return metric_total(stack.metrics(), "apprentice_shadow_requests_total", task="intent_shadow", outcome="error")

    before = errors()
    raw = client.chat.completions.with_raw_response.create(
        model="intent_shadow", messages=user(text), metadata={"x-fake-fail": "500"}
    )
    assert raw.status_code == 200 and raw.headers["x-apprentice-route"] == "specialist"
    assert raw.parse().choices[0].message.content == label
    wait_for(lambda: errors() > before, "the failed shadow call to be counted")


def test_without_shadow_rate_no_specialist_answer_is_shadowed(stack: TaskStack, client: openai.OpenAI) -> None:
    before = stack.teacher_calls()
    for text, _ in stack.confident[:3]:
        client.chat.completions.create(model="intent", messages=user(text))
    time.sleep(0.3)  # a shadow call would be in flight by now
    assert stack.teacher_calls() == before


def test_admin_tasks_lists_versions_tau_and_offload(stack: TaskStack, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="intent", messages=user(stack.confident[0][0]))
    client.chat.completions.create(model="intent", messages=user(OOD_TEXTS[0]))
    with admin(stack.gateway.url) as api:
        resp = api.get("/admin/tasks")
    assert resp.status_code == 200
    tasks = {t["task"]: t for t in resp.json()["data"]}
    assert set(tasks) == {"intent", "intent_shadow", "intent_empty"}
    intent = tasks["intent"]
    assert intent["specialist_version"] == stack.versions["intent"] and intent["tau"] == TAU
    assert intent["teacher"] == TEACHER and intent["labels"] == len(INTENTS)
    assert intent["shadow_rate"] == 0.0 and tasks["intent_shadow"]["shadow_rate"] == 1.0
    assert intent["requests_since_start"] >= 2 and 0.0 < intent["offload_rate_since_start"] < 1.0
    assert tasks["intent_empty"]["specialist_version"] is None and tasks["intent_empty"]["tau"] is None


def test_admin_api_refuses_client_keys_and_anonymous_callers(stack: TaskStack) -> None:
    url = stack.gateway.url
    assert httpx.get(url + "/admin/tasks", timeout=10).status_code == 401
    client_auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    assert httpx.get(url + "/admin/tasks", headers=client_auth, timeout=10).status_code == 401
    assert httpx.post(url + "/admin/tasks/intent/reload", headers=client_auth, timeout=10).status_code == 401
    with admin(url) as api:
        missing = api.post("/admin/tasks/no_such_task/reload")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "task"


def test_metrics_count_routes_reasons_scores_and_savings(
    stack: TaskStack, client: openai.OpenAI, admin_client: openai.OpenAI
) -> None:
    text, _ = stack.confident[3]
    before = stack.metrics()
    marker = f"metrics-{uuid.uuid4().hex}"
    client.chat.completions.create(model="intent", messages=user(text))
    for message in (OOD_TEXTS[0], MIXED_TEXT):
        client.chat.completions.create(model="intent", messages=user(message), user=marker)
    client.chat.completions.create(model="intent", messages=user(text), user=marker, n=2)
    admin_client.chat.completions.create(
        model="intent", messages=user(text), user=marker, extra_headers={"x-apprentice-force-route": "teacher"}
    )
    client.chat.completions.create(model="intent_empty", messages=user(text))
    stack.records("intent", marker, count=4)  # the teacher's usage has been accounted for by then
    after = stack.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    requests = "apprentice_requests_total"
    assert delta(requests, model="intent", route="specialist", reason="specialist", status="200") == 1
    for reason in ("ood", "low_confidence", "unsupported_request", "forced"):
        assert delta(requests, model="intent", route="teacher", reason=reason, status="200") == 1, reason
    assert delta(requests, model="intent_empty", route="teacher", reason="no_specialist", status="200") == 1
    # the router ran for the requests it could score: specialist, ood, low_confidence
    assert delta("apprentice_router_score_count", task="intent") == 3
    assert delta("apprentice_router_score_bucket", task="intent", le="1.0") == 3
    assert delta("apprentice_specialist_inference_seconds_count", task="intent") == 3
    assert metric_total(after, "apprentice_specialist_info", task="intent", version=stack.versions["intent"]) == 1
    # gpt-4o is in litellm's price map: the specialist's answer saved what the teacher would have cost
    assert delta("apprentice_savings_usd_total", task="intent") > 0
    assert delta("apprentice_cost_usd_total", model="intent", route="teacher") > 0
    assert metric_total(after, "apprentice_registry_loads_total", task="intent", result="loaded") == 1
    assert metric_total(after, "apprentice_log_records_total", outcome="dropped") == 0


def test_every_refusal_series_exists_at_zero_so_the_first_refusal_is_an_increase(stack: TaskStack) -> None:
    """A refused version is not retried: a counter that first appeared at 1 would never increase, and the
    dashboard's refusals panel (an increase()) would never show it. The refusal state starts at 0 too."""
    samples = stack.metrics()
    for task in ("intent", "intent_shadow", "intent_empty"):
        for result in ("labels_mismatch", "sha_mismatch", "corrupt", "bad_manifest", "missing_file", "bad_pointer"):
            key = ("apprentice_registry_loads_total", frozenset({("task", task), ("result", result)}))
            assert samples.get(key) == 0.0, (task, result)
        assert samples.get(("apprentice_registry_current_refused", frozenset({("task", task)}))) == 0.0, task


def test_shadow_answers_calibrate_the_usage_the_specialist_reports(stack: TaskStack, client: openai.OpenAI) -> None:
    """Shadow answers are the teacher's answers to the traffic the specialist serves: the completion tokens it
    reports (and the savings it is credited with) follow them."""
    text, label = stack.confident[0]

    def reported() -> int:
        resp = client.chat.completions.create(
            model="intent_shadow", messages=user(text), metadata={"x-fake-content": label}
        )
        assert resp.usage is not None
        return resp.usage.completion_tokens

    before = reported()
    marker = f"long-{uuid.uuid4().hex}"
    long_answer = " ".join(["this request is outside what I can classify"] * 5)
    for _ in range(3):
        client.chat.completions.create(
            model="intent_shadow", messages=user(text), user=marker, metadata={"x-fake-content": long_answer}
        )
    stack.records("intent_shadow", marker, count=3)
    assert reported() > before


def test_a_new_version_starts_its_agreement_window_empty(stack: TaskStack, client: openai.OpenAI) -> None:
    """After a promotion (or a rollback) the live agreement and the pooled window gauges describe the serving
    version only: the alert must not keep firing on the replaced version's disagreements."""
    from task_stack import put_version

    from router_models.registry import promote

    text, label = stack.confident[0]
    other = next(lab for lab in INTENTS if lab != label)
    marker = f"window-{uuid.uuid4().hex}"
    _shadow_of(stack, marker, client, text, teacher_says=other)
    samples = stack.metrics()
    answers = metric_total(samples, "apprentice_shadow_window_answers", task="intent_shadow")
    agreeing = metric_total(samples, "apprentice_shadow_window_agreeing", task="intent_shadow")
    assert answers >= 1 and agreeing < answers
    assert metric_total(samples, "apprentice_shadow_agreement", task="intent_shadow") == pytest.approx(
        agreeing / answers
    )
    original = stack.versions["intent_shadow"]
    try:
        newer = put_version(stack.registry, "intent_shadow")
        wait_for(lambda: stack.serving("intent_shadow") == newer or None, "the new version serving")
        samples = stack.metrics()
        assert metric_total(samples, "apprentice_shadow_window_answers", task="intent_shadow") == 0
        assert metric_total(samples, "apprentice_shadow_window_agreeing", task="intent_shadow") == 0
        gauge = metric_total(samples, "apprentice_shadow_agreement", task="intent_shadow")
        assert gauge != gauge, "NaN until the new version's first shadow answer"
        state = stack.admin_tasks()["intent_shadow"]
        assert (state["live_agreement"], state["live_agreement_window"]) == (None, 0)
    finally:
        promote(stack.registry, "intent_shadow", original)
        wait_for(lambda: stack.serving("intent_shadow") == original or None, "the original version back")
