"""The teacher side: one shared httpx.AsyncClient for OpenAI-compatible upstreams, litellm for the rest.

Every attempt goes through `TeacherClient._chain`: per upstream, retries with exponential backoff and full
jitter on 429, 5xx and connection errors (a `retry-after` the upstream sends is honoured up to a cap), then the
upstream's ordered fallbacks. An upstream's own 4xx (other than 429) is final and passes through unchanged,
except 401 / 403, which concern the gateway's credentials: the fallbacks are tried, then the client gets a 502.
Timeouts: connect, first byte (httpx's read timeout, which also bounds each gap in a stream) and total.
Unit tests inject an `httpx.AsyncBaseTransport`; end-to-end tests run a real upstream server.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import httpx
from yarl import URL

from gateway import __version__, jsoncodec
from gateway.errors import (
    UPSTREAM_AUTH_STATUS,
    ApiError,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.metrics import Metrics
from gateway.protocol import sse_data
from gateway.settings import Settings, UpstreamConfig
from gateway.transport import AiohttpTransport, client_timeout

log = logging.getLogger("apprentice.upstream")
T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Upstream response headers a client of the provider reads, passed on as the upstream sent them: the request id
# (what the provider's support asks for; the openai SDK exposes it as `_request_id`), the processing time, the
# API version, and the rate-limit state of the key the gateway calls with (`x-ratelimit-*`).
FORWARDED_HEADERS = frozenset({"x-request-id", "openai-processing-ms", "openai-version"})
FORWARDED_PREFIX = "x-ratelimit-"


@dataclass(slots=True)
class Upstream:
    name: str
    config: UpstreamConfig
    key: str | None
    url: httpx.URL = field(default_factory=lambda: httpx.URL("http://unset"))
    headers: dict[str, str] = field(default_factory=dict)
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(5.0))
    # The same URL and timeouts for the transport's direct relay (AiohttpTransport.relay).
    relay_url: URL = field(default_factory=lambda: URL("http://unset"))
    relay_timeout: aiohttp.ClientTimeout = field(default_factory=aiohttp.ClientTimeout)

    def __post_init__(self) -> None:
        t = self.config.timeouts
        self.timeout = httpx.Timeout(connect=t.connect_s, read=t.first_byte_s, write=t.connect_s, pool=t.connect_s)
        self.relay_timeout = client_timeout(connect_s=t.connect_s, read_s=t.first_byte_s, pool_s=t.connect_s)
        base = (self.config.api_base or "").rstrip("/")
        # Parsed once: httpx re-parses a str URL on every request.
        self.url = httpx.URL(f"{base}/chat/completions")
        self.relay_url = URL(str(self.url))
        # Identity: the relay forwards the answer's bytes, and compressing a few kB of JSON saves nothing.
        # A user agent, as some CDNs and WAFs refuse requests without one (aiohttp sends none by itself).
        self.headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": f"apprentice/{__version__}",
        }
        if self.key:
            self.headers["authorization"] = f"Bearer {self.key}"


@dataclass(slots=True)
class Completion:
    """A finished non-streaming answer: the upstream's JSON bytes as it sent them, and where it came from."""

    upstream: str
    status: int
    content: bytes
    upstream_s: float
    headers: dict[str, str] = field(default_factory=dict)  # `forwarded_headers` of the upstream's answer

    def json(self) -> dict[str, Any]:
        data = jsoncodec.loads(self.content)
        return data if isinstance(data, dict) else {}

    def chat_completion(self) -> dict[str, Any]:
        """The answer as a chat completion object, or UpstreamBadAnswer (502) for a body a task cannot read:
        not JSON, not an object, or without a non-empty `choices` list (a provider's 200 error object, `{}`).
        Read as a decline, such an answer would replace the input's teacher label in distill's data."""
        try:
            data = jsoncodec.loads(self.content)
        except ValueError:
            raise UpstreamBadAnswer(self.upstream, f"not JSON: {self.content[:200]!r}") from None
        if not isinstance(data, dict):
            raise UpstreamBadAnswer(self.upstream, f"a JSON {type(data).__name__}, not an object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UpstreamBadAnswer(self.upstream, f"no choices: {self.content[:200]!r}")
        return data


@dataclass(slots=True)
class Stream:
    """An opened SSE stream (status 200 seen). Iterate `lines()`; always `aclose()`."""

    upstream: str
    upstream_s: float
    _lines: AsyncIterator[str]
    _close: Callable[[], Awaitable[None]]
    _read_timeout: float
    _deadline: float
    # Counts a failure mid-stream in upstream_errors_total, by kind ("stream_timeout" or "stream"): the attempt
    # was counted when the stream opened, and its failure belongs to the upstream's error ratio too.
    _on_error: Callable[[str], None] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # `forwarded_headers` of the upstream's answer

    async def lines(self) -> AsyncIterator[str]:
        """SSE lines without the newline. Raises UpstreamError if the stream breaks or ends without [DONE]."""
        try:
            async for line in self._read():
                yield line
        except UpstreamError as exc:
            if self._on_error is not None:
                self._on_error("stream_timeout" if isinstance(exc, UpstreamTimeout) else "stream")
            raise

    async def _read(self) -> AsyncIterator[str]:
        saw_done = False
        try:
            while True:
                t0 = time.perf_counter()
                remaining = self._deadline - t0
                if remaining <= 0:
                    raise UpstreamTimeout(self.upstream, "the total deadline passed mid-stream")
                try:
                    async with asyncio.timeout(remaining):
                        line = await anext(self._lines)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise UpstreamTimeout(self.upstream, "the total deadline passed mid-stream") from exc
                finally:
                    self.upstream_s += time.perf_counter() - t0
                if sse_data(line) == "[DONE]":
                    saw_done = True
                yield line
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(self.upstream, f"no data for {self._read_timeout:g}s mid-stream") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(self.upstream, f"the stream broke: {exc!r}") from exc
        if not saw_done:
            raise UpstreamUnavailable(self.upstream, "the stream ended before data: [DONE]")

    async def aclose(self) -> None:
        await self._close()


class TeacherClient:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.metrics = metrics
        self._sleep = sleep
        self.upstreams = {name: Upstream(name, cfg, cfg.resolved_key(name)) for name, cfg in settings.upstreams.items()}
        transport = transport or AiohttpTransport()
        # Non-streaming answers skip httpx's Request/Response layers when the pool is our aiohttp transport
        # (gateway.transport); an injected transport (httpx.MockTransport in unit tests) gets the full client.
        self._relay = transport.relay if isinstance(transport, AiohttpTransport) else None
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(60.0, connect=5.0),
            follow_redirects=False,
        )
        # One client serves every caller: a cookie an upstream sets (e.g. a CDN's bot cookie) must not ride
        # along on other callers' requests, so the jar accepts none.
        self.http.cookies.jar.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._litellm: Any = None

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- public API ---------------------------------------------------------------------------------------

    async def list_models(self, name: str) -> list[str]:
        up = self.upstreams[name]
        base = (up.config.api_base or "").rstrip("/")
        resp = await self.http.get(f"{base}/models", headers=up.headers, timeout=up.config.timeouts.connect_s * 2)
        resp.raise_for_status()
        return [str(m["id"]) for m in resp.json().get("data", []) if isinstance(m, dict) and "id" in m]

    async def complete(self, name: str, body: dict[str, Any], *, encoded: bytes | None = None) -> Completion:
        """`encoded`: the body's JSON as the client sent it, forwarded byte for byte (saves re-encoding)."""
        return await self._chain(name, lambda up: self._complete_once(up, body, encoded))

    async def open_stream(self, name: str, body: dict[str, Any], *, encoded: bytes | None = None) -> Stream:
        return await self._chain(name, lambda up: self._open_stream_once(up, body, encoded))

    # -- retries and fallbacks ------------------------------------------------------------------------------

    async def _chain(self, name: str, attempt: Callable[[Upstream], Awaitable[T]]) -> T:
        chain = [name, *self.upstreams[name].config.fallbacks]
        last: UpstreamError | None = None
        for i, current in enumerate(chain):
            if i > 0:
                self.metrics.upstream_fallbacks.labels(from_upstream=chain[i - 1], to_upstream=current).inc()
                log.warning("falling back from upstream %s to %s: %s", chain[i - 1], current, last)
            try:
                return await self._with_retries(self.upstreams[current], attempt)
            except UpstreamStatusError as exc:
                if exc.upstream_status not in RETRYABLE_STATUS | UPSTREAM_AUTH_STATUS:
                    raise  # the upstream's own verdict on the request: no other upstream will think otherwise
                last = exc  # a 401 / 403 is about this upstream's credentials: the next has its own
            except UpstreamError as exc:
                last = exc
        assert last is not None
        raise last

    async def _with_retries(self, up: Upstream, attempt: Callable[[Upstream], Awaitable[T]]) -> T:
        policy = up.config.retry
        for n in range(policy.max_retries + 1):
            try:
                return await attempt(up)
            except UpstreamStatusError as exc:
                self.metrics.upstream_errors.labels(upstream=up.name, kind=str(exc.upstream_status)).inc()
                if exc.upstream_status not in RETRYABLE_STATUS or n == policy.max_retries:
                    raise
                delay = self._backoff(n, up, exc.headers.get("retry-after"))
                if delay is None:
                    raise
            except UpstreamTimeout:
                # A slow upstream stays slow: waiting twice as long helps nobody, so fall back instead.
                self.metrics.upstream_errors.labels(upstream=up.name, kind="timeout").inc()
                raise
            except UpstreamUnavailable:
                self.metrics.upstream_errors.labels(upstream=up.name, kind="connect").inc()
                if n == policy.max_retries:
                    raise
                delay = self._backoff(n, up, None)
                assert delay is not None
            self.metrics.upstream_retries.labels(upstream=up.name).inc()
            await self._sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _backoff(n: int, up: Upstream, retry_after: str | None) -> float | None:
        """Full-jitter exponential backoff; a retry-after header wins. None: the upstream asked for too long."""
        policy = up.config.retry
        if retry_after is not None:
            try:
                wait = max(0.0, float(retry_after))
            except ValueError:
                wait = None  # an HTTP date: fall back to our own backoff
            if wait is not None:
                return wait if wait <= policy.max_retry_after_s else None
        return random.uniform(0, min(policy.backoff_max_s, policy.backoff_base_s * 2**n))

    # -- one attempt ------------------------------------------------------------------------------------------

    async def _complete_once(self, up: Upstream, body: dict[str, Any], encoded: bytes | None) -> Completion:
        if up.config.provider == "litellm":
            return await self._litellm_complete(up, body)
        t0 = time.perf_counter()
        content = encoded or _dumps(body)
        try:
            async with asyncio.timeout(up.config.timeouts.total_s):
                if self._relay is not None:
                    reply = await self._relay(up.relay_url, up.headers, content, up.relay_timeout)
                    status, headers, answer = reply.status, reply.headers, reply.content
                else:
                    resp = await self.http.post(up.url, content=content, headers=up.headers, timeout=up.timeout)
                    status, headers, answer = resp.status_code, resp.headers, resp.content
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise UpstreamTimeout(up.name, _describe_timeout(exc, up)) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(up.name, _describe_transport(exc)) from exc
        elapsed = time.perf_counter() - t0
        self.metrics.child(self.metrics.upstream_latency, up.name).observe(elapsed)
        if status >= 400:
            raise UpstreamStatusError(up.name, status, answer, _error_headers(headers))
        return Completion(up.name, status, answer, elapsed, forwarded_headers(headers))

    async def _open_stream_once(self, up: Upstream, body: dict[str, Any], encoded: bytes | None) -> Stream:
        if up.config.provider == "litellm":
            return await self._litellm_stream(up, body)
        t0 = time.perf_counter()
        deadline = t0 + up.config.timeouts.total_s
        request = self.http.build_request(
            "POST", up.url, content=encoded or _dumps(body), headers=up.headers, timeout=up.timeout
        )
        try:
            async with asyncio.timeout(up.config.timeouts.total_s):
                resp = await self.http.send(request, stream=True)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise UpstreamTimeout(up.name, _describe_timeout(exc, up)) from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(up.name, _describe_transport(exc)) from exc
        elapsed = time.perf_counter() - t0
        self.metrics.child(self.metrics.upstream_latency, up.name).observe(elapsed)  # an attempt, as non-stream
        if resp.status_code >= 400:
            try:
                content = await resp.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await resp.aclose()
            raise UpstreamStatusError(up.name, resp.status_code, content, _error_headers(resp.headers))
        first_byte = up.config.timeouts.first_byte_s
        return Stream(
            up.name, elapsed, resp.aiter_lines(), resp.aclose, first_byte, deadline, self._stream_error(up),
            forwarded_headers(resp.headers),
        )  # fmt: skip

    # -- litellm (imported on first use only) -------------------------------------------------------------

    def _litellm_module(self) -> Any:
        if self._litellm is None:
            import litellm

            litellm.drop_params = True
            self._litellm = litellm
        return self._litellm

    def _litellm_kwargs(self, up: Upstream, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(body)
        kwargs["model"] = up.config.litellm_prefix + str(body["model"])
        kwargs["timeout"] = up.config.timeouts.total_s
        kwargs["num_retries"] = 0
        if up.key:
            kwargs["api_key"] = up.key
        if up.config.api_base:
            kwargs["api_base"] = up.config.api_base
        return kwargs

    async def _litellm_call(self, up: Upstream, kwargs: dict[str, Any]) -> Any:
        """One litellm call. An answer, or an error status, counts as an attempt in upstream_duration_seconds,
        as on the OpenAI-compatible path: the error ratio's denominator (timeouts and connection failures are
        added to it by the rule)."""
        litellm = self._litellm_module()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(up.config.timeouts.total_s):
                response = await litellm.acompletion(**kwargs)
        except TimeoutError as exc:
            raise UpstreamTimeout(up.name, f"no answer within {up.config.timeouts.total_s:g}s") from exc
        except ApiError:
            raise
        except Exception as exc:
            error = _from_litellm(up.name, exc)
            if isinstance(error, UpstreamStatusError):
                self.metrics.child(self.metrics.upstream_latency, up.name).observe(time.perf_counter() - t0)
            raise error from exc
        self.metrics.child(self.metrics.upstream_latency, up.name).observe(time.perf_counter() - t0)
        return response

    async def _litellm_complete(self, up: Upstream, body: dict[str, Any]) -> Completion:
        t0 = time.perf_counter()
        kwargs = self._litellm_kwargs(up, body)
        kwargs.pop("stream", None)
        response = await self._litellm_call(up, kwargs)
        data = response.model_dump(exclude_none=True)
        data["model"] = body["model"]
        return Completion(up.name, 200, _dumps(data), time.perf_counter() - t0, _litellm_headers(response))

    async def _litellm_stream(self, up: Upstream, body: dict[str, Any]) -> Stream:
        t0 = time.perf_counter()
        kwargs = self._litellm_kwargs(up, body)
        kwargs["stream"] = True
        wrapper = await self._litellm_call(up, kwargs)

        async def lines() -> AsyncIterator[str]:
            try:
                async for chunk in wrapper:
                    data = chunk.model_dump(exclude_none=True)
                    data["model"] = body["model"]
                    yield "data: " + json.dumps(data, separators=(",", ":"))
                    yield ""
            except Exception as exc:
                raise httpx.ReadError(f"litellm stream failed: {exc!r}") from exc
            yield "data: [DONE]"
            yield ""

        async def close() -> None:
            return None

        t = up.config.timeouts
        elapsed = time.perf_counter() - t0
        return Stream(
            up.name, elapsed, lines(), close, t.first_byte_s, t0 + t.total_s, self._stream_error(up),
            _litellm_headers(wrapper),
        )  # fmt: skip

    def _stream_error(self, up: Upstream) -> Callable[[str], None]:
        def count(kind: str) -> None:
            self.metrics.upstream_errors.labels(upstream=up.name, kind=kind).inc()

        return count


def _dumps(body: dict[str, Any]) -> bytes:
    return jsoncodec.dumps(body)


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream's headers a client reads (FORWARDED_HEADERS, x-ratelimit-*), names lower-cased."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in FORWARDED_HEADERS or key.startswith(FORWARDED_PREFIX):
            out[key] = value
    return out


def _error_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """`forwarded_headers` and `retry-after`: what an error answer passes on (the retries read retry-after)."""
    out = forwarded_headers(headers)
    value = headers.get("retry-after")
    if value is not None:
        out["retry-after"] = value
    return out


def _describe_timeout(exc: Exception, up: Upstream) -> str:
    t = up.config.timeouts
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return f"could not connect within {t.connect_s:g}s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no response within {t.first_byte_s:g}s"
    return f"no complete response within {t.total_s:g}s"


def _describe_transport(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc})"
    return f"{type(exc).__name__}: {exc}"


