"""The serving logic behind POST /v1/chat/completions: resolve the model, then pass through or route a task.

Route functions in gateway.app only map what this returns (a JSON or SSE response) or raises (ApiError).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response, StreamingResponse

from gateway import jsoncodec
from gateway.errors import ModelNotFound, UpstreamError, sse_error_event
from gateway.metrics import Metrics
from gateway.pricing import PriceBook
from gateway.protocol import ChatCompletionRequest, sse_data, usage_of
from gateway.settings import Settings
from gateway.upstream import Stream, TeacherClient

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def answer_headers(upstream: Mapping[str, str], own: dict[str, str]) -> dict[str, str]:
    """An answer's headers: what the upstream passed on (`gateway.upstream.forwarded_headers`), the gateway's
    own, and an `x-request-id` as OpenAI sends with every answer: the upstream's, else one of the gateway's."""
    headers = {**upstream, **own}
    if "x-request-id" not in headers:
        headers["x-request-id"] = new_request_id()
    return headers


def new_request_id() -> str:
    """A request id in OpenAI's shape (`req_` and 32 hex digits)."""
    return f"req_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class Timer:
    """When the request arrived; overhead = elapsed - time spent waiting on the upstream."""

    start: float

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def overhead_ms(self, upstream_s: float) -> str:
        return f"{max(0.0, self.elapsed() - upstream_s) * 1000:.3f}"


class ModelTable:
    """Which upstream serves a model name; tasks are resolved before this is asked."""

    def __init__(self, settings: Settings) -> None:
        self._explicit: dict[str, str] = {}
        self._wildcard: str | None = None
        for name, up in settings.upstreams.items():
            for model in up.models:
                if model == "*":
                    self._wildcard = self._wildcard or name
                else:
                    self._explicit.setdefault(model, name)
        self._default = settings.default_upstream or self._wildcard

    def add(self, upstream: str, models: list[str]) -> None:
        for model in models:
            self._explicit.setdefault(model, upstream)

    def upstream_for(self, model: str) -> str:
        found = self._explicit.get(model) or self._default
        if found is None:
            raise ModelNotFound(model)
        return found

    def models(self) -> list[str]:
        return sorted(self._explicit)


class Accounting:
    """Tokens, cost and request metrics for one finished teacher response."""

    def __init__(self, metrics: Metrics, prices: PriceBook) -> None:
        self.metrics = metrics
        self.prices = prices

    def teacher_cost(
        self,
        metric_model: str,
        priced_model: str,
        prompt: int | None,
        completion: int | None,
        *,
        route: str = "teacher",
    ) -> float | None:
        """Counts tokens and cost of one teacher answer; route "shadow" for the background shadow calls."""
        m = self.metrics
        if prompt is not None:
            m.child(m.tokens, metric_model, route, "prompt").inc(prompt)
        if completion is not None:
            m.child(m.tokens, metric_model, route, "completion").inc(completion)
        cost = self.prices.cost(priced_model, prompt, completion)
        if cost is None:
            m.cost_unknown.labels(model=metric_model).inc()
        else:
            m.child(m.cost, metric_model, route).inc(cost)
        return cost

    def finished(self, model: str, route: str, reason: str, status: int, timer: Timer, upstream_s: float) -> None:
        m = self.metrics
        m.child(m.requests, model, route, reason, str(status)).inc()
        elapsed = timer.elapsed()
        m.child(m.latency, model, route).observe(elapsed)
        m.child(m.overhead, route).observe(max(0.0, elapsed - upstream_s))


class Passthrough:
    """Requests for models that are not tasks: forwarded unchanged, answered as the upstream answered."""

    def __init__(self, teacher: TeacherClient, accounting: Accounting) -> None:
        self.teacher = teacher
        self.accounting = accounting

    async def handle(
        self, upstream: str, raw: dict[str, Any], request: ChatCompletionRequest, timer: Timer, body: bytes
    ) -> Response:
        """`body` is the client's request as received: forwarded unchanged, byte for byte."""
        try:
            return await self._handle(upstream, raw, request, timer, body)
        except UpstreamError as exc:
            # Failed requests count too: an upstream outage must show as requests_total{status="502"}.
            m = self.accounting.metrics
            m.requests.labels(model=request.model, route="teacher", reason="passthrough", status=str(exc.status)).inc()
            m.latency.labels(model=request.model, route="teacher").observe(timer.elapsed())
            raise

    async def _handle(
        self, upstream: str, raw: dict[str, Any], request: ChatCompletionRequest, timer: Timer, body: bytes
    ) -> Response:
        if request.stream:
            stream = await self.teacher.open_stream(upstream, raw, encoded=body)
            headers = answer_headers(stream.headers, self._headers(stream.upstream, timer, stream.upstream_s))
            return StreamingResponse(
                self._relay(stream, request.model, timer),
                media_type="text/event-stream",
                headers={**headers, **SSE_HEADERS},
            )
        done = await self.teacher.complete(upstream, raw, encoded=body)
        try:
            prompt, completion = usage_of(done.json())
        except ValueError:
            prompt = completion = None
        self.accounting.teacher_cost(request.model, request.model, prompt, completion)
        headers = answer_headers(done.headers, self._headers(done.upstream, timer, done.upstream_s))
        self.accounting.finished(request.model, "teacher", "passthrough", done.status, timer, done.upstream_s)
        return Response(done.content, status_code=done.status, media_type="application/json", headers=headers)

    @staticmethod
    def _headers(upstream: str, timer: Timer, upstream_s: float) -> dict[str, str]:
        return {
            "x-apprentice-route": "teacher",
            "x-apprentice-reason": "passthrough",
            "x-apprentice-upstream": upstream,
            "x-apprentice-overhead-ms": timer.overhead_ms(upstream_s),
        }

    async def _relay(self, stream: Stream, model: str, timer: Timer) -> AsyncIterator[bytes]:
        prompt = completion = None
        status = 200
        try:
            async for line in stream.lines():
                data = sse_data(line)
                if data is not None and data.startswith("{") and '"usage":{' in data.replace(" ", ""):
                    with contextlib.suppress(ValueError):
                        prompt, completion = usage_of(jsoncodec.loads(data))
                yield line.encode() + b"\n"
        except UpstreamError as exc:
            status = exc.status
            yield sse_error_event(exc)
        finally:
            await stream.aclose()
            self.accounting.teacher_cost(model, model, prompt, completion)
            self.accounting.finished(model, "teacher", "passthrough", status, timer, stream.upstream_s)
