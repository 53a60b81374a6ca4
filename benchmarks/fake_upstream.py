"""A lean, real OpenAI-compatible fake upstream server (raw asyncio + httptools) for tests and benchmarks.

Run `python -m benchmarks.fake_upstream --port 0`; it prints `READY http://127.0.0.1:PORT` once listening.
Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (also without the /v1 prefix),
and the control endpoints GET|DELETE /_requests (bodies received; `?detail=1` adds path and headers),
GET|DELETE /_stats (hit counters). Faults are driven by request headers so parallel tests stay apart:
  x-fake-fail: STATUS | disconnect   answer with that status (OpenAI error envelope) or drop the connection
  x-fake-fail-times: N + x-fake-fault-key: K   fail only the first N requests carrying key K
  x-fake-retry-after: S              send `retry-after: S` with the failure (429 when no status is given)
  x-fake-delay-ms: X                 wait before answering (adds to --latency-ms)
  x-fake-chunk-delay-ms: X           wait between stream events
  x-fake-cut-stream-after: N         stream N content chunks, then close without [DONE]
  x-fake-content: TEXT               the assistant's answer text
  x-fake-set-cookie: COOKIE          send `set-cookie: COOKIE` with the answer
  x-fake-gzip: 1                     gzip a whole (non-stream) answer, whatever accept-encoding asked for
  x-fake-body: TEXT                  answer 200 with exactly TEXT as the (non-stream) body, whatever it is
  x-fake-sse-nospace: 1              write stream events as `data:{...}`, without the optional space
  x-fake-fail-on: NAME[,NAME]        apply x-fake-fail, -fail-times and -retry-after only on the instances
                                     started with --name NAME (a request fails on a primary, not its fallback)
The same directives are also read from the chat request's `metadata` object (headers win), for gateways
that forward OpenAI parameters but not unknown headers.
Every chat answer, failures included, carries headers shaped like OpenAI's: `x-request-id` (req_ and 32 hex
digits, unique per answer; `request_id_prefix` names the instance), `openai-processing-ms`,
`x-ratelimit-limit-requests` and `x-ratelimit-remaining-requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import json
import os
import select
import signal
import subprocess
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools

from benchmarks._fake_chat import (
    BadRequest,
    completion_body,
    error_body,
    model_entry,
    models_body,
    plan_chat,
    reason_phrase,
    stream_events,
)

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "fake-model")


def request_id_prefix(name: str) -> str:
    """The start of every `x-request-id` the instance named `name` sends: `req_` and 8 hex digits of the name
    (24 more count its answers), so a test can tell which upstream an id came from."""
    return "req_" + name.encode()[:4].hex().ljust(8, "0")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Reply:
    """A response to write: a whole body, or SSE events (streamed with chunked encoding)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    events: list[bytes] | None = None
    cut_after: int | None = None  # number of events to send before dropping the connection
    delay_s: float = 0.0
    event_delay_s: float = 0.0
    disconnect: bool = False


