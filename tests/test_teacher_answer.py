"""gateway.teacher_answer: what the gateway asks a task's teacher for, and what it hands the client back.

The teacher is asked for logprobs + 20 top_logprobs (distill's soft labels) and, when streaming, for the usage
chunk (the savings estimate). The client must get exactly what it asked for: logprobs stripped or trimmed, the
usage chunk dropped unless it asked, and the task's name as `model`. Upstream payloads come from the fake
upstream's own renderer (benchmarks._fake_chat), so they have the shape the e2e tests see.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from benchmarks._fake_chat import completion_body as fake_completion
from benchmarks._fake_chat import plan_chat
from benchmarks._fake_chat import stream_events as fake_stream
from gateway.protocol import ChatCompletionRequest
from gateway.softlabels import LabelSet
from gateway.teacher_answer import (
    TEACHER_TOP_LOGPROBS,
    StreamRewriter,
    fit_logprobs_to_client,
    read_completion,
    teacher_body,
)

TASK = "intent"
TEACHER = "gpt-4o"
MESSAGES = [{"role": "system", "content": "Answer with one intent."}, {"role": "user", "content": "my balance?"}]


def client_request(**fields: Any) -> tuple[dict[str, Any], ChatCompletionRequest]:
    raw = {"model": TASK, "messages": MESSAGES, **fields}
    return raw, ChatCompletionRequest.model_validate(raw)


def teacher_reply(body: dict[str, Any], content: str) -> dict[str, Any]:
    """The fake upstream's non-streaming answer to `body` with `content` as the text."""
    plan = plan_chat(body, [], "chatcmpl-test", content)
    reply: dict[str, Any] = json.loads(fake_completion(plan))
    return reply


def teacher_sse_lines(body: dict[str, Any], content: str) -> list[str]:
    """The fake upstream's SSE answer to `body`, split into lines without newlines as Stream.lines() yields."""
    plan = plan_chat(body, [], "chatcmpl-test", content)
    head, tail = fake_stream(plan)
    return b"".join(head + tail).decode().split("\n")[:-1]


def rewrite_all(request: ChatCompletionRequest, lines: list[str]) -> tuple[StreamRewriter, list[dict[str, Any]], str]:
    """Runs every line through a StreamRewriter: (the rewriter, JSON chunks sent, everything sent as text)."""
    rewriter = StreamRewriter(request)
    sent = b"".join(out for line in lines if (out := rewriter.rewrite(line)) is not None).decode()
    chunks = [json.loads(line[6:]) for line in sent.split("\n") if line.startswith("data: {")]
    return rewriter, chunks, sent


# -- teacher_body -----------------------------------------------------------------------------------------


def test_teacher_body_asks_for_logprobs_for_the_teacher_model_without_touching_the_client_body() -> None:
    raw, _ = client_request(temperature=0, metadata={"k": "v"})
    original = copy.deepcopy(raw)
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=False)
    assert body["model"] == TEACHER
    assert body["logprobs"] is True
    assert body["top_logprobs"] == TEACHER_TOP_LOGPROBS == 20
    # everything else is the client's, forwarded as sent
    assert body["messages"] == MESSAGES and body["temperature"] == 0 and body["metadata"] == {"k": "v"}
    assert raw == original


def test_teacher_body_raises_a_clients_smaller_top_logprobs_to_twenty() -> None:
    raw, _ = client_request(logprobs=True, top_logprobs=3)
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=False)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 20)


def test_teacher_body_without_logprobs_support_leaves_the_clients_choice_alone() -> None:
    raw, _ = client_request()
    body = teacher_body(raw, TEACHER, want_logprobs=False, stream=False)
    assert "logprobs" not in body and "top_logprobs" not in body
    raw, _ = client_request(logprobs=True, top_logprobs=2)
    body = teacher_body(raw, TEACHER, want_logprobs=False, stream=False)
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)


def test_teacher_body_streaming_always_asks_for_the_usage_chunk_and_keeps_other_stream_options() -> None:
    raw, _ = client_request(stream=True)
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    raw, _ = client_request(stream=True, stream_options={"include_usage": False, "future_option": 1})
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=True)
    assert body["stream_options"] == {"include_usage": True, "future_option": 1}
    assert raw["stream_options"] == {"include_usage": False, "future_option": 1}


