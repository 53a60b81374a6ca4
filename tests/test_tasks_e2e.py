"""The task path end to end: a CLINC150 specialist served by `apprentice serve` in front of a fake teacher.

Two tasks over the same 12 intents (see task_stack.py): `intent` has a specialist, `intent_empty` has nothing in
the registry. Confident in-distribution inputs must be answered in-process with no upstream call, in the shape
the `openai` client parses; everything else reaches the teacher with the reason in the headers, asking it for
the logprobs distill needs and giving the client only what it asked for, and lands in the SQLite log.
"""

from __future__ import annotations

import json
import re
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
    ROUTER,
    TAU,
    TEACHER,
    TaskStack,
    load_specialist,
    openai_client_fixture,
    task_stack,
    user,
)

from benchmarks.fake_upstream import request_id_prefix
from gateway.settings import TaskConfig

pytestmark = pytest.mark.e2e
EMPTY_TASK_TARGET = 0.95  # not the default, so the gauge is seen to follow the config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TaskStack]:
    tasks = {"intent": 0.0, "intent_empty": 0.0}
    targets = {"intent_empty": EMPTY_TASK_TARGET}
    with task_stack(
        tmp_path_factory.mktemp("tasks"), tasks, specialists=["intent"], poll_s=0.5, targets=targets
    ) as started:
        yield started


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


# -- requests the specialist must leave to the teacher, and teachers that misbehave ------------------------------


IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    "shape",
    ["image", "audio_out", "max_tokens", "max_completion_tokens", "stop", "too_long"],
)
def test_a_confident_input_in_a_request_the_specialist_cannot_honour_goes_to_the_teacher(
    stack: TaskStack, marker: str, shape: str
) -> None:
    """An image it cannot see, audio it cannot speak, a token cap its label would break, a stop sequence inside
    its label (OpenAI's text never holds one), an input beyond max_input_chars: each goes to the teacher, where
    the same text alone is served by the specialist."""
    text, label = next((t, lab) for t, lab in stack.confident if len(lab) > 4)  # over one token by chars/4
    messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
    extra: dict[str, Any] = {}
    if shape == "image":
        messages = [{"role": "user", "content": [{"type": "text", "text": text}, IMAGE_PART]}]
    elif shape == "audio_out":
        extra = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    elif shape in ("max_tokens", "max_completion_tokens"):
        extra = {shape: 1}
    elif shape == "stop":
        extra = {"stop": ["\n\n", label[1:3]]}
    else:
        limit: int = TaskConfig.model_fields["max_input_chars"].default
        messages = [{"role": "user", "content": (text + " ") * (limit // len(text) + 1)}]
    body = {"model": "intent", "messages": messages, "user": marker, "metadata": {"x-fake-content": label}, **extra}
    with httpx.Client(base_url=stack.gateway.url, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as http:
        served = http.post("/v1/chat/completions", json={"model": "intent", "messages": user(text)})
        assert served.headers["x-apprentice-route"] == "specialist", "the text alone must be the specialist's"
        if shape.startswith("max"):
            fits = -(-len(label) // 4)  # the label's tokens at four characters each
            exact = http.post("/v1/chat/completions", json={"model": "intent", "messages": user(text), shape: fits})
            assert exact.headers["x-apprentice-route"] == "specialist", "a cap the label fits in changes nothing"
            assert exact.json()["usage"]["completion_tokens"] <= fits
        if shape == "stop":
            other = http.post("/v1/chat/completions", json={"model": "intent", "messages": user(text), "stop": "zqx"})
            assert other.headers["x-apprentice-route"] == "specialist", "a stop sequence not in the label is moot"
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    route = (resp.headers["x-apprentice-route"], resp.headers["x-apprentice-reason"])
    assert route == ("teacher", "unsupported_request")
    assert resp.json()["choices"][0]["message"]["content"] == label
    (sent,) = stack.sent_to_teacher(marker)
    assert sent["messages"] == messages and all(sent[k] == v for k, v in extra.items())


@pytest.mark.parametrize("task", ["intent", "intent_empty"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_lone_surrogate_in_the_input_is_answered_and_logged(
    stack: TaskStack, marker: str, task: str, stream: bool
) -> None:
    """JavaScript clients cut strings mid-emoji; the JSON escape of half a surrogate pair is valid JSON. The
    router and the log read it as U+FFFD; the teacher gets the client's text as it was sent."""
    text, label = stack.confident[0]
    body = {"model": task, "user": marker, "stream": stream, "metadata": {"x-fake-content": label}}
    body["messages"] = [{"role": "user", "content": f"{text} HALF"}]
    raw = json.dumps(body).replace("HALF", "\\ud83d")
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
    resp = httpx.post(stack.gateway.url + "/v1/chat/completions", content=raw.encode(), headers=headers, timeout=20)
    assert resp.status_code == 200, resp.text
    if stream:
        assert resp.text.rstrip().endswith("data: [DONE]") and '"error"' not in resp.text
    if resp.headers["x-apprentice-route"] == "teacher":
        (record,) = stack.records(task, marker)
        assert record.input_text == f"{text} \ufffd" and record.teacher_label == label and record.status == 200
        (sent,) = stack.sent_to_teacher(marker)
        assert sent["messages"][0]["content"] == f"{text} \ud83d"
    else:
        assert task == "intent" and resp.headers["x-apprentice-reason"] == "specialist"


@pytest.mark.parametrize(
    "answer", ["<html>Bad gateway</html>", "[]", '{"choices": "none"}', "{}", '{"error": {"message": "overloaded"}}']
)
def test_a_teacher_answer_that_is_not_a_chat_completion_is_a_502(
    stack: TaskStack, client: openai.OpenAI, answer: str
) -> None:
    labels = {"model": "intent", "route": "teacher", "reason": "ood", "status": "502"}
    before = stack.metric("apprentice_requests_total", **labels)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="intent", messages=user(OOD_TEXTS[0]), metadata={"x-fake-body": answer})
    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_bad_response"
    assert stack.metric("apprentice_requests_total", **labels) == before + 1


def test_a_teacher_stream_without_the_space_after_data_is_read_and_rewritten(
    stack: TaskStack, client: openai.OpenAI, marker: str
) -> None:
    """`data:{...}` is the same SSE event as `data: {...}`: the gateway still strips what the client did not ask
    for, rewrites the model and logs the answer; the stream ends cleanly on `data:[DONE]`."""
    chunks = list(
        client.chat.completions.create(
            model="intent", messages=user(OOD_TEXTS[0]), user=marker, stream=True,
            metadata={"x-fake-content": "timer", "x-fake-sse-nospace": "1"},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "timer"
    assert all(c.choices and c.usage is None and c.model == "intent" for c in chunks)
    assert all(c.choices[0].logprobs is None for c in chunks)
    (record,) = stack.records("intent", marker)
    assert (record.status, record.teacher_text, record.teacher_label) == (200, "timer", "timer")
    assert record.completion_tokens == 1


def test_the_token_cap_is_read_against_the_labels_own_length() -> None:
    """Four characters a token: `balance` fits in 2, not in 1. The task's mean answer length (raised by the
    teacher's long declines) does not decide."""
    from gateway.protocol import ChatCompletionRequest
    from gateway.tasks import over_token_cap, token_cap

    def request(**caps: int) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "intent", "messages": user("x"), **caps})

    assert token_cap(request()) is None and not over_token_cap(request(), "balance")
    assert token_cap(request(max_tokens=9, max_completion_tokens=4)) == 4
    assert not over_token_cap(request(max_tokens=2), "balance")
    assert over_token_cap(request(max_completion_tokens=1), "balance")


# -- what the log keeps for distill ----------------------------------------------------------------------------


def _distill_view(stack: TaskStack, task: str, marker: str, count: int) -> list[tuple[str, str | None]]:
    """(input, label) of the examples distill would build from the log records sent with user=marker."""
    from router_models.distill_data import to_examples

    examples, _ = to_examples(stack.records(task, marker, count), task, INTENTS)
    return [(e.text, e.label) for e in examples]


def test_an_answer_cut_short_is_logged_as_such_and_never_replaces_a_label(
    stack: TaskStack, client: openai.OpenAI, marker: str
) -> None:
    """A client's max_tokens cuts the teacher's answer: the log says "length", and distill keeps the input's
    earlier, whole answer instead of reading the fragment as a decline."""
    text = "what is my balance, " + marker
    whole = client.chat.completions.create(
        model="intent_empty", messages=user(text), user=marker, metadata={"x-fake-content": "balance"}
    )
    assert whole.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(
        model="intent_empty", messages=user(text), user=marker, max_tokens=2,
        metadata={"x-fake-content": "The label is balance"},
    )  # fmt: skip
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("The label", "length")
    records = stack.records("intent_empty", marker, 2)
    assert sorted((r.teacher_text, r.finish_reason) for r in records) == [("The label", "length"), ("balance", "stop")]
    assert _distill_view(stack, "intent_empty", marker, 2) == [(text, "balance")]


@pytest.mark.parametrize(
    "extra", [{"response_format": {"type": "json_object"}}, {"stop": ["lan"]}], ids=["json", "stop"]
)
def test_a_request_no_specialist_could_honour_is_marked_even_without_a_specialist(
    stack: TaskStack, client: openai.OpenAI, marker: str, extra: dict[str, Any]
) -> None:
    """Before any specialist exists, a JSON-format request still answers more than the input text, and a stop
    sequence inside a label ("lan" in "balance") would end the teacher's answer mid-label with finish_reason
    "stop": each is logged as unsupported_request, and distill passes over it."""
    text = "how much money do I have, " + marker
    raw = client.chat.completions.with_raw_response.create(
        model="intent_empty", messages=user(text), user=marker, metadata={"x-fake-content": "balance"}, **extra
    )
    assert (raw.headers["x-apprentice-route"], raw.headers["x-apprentice-reason"]) == ("teacher", "unsupported_request")
    (record,) = stack.records("intent_empty", marker)
    assert (record.reason, record.status) == ("unsupported_request", 200)
    assert _distill_view(stack, "intent_empty", marker, 1) == []


def test_a_stream_its_client_leaves_is_logged_as_499_and_not_learned_from(stack: TaskStack, marker: str) -> None:
    body = {
        "model": "intent_empty", "messages": user("set a timer, " + marker), "user": marker, "stream": True,
        "metadata": {"x-fake-content": "the answer is timer", "x-fake-chunk-delay-ms": "300"},
    }  # fmt: skip
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    before = stack.metric("apprentice_requests_total", model="intent_empty", route="teacher", status="499")
    with httpx.stream("POST", stack.gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first.startswith("data: ")
    # Closed after the first event, while the teacher still streams.
    (record,) = stack.records("intent_empty", marker)
    assert record.status == 499 and record.finish_reason is None
    assert record.teacher_text != "the answer is timer"
    assert _distill_view(stack, "intent_empty", marker, 1) == []
    assert stack.metric("apprentice_requests_total", model="intent_empty", route="teacher", status="499") == before + 1