# litellm keeps a provider's own response headers under this prefix in `_hidden_params["additional_headers"]`.
LITELLM_PROVIDER_HEADER = "llm_provider-"


def _litellm_headers(answer: Any) -> dict[str, str]:
    """`forwarded_headers` of the provider's answer behind a litellm response or stream, as the OpenAI-compatible
    path passes them on (x-request-id, openai-processing-ms, x-ratelimit-*); {} when litellm kept none."""
    hidden = getattr(answer, "_hidden_params", None)
    kept = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    if not isinstance(kept, dict):
        return {}
    provider = {
        name.removeprefix(LITELLM_PROVIDER_HEADER): str(value)
        for name, value in kept.items()
        if isinstance(name, str) and name.startswith(LITELLM_PROVIDER_HEADER)
    }
    return forwarded_headers(provider)


def _provider_error_body(exc: Exception) -> bytes | None:
    """The provider's own error body behind a litellm exception when it is a JSON object with an `error`, so its
    message, type, param and code reach the client as on the OpenAI-compatible path; None otherwise."""
    response = getattr(exc, "response", None)
    if not isinstance(response, httpx.Response):
        return None
    try:
        content = response.content
        parsed = json.loads(content)
    except (httpx.ResponseNotRead, ValueError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    # Some providers' errors carry no message (Gemini: code and status only): litellm's own text says more.
    return content if isinstance(error, dict) and isinstance(error.get("message"), str) else None


def _from_litellm(upstream: str, exc: Exception) -> UpstreamError:
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc)
    if "timeout" in type(exc).__name__.lower():
        return UpstreamTimeout(upstream, message)
    if isinstance(status, int) and status >= 400:
        body = (
            _provider_error_body(exc)
            or json.dumps({"error": {"message": message, "type": None, "param": None, "code": None}}).encode()
        )
        headers = getattr(exc, "litellm_response_headers", None)
        if not isinstance(headers, Mapping):
            headers = getattr(getattr(exc, "response", None), "headers", None)
        # Names lower-cased and values made text, whatever mapping litellm kept them in.
        plain = {str(k).lower(): str(v) for k, v in headers.items()} if isinstance(headers, Mapping) else {}
        return UpstreamStatusError(upstream, status, body, _error_headers(plain))
    return UpstreamUnavailable(upstream, message)
