"""The task path end to end: a CLINC150 specialist served by `apprentice serve` in front of a fake teacher.
Requests the specialist must leave to the teacher, teachers that misbehave and what the log keeps for distill
are in test_tasks_teacher_e2e.

Two tasks over the same 12 intents (see task_stack.py): `intent` has a specialist, `intent_empty` has nothing in
the registry. Confident in-distribution inputs must be answered in-process with no upstream call, in the shape
the `openai` client parses; everything else reaches the teacher with the reason in the headers, asking it for
the logprobs distill needs and giving the client only what it asked for, and lands in the SQLite log.
"""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest
from procs import metric_total
from task_stack import (
    ADMIN_KEY,
    CLIENT_KEY,
    INTENTS,
    MIXED_TEXT,
    OOD_TEXTS,
    ROUTER,
    TAU,
    TEACHER,
    TaskStack,
    intent_stack_fixture,
    load_specialist,
    openai_client_fixture,
    user,
)

from benchmarks.fake_upstream import request_id_prefix
from gateway.settings import TaskConfig

pytestmark = pytest.mark.e2e
EMPTY_TASK_TARGET = 0.95  # not the default, so the gauge is seen to follow the config


stack = intent_stack_fixture(targets={"intent_empty": EMPTY_TASK_TARGET})


client = openai_client_fixture(CLIENT_KEY)
admin_client = openai_client_fixture(ADMIN_KEY)


# -- the specialist answers ---------------------------------------------------------------------------------


def test_confident_inputs_are_answered_by_the_specialist_without_an_upstream_call(
    stack: TaskStack, client: openai.OpenAI
) -> None:
    before = stack.teacher_calls()
    for text, label in stack.confident:
        raw = client.chat.completions.with_raw_response.create(model="intent", messages=user(text))
        assert raw.headers["x-apprentice-route"] == "specialist", text
        assert raw.headers["x-apprentice-reason"] == "specialist"
        assert raw.headers["x-apprentice-specialist-version"] == stack.versions["intent"]
        assert TAU <= float(raw.headers["x-apprentice-score"]) <= 1.0
        resp = raw.parse()
        assert resp.object == "chat.completion"
        assert resp.model == "intent"
        assert resp.choices[0].message.content == label
        assert resp.choices[0].finish_reason == "stop"
        assert resp.choices[0].logprobs is None
        assert resp.system_fingerprint is not None and stack.versions["intent"] in resp.system_fingerprint
        assert resp.usage is not None and resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert stack.teacher_calls() == before, "a confident in-distribution request reached the teacher"
    # Every answer has an id in OpenAI's shape, as OpenAI's do; the specialist's are the gateway's own.
    ids = [
        client.chat.completions.with_raw_response.create(model="intent", messages=user(text)).headers["x-request-id"]
        for text, _ in stack.confident[:2]
    ]
    assert all(re.fullmatch(r"req_[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 2
    assert not any(i.startswith(request_id_prefix("fake-upstream")) for i in ids)


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ),
        (
            {"top_logprobs": 3},
            "top_logprobs",
            "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
        ),
        (
            {"top_logprobs": 3, "logprobs": False},
            "top_logprobs",
            "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
        ),
        (
            {"tool_choice": "none"},
            "tool_choice",
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
        ),
    ],
)
def test_a_request_openai_refuses_is_refused_as_openai_refuses_it(
    stack: TaskStack, client: openai.OpenAI, extra: dict[str, Any], param: str, message: str
) -> None:
    """A confident input: the specialist would have answered it, where the teacher says 400."""
    text, _ = stack.confident[0]
    before = stack.teacher_calls()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="intent", messages=user(text), **extra)
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    assert stack.teacher_calls() == before


