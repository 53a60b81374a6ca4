"""Upstream faults through the running gateway: retried 5xx, honoured retry-after, timeouts, refused connections,
fallback to a second upstream process, and a stream that breaks mid-way (an error event, never a silent end).

The fake upstreams fail on request (`metadata` directives, see conftest.fault); metrics are compared before/after.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from conftest import RETRY_AFTER_CAP_S, SLOW_FIRST_BYTE_S, Stack, fault
from procs import MetricKey, metric_total, scrape_metrics

from benchmarks.fake_upstream import request_id_prefix
from gateway.app import create_app
from gateway.settings import Settings

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
FAKE_ANSWER = "This is a fake answer from the fake upstream."


class Metrics:
    """Counters of the shared gateway: `delta(name, **labels)` since this object was made."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.before = scrape_metrics(base_url)
        self._after: dict[MetricKey, float] | None = None

    def delta(self, name: str, **labels: str) -> float:
        if self._after is None:
            self._after = scrape_metrics(self.base_url)
        return metric_total(self._after, name, **labels) - metric_total(self.before, name, **labels)

    def settled_delta(self, name: str, expected: float, **labels: str) -> float:
        """`delta`, re-scraped for a moment until it is `expected`: a stream's request is counted when the
        gateway's relay finishes, which can be just after the client has read the last event."""
        deadline = time.monotonic() + 5.0
        while (value := self.delta(name, **labels)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            self._after = None
        return value


@pytest.fixture
def metrics(stack: Stack) -> Metrics:
    return Metrics(stack.gateway.url)


def _message(exc: openai.APIError) -> str:
    assert isinstance(exc.body, dict)
    return str(exc.body["message"])


@pytest.mark.e2e
def test_a_500_then_success_is_retried_and_counted(
    client: openai.OpenAI, stack: Stack, marker: str, metrics: Metrics
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, metadata=fault(fail=500, fail_times=1), user=marker
    )
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content == FAKE_ANSWER
    assert len(stack.recorded(stack.primary, user=marker)) == 2
    assert metrics.delta("apprentice_upstream_retries_total", upstream="main") == 1
    assert metrics.delta("apprentice_upstream_errors_total", upstream="main", kind="500") == 1
    assert metrics.delta("apprentice_requests_total", model="gpt-4o-mini", status="200") == 1


@pytest.mark.e2e
def test_a_stream_is_retried_before_its_first_byte(
    client: openai.OpenAI, stack: Stack, marker: str, metrics: Metrics
) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        metadata=fault(fail=503, fail_times=2),
        user=marker,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == FAKE_ANSWER
    assert len(stack.recorded(stack.primary, user=marker)) == 3
    assert metrics.delta("apprentice_upstream_retries_total", upstream="main") == 2


@pytest.mark.e2e
def test_retry_after_is_waited_for(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    start = time.perf_counter()
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, metadata=fault(retry_after=1, fail_times=1), user=marker
    )
    elapsed = time.perf_counter() - start
    assert resp.choices[0].message.content == FAKE_ANSWER
    assert elapsed >= 1.0
    assert len(stack.recorded(stack.primary, user=marker)) == 2


@pytest.mark.e2e
def test_retry_after_beyond_the_cap_returns_the_429_at_once(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    wait = RETRY_AFTER_CAP_S * 12
    start = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, metadata=fault(retry_after=wait, fail_times=1), user=marker
        )
    assert time.perf_counter() - start < RETRY_AFTER_CAP_S
    assert caught.value.status_code == 429
    # The client learns how long the upstream wants it to wait, and the id of the upstream's refusal.
    assert caught.value.response.headers["retry-after"] == str(wait)
    assert caught.value.request_id is not None and caught.value.request_id.startswith(request_id_prefix("primary"))
    assert len(stack.recorded(stack.primary, user=marker)) == 1


@pytest.mark.e2e
def test_a_timeout_is_a_clear_504_and_not_retried(
    client: openai.OpenAI, stack: Stack, marker: str, metrics: Metrics
) -> None:
    start = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="slow-model", messages=MESSAGES, metadata=fault(delay_ms=3000), user=marker
        )
    elapsed = time.perf_counter() - start
    assert caught.value.status_code == 504
    assert _message(caught.value) == f"upstream slow timed out: no response within {SLOW_FIRST_BYTE_S:g}s"
    # slow has retries configured, but a slow upstream stays slow: no second wait.
    assert elapsed < 2 * SLOW_FIRST_BYTE_S + 1.0
    assert len(stack.recorded(stack.primary, user=marker)) == 1
    assert metrics.delta("apprentice_upstream_errors_total", upstream="slow", kind="timeout") == 1
    assert metrics.delta("apprentice_upstream_retries_total", upstream="slow") == 0
    assert metrics.delta("apprentice_requests_total", model="slow-model", status="504") == 1