@dataclass
class Upstream:
    """The server's state: config, the request record and counters (one event loop, so no locks)."""

    models: list[str]
    api_key: str | None = None
    latency_s: float = 0.0
    record_limit: int = 10000
    name: str = "fake-upstream"
    record: deque[dict[str, Any]] = field(init=False)
    stats: Counter[str] = field(default_factory=Counter)
    fault_seen: Counter[str] = field(default_factory=Counter)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    request_ids: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.record = deque(maxlen=self.record_limit)

    def handle(self, req: Request) -> Reply:
        if req.path.startswith("/_"):
            return self._control(req)
        self.stats["requests"] += 1
        path = req.path.removeprefix("/v1")
        directives = {k: v for k, v in req.headers.items() if k.startswith("x-fake-")}
        body: Any = None
        if path == "/chat/completions" and req.method == "POST":
            self.stats["chat_completions"] += 1
            try:
                body = json.loads(req.body)
            except ValueError:
                return Reply(400, error_body(400, "We could not parse the JSON body of your request."))
            if self.record_limit:
                self.record.append({"method": req.method, "path": req.path, "headers": req.headers, "body": body})
            metadata = body.get("metadata") if isinstance(body, dict) else None
            if isinstance(metadata, dict):
                # A gateway forwards `metadata` unchanged but may drop unknown headers: accept both channels.
                for key, value in metadata.items():
                    if isinstance(key, str) and key.startswith("x-fake-"):
                        directives.setdefault(key, str(value))
        if self.api_key is not None and req.headers.get("authorization") != f"Bearer {self.api_key}":
            return Reply(401, error_body(401, "Incorrect API key provided."))
        reply = self._fault(directives) or self._route(req.method, path, body, directives)
        reply.delay_s = self.latency_s * (path == "/chat/completions")
        reply.delay_s += float(directives.get("x-fake-delay-ms", 0)) / 1000
        reply.headers.append(("x-fake-upstream", self.name))
        if path == "/chat/completions":
            served = next(self.request_ids)
            reply.headers += [
                ("x-request-id", f"{request_id_prefix(self.name)}{served:024x}"),
                ("openai-processing-ms", str(round(reply.delay_s * 1000))),
                ("x-ratelimit-limit-requests", "10000"),
                ("x-ratelimit-remaining-requests", str(max(0, 9999 - served))),
            ]
        if "x-fake-set-cookie" in directives:
            reply.headers.append(("set-cookie", directives["x-fake-set-cookie"]))
        if directives.get("x-fake-gzip") == "1" and reply.events is None and reply.body:
            reply.body = gzip.compress(reply.body)
            reply.headers.append(("content-encoding", "gzip"))
        return reply

    def _route(self, method: str, path: str, body: Any, directives: dict[str, str]) -> Reply:
        if method == "GET" and path == "/models":
            self.stats["models"] += 1
            return Reply(200, models_body(self.models, self.name))
        if method == "GET" and path.startswith("/models/"):
            model = path.removeprefix("/models/")
            if model not in self.models:
                return Reply(404, error_body(404, f"The model `{model}` does not exist."))
            return Reply(200, json.dumps(model_entry(model, self.name)).encode())
        if path == "/chat/completions" and method == "POST":
            return self._chat(body, directives)
        if path == "/chat/completions":
            return Reply(405, error_body(405, "Use POST for /chat/completions."))
        return Reply(404, error_body(404, f"Unknown path {path}.", code="unknown_url"))

    def _fault(self, directives: dict[str, str]) -> Reply | None:
        only_on = directives.get("x-fake-fail-on")
        if only_on is not None and self.name not in {n.strip() for n in only_on.split(",")}:
            return None
        fail = directives.get("x-fake-fail")
        times = directives.get("x-fake-fail-times")
        retry_after = directives.get("x-fake-retry-after")
        if fail is None and times is None and retry_after is None:
            return None
        if times is not None:
            key = directives.get("x-fake-fault-key", "")
            self.fault_seen[key] += 1
            if self.fault_seen[key] > int(times):
                return None
        self.stats["faults"] += 1
        if fail == "disconnect":
            return Reply(0, disconnect=True)
        status = int(fail) if fail is not None else (429 if retry_after is not None else 500)
        headers = [("retry-after", retry_after)] if retry_after is not None else []
        return Reply(status, error_body(status, f"Injected failure ({status})."), headers=headers)

    def _chat(self, body: Any, directives: dict[str, str]) -> Reply:
        completion_id = f"chatcmpl-fake{next(self.ids):012x}"
        try:
            plan = plan_chat(body, self.models, completion_id, directives.get("x-fake-content"))
        except BadRequest as exc:
            return Reply(exc.status, error_body(exc.status, exc.message, exc.param, exc.code))
        self.stats[f"model:{plan.model}"] += 1
        if body.get("stream") is not True:
            if "x-fake-body" in directives:
                return Reply(200, directives["x-fake-body"].encode())
            return Reply(200, completion_body(plan))
        self.stats["streams"] += 1
        events, tail = stream_events(plan)
        if directives.get("x-fake-sse-nospace") == "1":
            events, tail = ([e.replace(b"data: ", b"data:", 1) for e in part] for part in (events, tail))
        cut = directives.get("x-fake-cut-stream-after")
        return Reply(
            200,
            content_type="text/event-stream; charset=utf-8",
            events=events + tail,
            cut_after=None if cut is None else 1 + int(cut),  # the role chunk is not a content chunk
            event_delay_s=float(directives.get("x-fake-chunk-delay-ms", 0)) / 1000,
        )

    def _control(self, req: Request) -> Reply:
        if req.path == "/_requests" and req.method == "DELETE":
            self.record.clear()
            return Reply(200, b'{"cleared": true}')
        if req.path == "/_requests":
            detail = parse_qs(req.query).get("detail") == ["1"]
            items = list(self.record) if detail else [r["body"] for r in self.record]
            return Reply(200, json.dumps(items).encode())
        if req.path == "/_stats" and req.method == "DELETE":
            self.stats.clear()
            return Reply(200, b'{"cleared": true}')
        if req.path == "/_stats":
            return Reply(200, json.dumps(dict(self.stats)).encode())
        return Reply(404, error_body(404, f"Unknown path {req.path}.", code="unknown_url"))


