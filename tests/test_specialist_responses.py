"""gateway.responses: the specialist's answer has exactly the shape a teacher's would have.

Every body and chunk is validated with the `openai` package's own pydantic types, the ones the client parses
responses into, so a field the client needs cannot go missing unnoticed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.protocol import ChatCompletionRequest
from gateway.responses import SpecialistAnswer, TokenEstimator, completion_body, stream_events

TASK = "intent"
VERSION = "20261129T051500Z-a1b2c3"
DISTRIBUTION = [("balance", 0.7), ("bill_balance", 0.2), ("alarm", 0.06), ("apr", 0.03), ("calculator", 0.01)]
MESSAGES = [{"role": "user", "content": "how much money is in my account"}]


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": TASK, "messages": MESSAGES, **fields})


def answer(label: str = "balance") -> SpecialistAnswer:
    return SpecialistAnswer(label, VERSION, TASK, prompt_tokens=12, completion_tokens=2, distribution=DISTRIBUTION)


def events(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[bytes]]:
    raw = list(stream_events(answer(), req))
    assert all(event.startswith(b"data: ") and event.endswith(b"\n\n") for event in raw)
    chunks = [json.loads(event[6:]) for event in raw if event != b"data: [DONE]\n\n"]
    return chunks, raw


# -- chat.completion ------------------------------------------------------------------------------------------


def test_completion_is_a_chat_completion_whose_content_is_the_label() -> None:
    body = completion_body(answer(), request())
    parsed = ChatCompletion.model_validate(body)
    assert parsed.object == "chat.completion"
    assert parsed.model == TASK
    assert parsed.id.startswith("chatcmpl-")
    assert VERSION in (parsed.system_fingerprint or "")
    (choice,) = parsed.choices
    assert (choice.index, choice.finish_reason) == (0, "stop")
    assert choice.message.role == "assistant" and choice.message.content == "balance"
    assert choice.logprobs is None
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (12, 2, 14)


def test_the_specialists_answer_carries_the_fields_clients_read_from_openais() -> None:
    """Code written against OpenAI reads these without checking; it must not fail only on the specialist's answers."""
    parsed = ChatCompletion.model_validate(completion_body(answer(), request()))
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 0
    assert parsed.usage.completion_tokens_details is not None
    assert parsed.usage.completion_tokens_details.reasoning_tokens == 0
    assert parsed.service_tier == "default" and parsed.choices[0].message.annotations == []
    chunks, _ = events(request(stream=True, stream_options={"include_usage": True}))
    last = ChatCompletionChunk.model_validate(chunks[-1])
    assert last.usage is not None and last.usage.prompt_tokens_details is not None
    assert all(c["service_tier"] == "default" for c in chunks)


def test_each_completion_has_its_own_id() -> None:
    assert completion_body(answer(), request())["id"] != completion_body(answer(), request())["id"]


@pytest.mark.parametrize("top", [0, 1, 3, 5])
def test_completion_logprobs_honour_top_logprobs(top: int) -> None:
    parsed = ChatCompletion.model_validate(completion_body(answer(), request(logprobs=True, top_logprobs=top)))
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    (entry,) = logprobs.content
    assert entry.token == "balance"
    assert entry.logprob == pytest.approx(math.log(0.7))
    assert entry.bytes == list(b"balance")
    assert [(t.token, round(math.exp(t.logprob), 6)) for t in entry.top_logprobs] == DISTRIBUTION[:top]


def test_completion_logprobs_without_top_logprobs_have_no_alternatives() -> None:
    parsed = ChatCompletion.model_validate(completion_body(answer(), request(logprobs=True)))
    logprobs = parsed.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert logprobs.content[0].top_logprobs == []


def test_logprob_of_a_label_outside_the_reported_distribution_is_finite() -> None:
    # A forced answer may name a label the top-k distribution does not hold; the logprob must stay a number.
    body = completion_body(answer("weather"), request(logprobs=True, top_logprobs=2))
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "weather"
    assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content is not None
    assert math.isfinite(parsed.choices[0].logprobs.content[0].logprob)
    json.dumps(body, allow_nan=False)


# -- SSE stream ------------------------------------------------------------------------------------------------


def test_stream_without_include_usage_has_no_usage_anywhere() -> None:
    chunks, raw = events(request(stream=True))
    assert raw[-1] == b"data: [DONE]\n\n"
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all("usage" not in c for c in chunks)
    assert all(len(c.choices) == 1 for c in parsed)
    assert parsed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in parsed) == "balance"
    assert [c.choices[0].finish_reason for c in parsed] == [None] * (len(parsed) - 1) + ["stop"]
    assert len({c.id for c in parsed}) == 1 and len({c.created for c in parsed}) == 1
    assert all(c.model == TASK and VERSION in (c.system_fingerprint or "") for c in parsed)
    assert all(c.object == "chat.completion.chunk" for c in parsed)


def test_stream_with_include_usage_ends_with_the_usage_chunk() -> None:
    chunks, raw = events(request(stream=True, stream_options={"include_usage": True}))
    assert raw[-1] == b"data: [DONE]\n\n"
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    # as OpenAI does: every chunk carries usage null, then one chunk with no choices carries the usage
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    last = parsed[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (12, 2, 14)
    assert "".join(c.choices[0].delta.content or "" for c in parsed[:-1]) == "balance"


def test_stream_with_include_usage_false_has_no_usage_chunk() -> None:
    chunks, _ = events(request(stream=True, stream_options={"include_usage": False}))
    assert all(c["choices"] for c in chunks)


@pytest.mark.parametrize("top", [0, 2])
def test_stream_logprobs_ride_on_the_content_chunk(top: int) -> None:
    chunks, _ = events(request(stream=True, logprobs=True, top_logprobs=top))
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    with_logprobs = [c for c in parsed if c.choices[0].logprobs is not None]
    (chunk,) = with_logprobs
    assert chunk.choices[0].delta.content == "balance"
    assert chunk.choices[0].logprobs is not None and chunk.choices[0].logprobs.content is not None
    (entry,) = chunk.choices[0].logprobs.content
    assert entry.token == "balance" and len(entry.top_logprobs) == top


# -- TokenEstimator ------------------------------------------------------------------------------------------------


def test_token_estimate_before_any_teacher_usage() -> None:
    req = request()
    chars = len(MESSAGES[0]["content"])
    prompt, completion = TokenEstimator().estimate(req, "bill_balance")
    assert prompt == math.ceil(chars / 4) + 4 + 3
    assert completion == math.ceil(len("bill_balance") / 4) + 1


def test_token_estimate_follows_what_the_teacher_reported() -> None:
    req = request()
    estimator = TokenEstimator()
    raw_prompt, _ = estimator.estimate(req, "balance")
    for _ in range(5):
        estimator.observe(req, prompt_tokens=2 * raw_prompt, completion_tokens=3)
    prompt, completion = estimator.estimate(req, "balance")
    assert prompt == pytest.approx(2 * raw_prompt, abs=1)
    assert completion == 3
