"""The task path end to end, continued (the same two tasks, `task_stack.intent_stack_fixture`): requests the
specialist must leave to the teacher, teachers that misbehave, and what the log keeps for distill.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from task_stack import (
    CLIENT_KEY,
    INTENTS,
    OOD_TEXTS,
    TaskStack,
    intent_stack_fixture,
    openai_client_fixture,
    user,
)

from gateway.settings import TaskConfig

pytestmark = pytest.mark.e2e

stack = intent_stack_fixture()
client = openai_client_fixture(CLIENT_KEY)


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
