"""TeacherClient on an injected httpx.MockTransport: retries, backoff and retry-after (through an injected sleep),
4xx final and never fallen back, ordered fallbacks, timeouts, stream errors, keys from secret references.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gateway.errors import UpstreamError, UpstreamStatusError, UpstreamTimeout, UpstreamUnavailable
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.upstream import TeacherClient

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OK = {"id": "c", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
Handler = Callable[[httpx.Request], httpx.Response]


def _settings(**upstreams: dict[str, Any]) -> Settings:
    """Upstreams named by keyword; each defaults to http://NAME.test/v1 with fast, deterministic retries."""
    configs = {}
    for name, extra in upstreams.items():
        retry = {"max_retries": 2, "backoff_base_s": 0.5, "backoff_max_s": 1.0, **extra.pop("retry", {})}
        configs[name] = {"api_base": f"http://{name}.test/v1", "models": [], "retry": retry, **extra}
    return Settings.model_validate({"upstreams": configs})


class Recorder:
    """The handler's view of the attempts: which upstream host was asked, in order; and the sleeps."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def _client(settings: Settings, handler: Handler, rec: Recorder) -> tuple[TeacherClient, Metrics]:
    def recording(request: httpx.Request) -> httpx.Response:
        rec.hosts.append(request.url.host.removesuffix(".test"))
        rec.requests.append(request)
        return handler(request)

    metrics = Metrics()
    return TeacherClient(settings, metrics, transport=httpx.MockTransport(recording), sleep=rec.sleep), metrics


def _scripted(*responses: httpx.Response | Exception) -> Handler:
    """Answers with the given responses in order (an exception is raised), repeating the last one."""
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return handler


def _error(status: int, message: str = "boom", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": "p", "code": "c"}}
    return httpx.Response(status, json=body, headers=headers)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_a_success_is_returned_as_the_upstream_sent_it(rec: Recorder) -> None:
    raw = json.dumps(OK, indent=3).encode()
    client, _ = _client(_settings(a={}), _scripted(httpx.Response(200, content=raw)), rec)
    done = await client.complete("a", BODY)
    assert (done.upstream, done.status, done.content) == ("a", 200, raw)
    assert json.loads(rec.requests[0].content) == BODY
    assert str(rec.requests[0].url) == "http://a.test/v1/chat/completions"
    assert rec.sleeps == []
    await client.aclose()


async def test_5xx_is_retried_until_success(rec: Recorder) -> None:
    client, metrics = _client(_settings(a={}), _scripted(_error(500), _error(503), httpx.Response(200, json=OK)), rec)
    done = await client.complete("a", BODY)
    assert done.status == 200
    assert rec.hosts == ["a", "a", "a"]
    assert len(rec.sleeps) == 2
    # Full jitter: each wait is at most base * 2**attempt, capped at backoff_max_s.
    assert 0 <= rec.sleeps[0] <= 0.5 and 0 <= rec.sleeps[1] <= 1.0
    assert _value(metrics, "apprentice_upstream_retries_total", upstream="a") == 2
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="500") == 1
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="503") == 1


async def test_retries_are_bounded_and_a_final_5xx_becomes_502(rec: Recorder) -> None:
    client, metrics = _client(_settings(a={"retry": {"max_retries": 3}}), _scripted(_error(500, "kaput")), rec)
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    assert len(rec.hosts) == 4 and len(rec.sleeps) == 3
    assert caught.value.status == 502 and caught.value.upstream_status == 500
    assert caught.value.code == "upstream_error"
    assert caught.value.message == "upstream a failed with HTTP 500: kaput"
    assert _value(metrics, "apprentice_upstream_retries_total", upstream="a") == 3


async def test_retry_after_is_honoured_exactly(rec: Recorder) -> None:
    handler = _scripted(_error(429, headers={"retry-after": "2.5"}), httpx.Response(200, json=OK))
    client, _ = _client(_settings(a={}), handler, rec)
    assert (await client.complete("a", BODY)).status == 200
    assert rec.sleeps == [2.5]


async def test_retry_after_as_an_http_date_falls_back_to_backoff(rec: Recorder) -> None:
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    handler = _scripted(_error(503, headers={"retry-after": date}), httpx.Response(200, json=OK))
    client, _ = _client(_settings(a={}), handler, rec)
    await client.complete("a", BODY)
    assert len(rec.sleeps) == 1 and 0 <= rec.sleeps[0] <= 0.5


async def test_retry_after_beyond_the_cap_is_not_waited_for(rec: Recorder) -> None:
    handler = _scripted(_error(429, "slow down", headers={"retry-after": "120"}), httpx.Response(200, json=OK))
    client, _ = _client(_settings(a={"retry": {"max_retry_after_s": 30}}), handler, rec)
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    assert rec.sleeps == [] and rec.hosts == ["a"]
    # A 429 passes through as the upstream said it, with its retry-after for the client.
    assert caught.value.status == 429 and caught.value.message == "slow down"
    assert caught.value.headers == {"retry-after": "120"}


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstreams_401_or_403_is_its_credentials_so_the_fallback_answers(rec: Recorder, status: int) -> None:
    settings = _settings(a={"fallbacks": ["b"]}, b={})
    client, metrics = _client(
        settings, _scripted(_error(status, "invalid api key, says a"), httpx.Response(200, json=OK)), rec
    )
    await client.complete("a", BODY)
    assert rec.hosts == ["a", "b"] and rec.sleeps == []
    assert _value(metrics, "apprentice_upstream_fallbacks_total", from_upstream="a", to_upstream="b") == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_an_upstreams_401_or_403_reaches_the_client_as_a_502_not_as_its_own_key(
    rec: Recorder, status: int
) -> None:
    client, _ = _client(_settings(a={}), _scripted(_error(status, "invalid api key")), rec)
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    err = caught.value
    assert (err.status, err.code, err.type, err.param) == (502, "upstream_auth_failed", "upstream_error", None)
    assert err.message == f"upstream a refused the gateway's credentials (HTTP {status}): invalid api key"
    assert rec.hosts == ["a"] and rec.sleeps == []


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_4xx_is_final_not_retried_and_not_fallen_back(rec: Recorder, status: int) -> None:
    settings = _settings(a={"fallbacks": ["b"]}, b={})
    client, metrics = _client(settings, _scripted(_error(status, "bad request, says a")), rec)
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    assert rec.hosts == ["a"] and rec.sleeps == []
    err = caught.value
    assert (err.status, err.message, err.param, err.code) == (status, "bad request, says a", "p", "c")
    assert _value(metrics, "apprentice_upstream_fallbacks_total", from_upstream="a", to_upstream="b") == 0


async def test_fallbacks_are_tried_in_order_after_each_ones_retries(rec: Recorder) -> None:
    settings = _settings(
        a={"fallbacks": ["b", "c", "d"], "retry": {"max_retries": 1}},
        b={"retry": {"max_retries": 0}},
        c={"retry": {"max_retries": 0}},
        d={},
    )

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "a.test":
            return _error(500)
        if host == "b.test":
            raise httpx.ConnectError("connection refused")
        if host == "c.test":
            return _error(429)
        return httpx.Response(200, json=OK)

    client, metrics = _client(settings, handler, rec)
    done = await client.complete("a", BODY)
    assert done.upstream == "d"
    assert rec.hosts == ["a", "a", "b", "c", "d"]
    for source, target in (("a", "b"), ("b", "c"), ("c", "d")):
        assert _value(metrics, "apprentice_upstream_fallbacks_total", from_upstream=source, to_upstream=target) == 1


async def test_when_every_fallback_fails_the_last_error_is_raised(rec: Recorder) -> None:
    settings = _settings(a={"fallbacks": ["b"], "retry": {"max_retries": 0}}, b={"retry": {"max_retries": 0}})
    handler = _scripted(_error(500), httpx.ConnectError("refused"))
    client, _ = _client(settings, handler, rec)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.complete("a", BODY)
    assert caught.value.upstream == "b" and caught.value.status == 502
    assert caught.value.message.startswith("upstream b is unreachable: connection failed")


async def test_connect_errors_are_retried(rec: Recorder) -> None:
    handler = _scripted(httpx.ConnectError("refused"), httpx.ConnectError("refused"), httpx.Response(200, json=OK))
    client, metrics = _client(_settings(a={}), handler, rec)
    assert (await client.complete("a", BODY)).status == 200
    assert len(rec.sleeps) == 2
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="connect") == 2


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (httpx.ReadTimeout("slow"), "upstream a timed out: no response within 7s"),
        (httpx.ConnectTimeout("slow"), "upstream a timed out: could not connect within 3s"),
    ],
)
async def test_a_timeout_is_not_retried_but_falls_back(rec: Recorder, exc: Exception, message: str) -> None:
    settings = _settings(a={"fallbacks": ["b"], "timeouts": {"first_byte_s": 7, "connect_s": 3}}, b={})

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test":
            raise exc
        return _error(503)

    client, metrics = _client(settings, handler, rec)
    with pytest.raises(UpstreamError) as caught:
        await client.complete("a", BODY)
    assert rec.hosts == ["a", "b", "b", "b"]
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="timeout") == 1
    # Without a fallback the client sees the timeout itself.
    alone, _ = _client(_settings(a={"timeouts": {"first_byte_s": 7, "connect_s": 3}}), _scripted(exc), Recorder())
    with pytest.raises(UpstreamTimeout) as timeout:
        await alone.complete("a", BODY)
    assert timeout.value.status == 504 and timeout.value.message == message
    assert caught.value.upstream == "b"


async def test_the_upstream_key_comes_from_a_secret_reference(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("UNIT_UPSTREAM_KEY", "sk-secret-value")
    settings = _settings(a={"api_key": "env:UNIT_UPSTREAM_KEY", "fallbacks": ["b"]}, b={})
    client, _ = _client(settings, _scripted(_error(500), _error(500), _error(500), httpx.Response(200, json=OK)), rec)
    with caplog.at_level(logging.DEBUG):
        await client.complete("a", BODY)
    assert rec.requests[0].headers["authorization"] == "Bearer sk-secret-value"
    assert "authorization" not in rec.requests[-1].headers  # b has no key: a's is never sent elsewhere
    assert "sk-secret-value" not in caplog.text and "falling back from upstream a to b" in caplog.text


# -- streams --------------------------------------------------------------------------------------------------


def _sse(events: list[dict[str, Any]], *, done: bool = True, then: Exception | None = None) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for event in events:
            yield b"data: " + json.dumps(event).encode() + b"\n\n"
        if done:
            yield b"data: [DONE]\n\n"
        if then is not None:
            raise then

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


CHUNKS = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("a", "b", "c")]


async def _read(client: TeacherClient, name: str = "a") -> tuple[list[str], Exception | None]:
    stream = await client.open_stream(name, {**BODY, "stream": True})
    lines: list[str] = []
    try:
        async for line in stream.lines():
            lines.append(line)
    except UpstreamError as exc:
        return lines, exc
    finally:
        await stream.aclose()
    return lines, None


def _data(lines: list[str]) -> list[str]:
    return [line for line in lines if line]


async def test_a_whole_stream_is_relayed_line_by_line(rec: Recorder) -> None:
    client, _ = _client(_settings(a={}), _scripted(_sse(CHUNKS)), rec)
    lines, error = await _read(client)
    assert error is None
    assert _data(lines) == ["data: " + json.dumps(c) for c in CHUNKS] + ["data: [DONE]"]


async def test_a_stream_that_breaks_raises_after_what_arrived(rec: Recorder) -> None:
    client, metrics = _client(
        _settings(a={}), _scripted(_sse(CHUNKS[:2], done=False, then=httpx.ReadError("reset"))), rec
    )
    lines, error = await _read(client)
    assert _data(lines) == ["data: " + json.dumps(c) for c in CHUNKS[:2]]
    assert isinstance(error, UpstreamUnavailable) and "the stream broke" in error.message
    assert rec.hosts == ["a"]  # bytes already reached the client: a stream is never retried mid-way
    # One attempt (at its opening), and its failure in the upstream's error ratio
    assert _value(metrics, "apprentice_upstream_duration_seconds_count", upstream="a") == 1
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="stream") == 1


async def test_a_stream_that_ends_without_done_is_an_error(rec: Recorder) -> None:
    client, _ = _client(_settings(a={}), _scripted(_sse(CHUNKS, done=False)), rec)
    lines, error = await _read(client)
    assert len(_data(lines)) == 3
    assert isinstance(error, UpstreamUnavailable) and "ended before data: [DONE]" in error.message


async def test_a_stream_that_stalls_mid_way_is_a_timeout(rec: Recorder) -> None:
    client, metrics = _client(
        _settings(a={}), _scripted(_sse(CHUNKS[:1], done=False, then=httpx.ReadTimeout("gap"))), rec
    )
    lines, error = await _read(client)
    assert len(_data(lines)) == 1
    assert isinstance(error, UpstreamTimeout) and error.status == 504
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="stream_timeout") == 1


async def test_a_stream_is_retried_and_falls_back_before_it_opens(rec: Recorder) -> None:
    settings = _settings(a={"fallbacks": ["b"], "retry": {"max_retries": 1}}, b={})

    def handler(request: httpx.Request) -> httpx.Response:
        return _error(502) if request.url.host == "a.test" else _sse(CHUNKS)

    client, metrics = _client(settings, handler, rec)
    stream = await client.open_stream("a", {**BODY, "stream": True})
    assert stream.upstream == "b"
    assert _data([line async for line in stream.lines()])[-1] == "data: [DONE]"
    await stream.aclose()
    assert rec.hosts == ["a", "a", "b"]
    # The two 502s were attempts too, as for a non-streamed answer: the error ratio's denominator
    assert _value(metrics, "apprentice_upstream_duration_seconds_count", upstream="a") == 2
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="502") == 2
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="b", kind="stream") == 0


async def test_a_stream_refused_with_4xx_carries_the_upstream_message(rec: Recorder) -> None:
    client, _ = _client(_settings(a={}), _scripted(_error(400, "stream_options needs stream")), rec)
    with pytest.raises(UpstreamStatusError) as caught:
        await client.open_stream("a", {**BODY, "stream": True})
    assert caught.value.status == 400 and caught.value.message == "stream_options needs stream"


async def test_list_models_reads_the_upstreams_model_ids(rec: Recorder) -> None:
    listing = {"object": "list", "data": [{"id": "x", "object": "model"}, {"id": "y"}, {"no": "id"}]}
    client, _ = _client(_settings(a={}), _scripted(httpx.Response(200, json=listing)), rec)
    assert await client.list_models("a") == ["x", "y"]
    assert str(rec.requests[0].url) == "http://a.test/v1/models"


async def test_a_cookie_one_upstream_answer_sets_never_rides_on_later_requests(rec: Recorder) -> None:
    # The client is shared by every caller: a stored cookie would carry one caller's upstream state to others.
    setting = httpx.Response(200, json=OK, headers={"set-cookie": "__cf_bm=abc; Path=/; Domain=a.test"})
    client, _ = _client(_settings(a={}), _scripted(setting, httpx.Response(200, json=OK)), rec)
    await client.complete("a", BODY)
    await client.complete("a", BODY)
    assert "cookie" not in rec.requests[1].headers
    await client.aclose()


class _LitellmStandIn:
    """What the client calls of litellm: `acompletion`, answering from a script (a provider's answer or its
    error). The real litellm needs a real provider; the accounting under test is the client's own."""

    def __init__(self, *outcomes: dict[str, Any] | Exception) -> None:
        self.outcomes = list(outcomes)

    async def acompletion(self, **kwargs: Any) -> Any:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return types.SimpleNamespace(model_dump=lambda exclude_none: dict(outcome))