def _head(reply: Reply, keep_alive: bool, length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {reply.status} {reason_phrase(reply.status)}", f"content-type: {reply.content_type}"]
    lines.append("transfer-encoding: chunked" if length is None else f"content-length: {length}")
    lines.extend(f"{k}: {v}" for k, v in reply.headers)
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; requests are answered in order, slow ones in a task."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request] = deque()
        self.busy = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.upstream.stats["connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                body = error_body(400, "Malformed HTTP request.")
                self.transport.write(_head(Reply(400), False, len(body)) + body)
                self.transport.close()

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = urlsplit(self._url.decode("latin-1"))
        method = self.parser.get_method().decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        self.pending.append(Request(method, url.path, url.query, self._headers, b"".join(self._body), keep_alive))
        if not self.busy:
            self._drain()

    def _drain(self) -> None:
        while self.pending and self.transport is not None and not self.transport.is_closing():
            req = self.pending.popleft()
            reply = self.upstream.handle(req)
            if reply.delay_s > 0 or reply.event_delay_s > 0:
                self.busy = True
                self.transport.pause_reading()
                asyncio.get_running_loop().create_task(self._answer_later(req, reply))
                return
            self._write(req, reply)

    async def _answer_later(self, req: Request, reply: Reply) -> None:
        await asyncio.sleep(reply.delay_s)
        if reply.events is not None and reply.event_delay_s > 0 and not reply.disconnect:
            await self._stream_slowly(req, reply)
        else:
            self._write(req, reply)
        self.busy = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._drain()

    async def _stream_slowly(self, req: Request, reply: Reply) -> None:
        assert reply.events is not None
        events = reply.events if reply.cut_after is None else reply.events[: reply.cut_after]
        if self.transport is None:
            return
        self.transport.write(_head(reply, req.keep_alive, None))
        for event in events:
            await asyncio.sleep(reply.event_delay_s)
            if self.transport is None:
                return
            self.transport.write(_chunk(event))
        self._finish(req, reply)

    def _write(self, req: Request, reply: Reply) -> None:
        if self.transport is None:
            return
        if reply.disconnect:
            self.transport.abort()
            self.pending.clear()
            return
        if reply.events is None:
            self.transport.write(_head(reply, req.keep_alive, len(reply.body)) + reply.body)
        else:
            events = reply.events if reply.cut_after is None else reply.events[: reply.cut_after]
            self.transport.write(_head(reply, req.keep_alive, None) + b"".join(_chunk(e) for e in events))
        self._finish(req, reply)

    def _finish(self, req: Request, reply: Reply) -> None:
        assert self.transport is not None
        if reply.events is not None and reply.cut_after is None:
            self.transport.write(b"0\r\n\r\n")
        if reply.cut_after is not None:
            # An abrupt end: the chunked body is never terminated, so the client sees a broken stream.
            self.transport.close()
            self.pending.clear()
        elif not req.keep_alive:
            self.transport.close()


async def serve(upstream: Upstream, host: str, port: int) -> None:
    """Listen, print the READY line, and serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(upstream), host, port, backlog=1024)
    real_port = server.sockets[0].getsockname()[1]
    print(f"READY http://{host}:{real_port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the READY line)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="time before each chat answer starts")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument("--record-limit", type=int, default=10000, help="requests kept for GET /_requests")
    parser.add_argument(
        "--name", default="fake-upstream", help="for x-fake-fail-on, `owned_by` and the x-fake-upstream header"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    upstream = Upstream(models, args.api_key, args.latency_ms / 1000, args.record_limit, args.name)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(upstream, args.host, args.port))


class FakeUpstreamProcess:
    """A fake upstream running as a child process; `url` is its base URL (append /v1 for OpenAI clients)."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        from router_models.processes import terminate  # here, so that the server process stays lean

        terminate(self.process, timeout_s=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> FakeUpstreamProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def launch(
    *,
    latency_ms: float = 0.0,
    models: list[str] | None = None,
    api_key: str | None = None,
    record_limit: int = 10000,
    name: str = "fake-upstream",
    python: str = sys.executable,
    timeout_s: float = 15.0,
) -> FakeUpstreamProcess:
    """Start the fake upstream on an ephemeral 127.0.0.1 port and wait for its READY line."""
    cmd = [python, "-m", "benchmarks.fake_upstream", "--port", "0", "--latency-ms", str(latency_ms)]
    cmd += ["--models", ",".join(models or DEFAULT_MODELS), "--record-limit", str(record_limit), "--name", name]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("READY "):
        FakeUpstreamProcess(process, "").stop()
        raise RuntimeError(f"fake upstream did not start (exit code {process.poll()}, said {line!r})")
    return FakeUpstreamProcess(process, line.split()[1])


if __name__ == "__main__":
    main()