def test_more_than_four_stop_sequences_are_refused_as_openai_refuses_them(
    stack: TaskStack, client: openai.OpenAI
) -> None:
    text, _ = stack.confident[0]
    before = stack.teacher_calls()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="intent", messages=user(text), stop=["\n\n", "END", "###", "--", "~~"])
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with "
        "length 5 instead.",
        "type": "invalid_request_error",
        "param": "stop",
        "code": "array_above_max_length",
    }
    # Four are OpenAI's limit, not beyond it: the specialist answers.
    four = client.chat.completions.with_raw_response.create(
        model="intent", messages=user(text), stop=["\n\n", "END", "###", "--"]
    )
    assert four.headers["x-apprentice-route"] == "specialist"
    assert stack.teacher_calls() == before


def test_specialist_stream_parses_in_the_openai_client(stack: TaskStack, client: openai.OpenAI) -> None:
    text, label = stack.confident[0]
    before = stack.teacher_calls()
    raw = client.chat.completions.with_raw_response.create(model="intent", messages=user(text), stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-apprentice-route"] == "specialist"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == label
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.model == "intent" for c in chunks)
    assert all(c.system_fingerprint and stack.versions["intent"] in c.system_fingerprint for c in chunks)
    assert stack.teacher_calls() == before


def test_specialist_stream_with_include_usage_ends_with_usage(client: openai.OpenAI, stack: TaskStack) -> None:
    text, label = stack.confident[1]
    chunks = list(
        client.chat.completions.create(
            model="intent", messages=user(text), stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == label
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_specialist_logprobs_honour_top_logprobs(stack: TaskStack, client: openai.OpenAI, stream: bool) -> None:
    text, label = stack.confident[2]
    kwargs: dict[str, Any] = {"model": "intent", "messages": user(text), "logprobs": True, "top_logprobs": 3}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        contents = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
        (content,) = contents
    else:
        resp = client.chat.completions.create(**kwargs)
        assert resp.choices[0].logprobs is not None
        content = resp.choices[0].logprobs.content
    assert content is not None
    (entry,) = content
    assert entry.token == label
    assert len(entry.top_logprobs) == 3
    assert entry.top_logprobs[0].token == label
    assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    assert -1.0 < entry.logprob <= 0.0


# -- the teacher answers, with the reason ------------------------------------------------------------------------


def test_routing_inputs_are_what_the_artifact_says(stack: TaskStack) -> None:
    """The constructed inputs route as intended on the artifact itself (guards the e2e tests below)."""
    specialist = load_specialist(stack.registry, "intent", stack.versions["intent"])
    for text in OOD_TEXTS:
        assert specialist.decide(text).reason == "ood", text
    mixed = specialist.decide(MIXED_TEXT)
    assert (mixed.reason, mixed.ood_score < ROUTER.ood_threshold) == ("low_confidence", True)


@pytest.mark.parametrize(
    ("text", "reason"), [(OOD_TEXTS[0], "ood"), (OOD_TEXTS[1], "ood"), (MIXED_TEXT, "low_confidence")]
)
def test_inputs_the_specialist_cannot_vouch_for_reach_the_teacher(
    stack: TaskStack, client: openai.OpenAI, marker: str, text: str, reason: str
) -> None:
    before = stack.teacher_calls()
    raw = client.chat.completions.with_raw_response.create(
        model="intent", messages=user(text), user=marker, metadata={"x-fake-content": "weather"}
    )
    assert raw.headers["x-apprentice-route"] == "teacher"
    assert raw.headers["x-apprentice-reason"] == reason
    assert raw.headers["x-apprentice-specialist-version"] == stack.versions["intent"]
    assert float(raw.headers["x-apprentice-score"]) < TAU
    assert raw.headers["x-request-id"].startswith(request_id_prefix("fake-upstream"))  # the teacher's own id
    resp = raw.parse()
    assert resp.model == "intent"
    assert resp.choices[0].message.content == "weather"
    # the gateway asked for logprobs for distill; the client did not, so it gets none
    assert resp.choices[0].logprobs is None
    assert stack.teacher_calls() == before + 1
    (sent,) = stack.sent_to_teacher(marker)
    assert sent["model"] == TEACHER
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 20)
    assert sent["messages"] == user(text)
    (record,) = stack.records("intent", marker)
    assert (record.route, record.reason) == ("teacher", reason)
    assert record.input_text == text and record.teacher_model == TEACHER
    assert record.teacher_text == "weather" and record.teacher_label == "weather"
    assert record.label_distribution is not None and record.label_distribution["weather"] == pytest.approx(1.0)
    assert record.specialist_version == stack.versions["intent"]
    assert record.score is not None and record.score < TAU
    assert record.status == 200 and record.prompt_tokens and record.completion_tokens == 1
    assert record.cost_usd is not None and record.cost_usd > 0


def test_teacher_stream_has_no_usage_chunk_or_logprobs_the_client_did_not_ask_for(
    stack: TaskStack, client: openai.OpenAI, marker: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="intent", messages=user(OOD_TEXTS[0]), user=marker, stream=True, metadata={"x-fake-content": "timer"}
    )
    assert (raw.headers["x-apprentice-route"], raw.headers["x-apprentice-reason"]) == ("teacher", "ood")
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "timer"
    assert all(c.choices and c.usage is None and c.model == "intent" for c in chunks)
    assert all(c.choices[0].logprobs is None for c in chunks)
    (sent,) = stack.sent_to_teacher(marker)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 20)
    (record,) = stack.records("intent", marker)
    assert (record.reason, record.teacher_label) == ("ood", "timer")
    # the gateway read the usage chunk it dropped
    assert record.prompt_tokens and record.completion_tokens == 1
    assert record.label_distribution is not None and record.label_distribution["timer"] == pytest.approx(1.0)