@pytest.mark.e2e
def test_connection_refused_is_retried_then_502(client: openai.OpenAI, metrics: Metrics) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="dead-model", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert "connection failed" in _message(caught.value)
    assert metrics.delta("apprentice_upstream_errors_total", upstream="dead", kind="connect") == 2
    assert metrics.delta("apprentice_upstream_retries_total", upstream="dead") == 1
    assert metrics.delta("apprentice_requests_total", model="dead-model", status="502") == 1


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
def test_fallback_to_the_second_upstream(
    client: openai.OpenAI, stack: Stack, marker: str, metrics: Metrics, stream: bool
) -> None:
    # The primary fails every time; the backup (another process) is told nothing and answers.
    raw = client.chat.completions.with_raw_response.create(
        model="fallback-model",
        messages=MESSAGES,
        metadata=fault(fail=503, fail_on="primary"),
        user=marker,
        stream=stream,
    )
    assert raw.headers["x-apprentice-upstream"] == "backup"
    parsed = raw.parse()
    if isinstance(parsed, openai.Stream):
        assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == FAKE_ANSWER
    else:
        assert parsed.choices[0].message.content == FAKE_ANSWER
    assert len(stack.recorded(stack.primary, user=marker)) == 2  # first try and one retry
    assert len(stack.recorded(stack.backup, user=marker)) == 1
    assert metrics.delta("apprentice_upstream_fallbacks_total", from_upstream="flaky", to_upstream="backup") == 1
    assert metrics.delta("apprentice_upstream_retries_total", upstream="flaky") == 1


@pytest.mark.e2e
def test_no_fallback_for_the_upstreams_own_4xx(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="fallback-model", messages=MESSAGES, metadata=fault(fail=400, fail_on="primary"), user=marker
        )
    assert len(stack.recorded(stack.primary, user=marker)) == 1
    assert stack.recorded(stack.backup, user=marker) == []


@pytest.mark.e2e
def test_a_stream_cut_mid_way_ends_with_an_error_event(client: openai.OpenAI, metrics: Metrics) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, metadata=fault(cut_stream_after=2)
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received == ["", "This", " is"]
    assert not isinstance(caught.value, openai.APIStatusError)  # the status was already 200: an SSE error event
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "upstream_unavailable"
    assert "upstream main is unreachable: the stream broke" in caught.value.message
    assert metrics.settled_delta("apprentice_requests_total", 1, model="gpt-4o-mini", status="502") == 1


# -- a break inside an SSE event (in-process: the fake always cuts between events) -----------------------


async def test_a_stream_cut_inside_an_event_still_ends_with_a_parseable_error_event() -> None:
    first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}

    async def body() -> AsyncIterator[bytes]:
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        yield b"data: " + json.dumps(first).encode() + b"\n"  # the blank line that ends this event never comes
        raise httpx.ReadError("connection reset by peer")

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    settings = Settings.model_validate(
        {"upstreams": {"up": {"api_base": "http://upstream.test/v1", "models": ["m"], "retry": {"max_retries": 0}}}}
    )
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client,
    ):
        resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
    assert resp.status_code == 200
    events = [e for e in resp.text.split("\n\n") if e.strip()]
    assert json.loads(events[0].removeprefix("data: ")) == first
    # Whatever came before, the error arrives as its own event that parses as the OpenAI error envelope.
    error = json.loads(events[-1].strip().removeprefix("data: "))
    assert error["error"]["code"] == "upstream_unavailable"


async def test_an_unexpected_error_on_the_hot_path_is_a_500_in_openai_shape() -> None:
    # The hot route skips FastAPI's middleware (gateway.app.GatewayApp); a bug below it must still answer
    # with OpenAI's envelope, not a bare "Internal Server Error" text.
    def upstream(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in a dependency")

    settings = Settings.model_validate({"upstreams": {"up": {"api_base": "http://upstream.test/v1", "models": ["m"]}}})
    app = create_app(settings, transport=httpx.MockTransport(upstream))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test") as client,
    ):
        resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        wrong_method = await client.get("/v1/chat/completions")
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error"
    assert "a bug in a dependency" not in resp.text  # internals stay in the server's log
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