class _ProviderError(Exception):
    """Shaped like a litellm exception: its status, message, and what it may keep of the provider's answer."""

    def __init__(self, status_code: int, *, headers: Any = None, response: httpx.Response | None = None) -> None:
        super().__init__(f"provider says {status_code}")
        self.status_code = status_code
        self.message = f"litellm.APIError: provider says {status_code}"
        self.litellm_response_headers = headers
        self.response = response


async def test_litellm_answers_and_error_statuses_are_attempts_in_the_error_ratio(rec: Recorder) -> None:
    """Without them the ratio's denominator held only timeouts: one timeout made it 1.0, and 5xx alone gave no
    sample at all."""
    settings = _settings(a={"provider": "litellm", "retry": {"max_retries": 1}})
    client, metrics = _client(settings, _scripted(), rec)
    answer = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    }
    client._litellm = _LitellmStandIn(answer, _ProviderError(503), answer)
    assert (await client.complete("a", BODY)).chat_completion()["choices"][0]["message"]["content"] == "hi"
    await client.complete("a", BODY)  # a 503, retried
    assert _value(metrics, "apprentice_upstream_duration_seconds_count", upstream="a") == 3
    assert _value(metrics, "apprentice_upstream_errors_total", upstream="a", kind="503") == 1


async def test_litellm_error_headers_kept_in_any_mapping_reach_the_client_and_the_retries(rec: Recorder) -> None:
    """litellm may keep the provider's headers as a plain dict: names in any case, values not text."""
    settings = _settings(a={"provider": "litellm", "retry": {"max_retries": 1}})
    client, _ = _client(settings, _scripted(), rec)
    kept = {"X-Request-Id": "req_abc", "Retry-After": 2, "Content-Type": "application/json"}
    client._litellm = _LitellmStandIn(_ProviderError(429, headers=kept), _ProviderError(429, headers=kept))
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    assert rec.sleeps == [2.0]  # the provider's retry-after, not the gateway's own backoff
    assert caught.value.headers == {"x-request-id": "req_abc", "retry-after": "2"}
    assert caught.value.body()["error"]["message"] == "litellm.APIError: provider says 429"


@pytest.mark.parametrize(
    ("provider_body", "expected"),
    [
        (
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
            {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"},
        ),
        # No message (Gemini's shape): litellm's own text is the clearer message.
        (
            {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}},
            {
                "message": "litellm.APIError: provider says 429",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            },
        ),
    ],
)
async def test_a_litellm_error_keeps_the_providers_body_only_when_it_has_a_message(
    rec: Recorder, provider_body: dict[str, Any], expected: dict[str, Any]
) -> None:
    settings = _settings(a={"provider": "litellm", "retry": {"max_retries": 0}})
    client, _ = _client(settings, _scripted(), rec)
    response = httpx.Response(429, json=provider_body, request=httpx.Request("POST", "http://provider.test/v1"))
    client._litellm = _LitellmStandIn(_ProviderError(429, response=response))
    with pytest.raises(UpstreamStatusError) as caught:
        await client.complete("a", BODY)
    assert caught.value.status == 429 and caught.value.body()["error"] == expected