def test_teacher_stream_with_usage_and_logprobs_when_asked(
    stack: TaskStack, client: openai.OpenAI, marker: str
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="intent",
            messages=user(OOD_TEXTS[1]),
            user=marker,
            stream=True,
            logprobs=True,
            top_logprobs=2,
            stream_options={"include_usage": True},
            metadata={"x-fake-content": "alarm"},
        )
    )
    assert not chunks[-1].choices and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in entries] == ["alarm"]
    assert len(entries[0].top_logprobs) == 2
    (record,) = stack.records("intent", marker)
    # the log keeps all 20 alternatives the teacher sent, whatever the client asked for
    assert record.response is not None
    (logged,) = record.response["choices"][0]["logprobs"]["content"]
    assert len(logged["top_logprobs"]) == 20


def test_teacher_logprobs_are_trimmed_to_top_logprobs(stack: TaskStack, client: openai.OpenAI, marker: str) -> None:
    resp = client.chat.completions.create(
        model="intent", messages=user(MIXED_TEXT), user=marker, logprobs=True, top_logprobs=4,
        metadata={"x-fake-content": "alarm"},
    )  # fmt: skip
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.content is not None
    (entry,) = resp.choices[0].logprobs.content
    assert entry.token == "alarm" and len(entry.top_logprobs) == 4
    (sent,) = stack.sent_to_teacher(marker)
    assert sent["top_logprobs"] == 20


def test_no_specialist_when_the_registry_has_none(stack: TaskStack, client: openai.OpenAI, marker: str) -> None:
    text, label = stack.confident[0]
    raw = client.chat.completions.with_raw_response.create(
        model="intent_empty", messages=user(text), user=marker, metadata={"x-fake-content": label}
    )
    assert (raw.headers["x-apprentice-route"], raw.headers["x-apprentice-reason"]) == ("teacher", "no_specialist")
    assert "x-apprentice-specialist-version" not in raw.headers
    assert "x-apprentice-score" not in raw.headers
    assert raw.parse().choices[0].message.content == label
    (record,) = stack.records("intent_empty", marker)
    assert (record.reason, record.specialist_version, record.score) == ("no_specialist", None, None)


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    "extra",
    [{"tools": [WEATHER_TOOL]}, {"n": 2}, {"response_format": {"type": "json_object"}}],
    ids=["tools", "n2", "json"],
)
def test_requests_the_specialist_cannot_honour_go_to_the_teacher(
    stack: TaskStack, client: openai.OpenAI, marker: str, extra: dict[str, Any]
) -> None:
    text, _ = stack.confident[0]
    raw = client.chat.completions.with_raw_response.create(model="intent", messages=user(text), user=marker, **extra)
    assert raw.headers["x-apprentice-route"] == "teacher"
    assert raw.headers["x-apprentice-reason"] == "unsupported_request"
    resp = raw.parse()
    assert resp.model == "intent"
    assert len(resp.choices) == extra.get("n", 1)
    (sent,) = stack.sent_to_teacher(marker)
    assert all(sent[k] == v for k, v in extra.items()), "the teacher got the request as the client sent it"