def test_teacher_body_not_streaming_drops_stream_options() -> None:
    # OpenAI rejects stream_options without stream=true.
    raw, _ = client_request(stream_options={"include_usage": True})
    assert "stream_options" not in teacher_body(raw, TEACHER, want_logprobs=True, stream=False)


def test_teacher_body_not_streaming_for_a_streaming_client_asks_for_json() -> None:
    # The shadow call of a streamed specialist answer reads one chat.completion.
    raw, _ = client_request(stream=True, stream_options={"include_usage": True})
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=False)
    assert "stream" not in body and "stream_options" not in body
    assert raw["stream"] is True


# -- fit_logprobs_to_client and read_completion ------------------------------------------------------------


def test_logprobs_the_client_did_not_ask_for_are_removed() -> None:
    raw, request = client_request()
    reply = teacher_reply(teacher_body(raw, TEACHER, want_logprobs=True, stream=False), "balance")
    choice = reply["choices"][0]
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 20
    fit_logprobs_to_client(choice, request)
    assert choice["logprobs"] is None
    assert ChatCompletion.model_validate(reply).choices[0].logprobs is None


@pytest.mark.parametrize(("asked", "kept"), [(3, 3), (0, 0), (None, 0), (20, 20)])
def test_top_logprobs_are_trimmed_to_what_the_client_asked(asked: int | None, kept: int) -> None:
    fields: dict[str, Any] = {"logprobs": True} | ({"top_logprobs": asked} if asked is not None else {})
    raw, request = client_request(**fields)
    reply = teacher_reply(teacher_body(raw, TEACHER, want_logprobs=True, stream=False), "bill balance")
    choice = reply["choices"][0]
    full = copy.deepcopy(choice["logprobs"]["content"])
    fit_logprobs_to_client(choice, request)
    content = choice["logprobs"]["content"]
    assert [e["token"] for e in content] == ["bill", " balance"]
    for entry, before in zip(content, full, strict=True):
        assert entry["logprob"] == before["logprob"]
        assert entry["top_logprobs"] == before["top_logprobs"][:kept]
    parsed = ChatCompletion.model_validate(reply).choices[0].logprobs
    assert parsed is not None and parsed.content is not None
    assert all(len(e.top_logprobs) == kept for e in parsed.content)


def test_a_choice_without_logprobs_is_left_as_it_is() -> None:
    _, request = client_request(logprobs=True, top_logprobs=2)
    choice = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
    fit_logprobs_to_client(choice, request)
    assert "logprobs" not in choice


def test_read_completion_reads_text_usage_and_the_label_distribution() -> None:
    raw, _ = client_request()
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=False)
    reading = read_completion(teacher_reply(body, "balance"))
    assert reading.text == "balance"
    assert reading.completion_tokens == 1 and reading.prompt_tokens is not None and reading.prompt_tokens > 0
    labels = LabelSet(["balance", "bill_balance", "alarm"])
    assert reading.label(labels) == "balance"
    # the fake's alternatives ("alt1"...) name no label: all label mass is on the answer
    distribution = reading.distribution(labels)
    assert distribution is not None and distribution["balance"] == pytest.approx(1.0)


def test_read_completion_of_a_reply_without_logprobs_has_no_distribution() -> None:
    reading = read_completion({"choices": [{"message": {"content": "I cannot help."}}]})
    assert reading.text == "I cannot help." and reading.logprobs == []
    assert reading.label(LabelSet(["a", "b"])) is None
    assert reading.distribution(LabelSet(["a", "b"])) is None
    assert (reading.prompt_tokens, reading.completion_tokens) == (None, None)


# -- StreamRewriter -----------------------------------------------------------------------------------------


