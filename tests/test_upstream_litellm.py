"""The litellm path against a real OpenAI-compatible server: the real `litellm.acompletion`, over loopback, to
the fake upstream (litellm's `openai/` provider with an api_base). What reaches the client must be what the
OpenAI-compatible path passes on: the provider's request id and rate-limit headers, its error's own type and
code, and its retry-after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from procs import Proc, start_fake_upstream

from benchmarks.fake_upstream import request_id_prefix
from gateway.errors import UpstreamStatusError
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.upstream import TeacherClient

NAME = "lit"
MESSAGES = [{"role": "user", "content": "what is my credit limit"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[Proc]:
    with start_fake_upstream("--name", NAME) as proc:
        yield proc


class _Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _client(fake: Proc, sleeps: _Sleeps, max_retries: int = 0) -> TeacherClient:
    settings = Settings.model_validate(
        {
            "upstreams": {
                "teacher": {
                    "provider": "litellm",
                    "litellm_prefix": "openai/",
                    "api_base": fake.url + "/v1",
                    "api_key": "sk-test",
                    "models": [],
                    "retry": {"max_retries": max_retries, "backoff_base_s": 0.5, "backoff_max_s": 1.0},
                }
            }
        }
    )
    return TeacherClient(settings, Metrics(), sleep=sleeps)


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": MESSAGES, **extra}


def test_a_litellm_answer_carries_the_providers_request_id_and_rate_limits(fake: Proc) -> None:
    async def run() -> None:
        client = _client(fake, _Sleeps())
        try:
            answer = await client.complete("teacher", _body())
        finally:
            await client.aclose()
        assert answer.status == 200 and answer.chat_completion()["choices"][0]["message"]["content"]
        assert answer.headers["x-request-id"].startswith(request_id_prefix(NAME))
        assert int(answer.headers["x-ratelimit-remaining-requests"]) >= 0
        assert "openai-processing-ms" in answer.headers
        # Only what a client reads: not the provider's transport headers, nor litellm's own copies.
        assert "content-type" not in answer.headers and "request-id" not in answer.headers

    asyncio.run(run())


def test_a_litellm_stream_carries_the_providers_request_id(fake: Proc) -> None:
    async def run() -> None:
        client = _client(fake, _Sleeps())
        try:
            stream = await client.open_stream("teacher", _body(stream=True))
            try:
                lines = [line async for line in stream.lines()]
            finally:
                await stream.aclose()
        finally:
            await client.aclose()
        assert "data: [DONE]" in lines
        assert stream.headers["x-request-id"].startswith(request_id_prefix(NAME))
        assert "x-ratelimit-limit-requests" in stream.headers

    asyncio.run(run())


def test_a_litellm_error_keeps_the_providers_type_code_request_id_and_retry_after(fake: Proc) -> None:
    sleeps = _Sleeps()

    async def run() -> UpstreamStatusError:
        client = _client(fake, sleeps, max_retries=1)
        try:
            with pytest.raises(UpstreamStatusError) as caught:
                await client.complete("teacher", _body(extra_headers={"x-fake-fail": "429", "x-fake-retry-after": "3"}))
        finally:
            await client.aclose()
        return caught.value

    error = asyncio.run(run())
    # The provider asked for 3 s before the retry; without its header the gateway's own backoff (at most 1 s).
    assert sleeps.waits == [3.0]
    assert error.status == 429
    assert error.body() == {
        "error": {
            "message": "Injected failure (429).",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert error.headers["x-request-id"].startswith(request_id_prefix(NAME))
    assert error.headers["retry-after"] == "3"