def test_response_format_text_is_still_served_by_the_specialist(stack: TaskStack, client: openai.OpenAI) -> None:
    text, label = stack.confident[0]
    raw = client.chat.completions.with_raw_response.create(
        model="intent", messages=user(text), response_format={"type": "text"}
    )
    assert raw.headers["x-apprentice-route"] == "specialist"
    assert raw.parse().choices[0].message.content == label


def test_a_failing_teacher_gives_the_openai_error_and_is_counted(stack: TaskStack, client: openai.OpenAI) -> None:
    labels = {"model": "intent", "route": "teacher", "reason": "ood", "status": "502"}
    before = metric_total(stack.metrics(), "apprentice_requests_total", **labels)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="intent", messages=user(OOD_TEXTS[0]), metadata={"x-fake-fail": "500"})
    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict) and "upstream" in caught.value.body["message"]
    after = metric_total(stack.metrics(), "apprentice_requests_total", **labels)
    assert after == before + 1, "a failed teacher call must show in requests_total"


# -- forced routes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["specialist", "teacher"])
def test_forcing_a_route_needs_the_admin_key(client: openai.OpenAI, stack: TaskStack, route: str) -> None:
    before = stack.teacher_calls()
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(
            model="intent", messages=user(stack.confident[0][0]), extra_headers={"x-apprentice-force-route": route}
        )
    assert caught.value.status_code == 403
    assert "x-apprentice-force-route" in str(caught.value.body)
    assert stack.teacher_calls() == before


def test_admin_forces_the_teacher_for_a_confident_input(
    stack: TaskStack, admin_client: openai.OpenAI, marker: str
) -> None:
    text, label = stack.confident[0]
    raw = admin_client.chat.completions.with_raw_response.create(
        model="intent", messages=user(text), user=marker, metadata={"x-fake-content": label},
        extra_headers={"x-apprentice-force-route": "teacher"},
    )  # fmt: skip
    assert (raw.headers["x-apprentice-route"], raw.headers["x-apprentice-reason"]) == ("teacher", "forced")
    assert raw.parse().choices[0].message.content == label
    assert len(stack.sent_to_teacher(marker)) == 1
    (record,) = stack.records("intent", marker)
    assert record.reason == "forced"


def test_admin_forces_the_specialist_for_an_ood_input(stack: TaskStack, admin_client: openai.OpenAI) -> None:
    before = stack.teacher_calls()
    raw = admin_client.chat.completions.with_raw_response.create(
        model="intent", messages=user(OOD_TEXTS[0]), extra_headers={"x-apprentice-force-route": "specialist"}
    )
    assert (raw.headers["x-apprentice-route"], raw.headers["x-apprentice-reason"]) == ("specialist", "forced")
    assert raw.parse().choices[0].message.content in INTENTS
    assert stack.teacher_calls() == before


def test_an_unknown_forced_route_is_a_400(admin_client: openai.OpenAI, stack: TaskStack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        admin_client.chat.completions.create(
            model="intent", messages=user(stack.confident[0][0]), extra_headers={"x-apprentice-force-route": "both"}
        )
    assert caught.value.status_code == 400


def test_each_task_exports_its_target_agreement_for_the_alert_rules(stack: TaskStack) -> None:
    # deploy/prometheus/rules.yml compares live agreement with this gauge rather than a number in the rules.
    samples = stack.metrics()
    default = TaskConfig.model_fields["target_agreement"].default
    assert metric_total(samples, "apprentice_target_agreement", task="intent") == default
    assert metric_total(samples, "apprentice_target_agreement", task="intent_empty") == EMPTY_TASK_TARGET