def test_stream_drops_the_usage_chunk_the_gateway_asked_for_on_its_own() -> None:
    raw, request = client_request(stream=True)
    body = teacher_body(raw, TEACHER, want_logprobs=True, stream=True)
    lines = teacher_sse_lines(body, "bill balance")
    assert sum('"usage": {' in line for line in lines) == 1  # the upstream did send one
    rewriter, chunks, sent = rewrite_all(request, lines)
    assert all(chunk["choices"] for chunk in chunks), "no choice-less usage chunk reaches the client"
    assert all("usage" not in chunk for chunk in chunks)
    assert sent.rstrip("\n").endswith("data: [DONE]")
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == "bill balance"
    assert all(c.model == TASK for c in parsed)
    assert all(c.choices[0].logprobs is None for c in parsed)
    # ... but the gateway read it: the savings estimate and the log need the teacher's usage
    assert rewriter.reading.completion_tokens == 2 and rewriter.reading.prompt_tokens
    assert rewriter.reading.text == "bill balance"
    assert [e["token"] for e in rewriter.reading.logprobs] == ["bill", " balance"]
    assert all(len(e["top_logprobs"]) == 20 for e in rewriter.reading.logprobs)


def test_stream_keeps_the_usage_chunk_when_the_client_asked_for_it() -> None:
    raw, request = client_request(stream=True, stream_options={"include_usage": True})
    lines = teacher_sse_lines(teacher_body(raw, TEACHER, want_logprobs=True, stream=True), "balance")
    _, chunks, _ = rewrite_all(request, lines)
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert not parsed[-1].choices and parsed[-1].usage is not None
    assert parsed[-1].usage.completion_tokens == 1
    assert all(c.usage is None for c in parsed[:-1])


def test_stream_trims_logprobs_to_what_the_client_asked() -> None:
    raw, request = client_request(stream=True, logprobs=True, top_logprobs=2)
    rewriter, chunks, _ = rewrite_all(
        request, teacher_sse_lines(teacher_body(raw, TEACHER, want_logprobs=True, stream=True), "bill balance")
    )
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == 2
    for chunk in content_chunks:
        (entry,) = chunk["choices"][0]["logprobs"]["content"]
        assert len(entry["top_logprobs"]) == 2
        ChatCompletionChunk.model_validate(chunk)
    assert all(len(e["top_logprobs"]) == 20 for e in rewriter.reading.logprobs)


def test_stream_passes_non_json_lines_through() -> None:
    _, request = client_request(stream=True)
    rewriter = StreamRewriter(request)
    assert rewriter.rewrite("") == b"\n"
    assert rewriter.rewrite(": keep-alive") == b": keep-alive\n"
    assert rewriter.rewrite("data: [DONE]") == b"data: [DONE]\n"
    assert rewriter.rewrite("data: {not json") == b"data: {not json\n"


def test_streamed_multi_token_label_gives_the_soft_label() -> None:
    """A label of several tokens streamed in several chunks: the reading rebuilds its distribution."""
    _, request = client_request(stream=True)

    def entry(token: str, alternatives: dict[str, float]) -> dict[str, Any]:
        tops = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in alternatives.items()]
        return {"token": token, "logprob": math.log(alternatives[token]), "bytes": [], "top_logprobs": tops}

    def chunk(token: str, alternatives: dict[str, float]) -> str:
        choice = {"index": 0, "delta": {"content": token}, "finish_reason": None,
                  "logprobs": {"content": [entry(token, alternatives)], "refusal": None}}  # fmt: skip
        return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                      "model": TEACHER, "choices": [choice]})  # fmt: skip

    rewriter = StreamRewriter(request)
    for line in (chunk("bill", {"bill": 0.6, "balance": 0.4}), "", chunk("_balance", {"_balance": 1.0}), ""):
        rewriter.rewrite(line)
    labels = LabelSet(["balance", "bill_balance", "alarm"])
    assert rewriter.reading.label(labels) == "bill_balance"
    distribution = rewriter.reading.distribution(labels)
    assert distribution is not None
    assert distribution["bill_balance"] == pytest.approx(0.6)
    assert distribution["balance"] == pytest.approx(0.4)
    # the log's compact response of the stream parses as a chat.completion
    logged = rewriter.reading.as_response(TEACHER)
    assert logged["choices"][0]["message"]["content"] == "bill_balance"
    assert len(logged["choices"][0]["logprobs"]["content"]) == 2
