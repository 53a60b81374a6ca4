"""The reference teacher's OpenAI-compatible HTTP server (a stand-in for a frontier LLM, not an LLM).

GET /v1/models and POST /v1/chat/completions in OpenAI's shapes: content = the label (or a decline),
`logprobs`/`top_logprobs` (up to 20) per token, SSE streaming with the usage chunk when
`stream_options.include_usage` is set, usage (prompt tokens ~ chars/4 + 4 per message + 3, completion tokens =
the answer's tokens), and an optional added latency. Any requested model name is accepted (so a gateway can
price it as the real model it stands for); replies name `MODEL_ID`. The task input is the last user message;
a system prompt listing the labels is accepted and not needed.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gateway.errors import ApiError, InvalidRequest, error_response
from gateway.protocol import parse_chat_request, task_input_text
from gateway.responses import estimate_prompt_tokens
from router_models.datasets import load_dataset
from router_models.reference_teacher import (
    DEFAULT_CACHE_DIR,
    MODEL_ID,
    ReferenceTeacher,
    TeacherAnswer,
    TeacherConfig,
    TokenChoice,
    build_reference_teacher,
)


def _logprob_entry(token: str, prob: float) -> dict[str, Any]:
    return {"token": token, "logprob": math.log(max(prob, 1e-300)), "bytes": list(token.encode("utf-8"))}


def logprobs_content(tokens: list[TokenChoice], top: int) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` as OpenAI writes it, with `top` alternatives per position."""
    return [
        {**_logprob_entry(t.token, t.prob), "top_logprobs": [_logprob_entry(a, p) for a, p in t.alternatives[:top]]}
        for t in tokens
    ]


class _AnswerCache:
    """Bounded LRU of answers by input text: replayed traffic and shadow requests repeat inputs."""

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._items: OrderedDict[str, TeacherAnswer] = OrderedDict()

    def get(self, text: str) -> TeacherAnswer | None:
        answer = self._items.get(text)
        if answer is not None:
            self._items.move_to_end(text)
        return answer

    def put(self, text: str, answer: TeacherAnswer) -> None:
        self._items[text] = answer
        if len(self._items) > self._size:
            self._items.popitem(last=False)


def create_app(teacher: ReferenceTeacher, *, latency_ms: float = 0.0) -> FastAPI:
    """The ASGI app serving `teacher`."""
    app = FastAPI(title="apprentice reference teacher (a stand-in, not an LLM)", docs_url=None, redoc_url=None)
    cache = _AnswerCache()
    created = int(time.time())
    fingerprint = f"fp_{teacher.dataset_sha256[:8]}s{teacher.seed}"

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": MODEL_ID, "labels": len(teacher.labels)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "apprentice"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _, req = parse_chat_request(await request.body())
        text = task_input_text(req, "last_user_message")
        if text is None:
            raise InvalidRequest("The reference teacher needs a user message.", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest(
                "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.", param="top_logprobs"
            )
        answer = cache.get(text)
        if answer is None:
            answer = await run_in_threadpool(teacher.answer, text)
            cache.put(text, answer)
        if latency_ms > 0:
            await asyncio.sleep(latency_ms / 1000.0)
        limit = req.max_completion_tokens or req.max_tokens
        tokens = answer.tokens[:limit] if limit else answer.tokens
        finish = "length" if len(tokens) < len(answer.tokens) else "stop"
        logprobs = logprobs_content(tokens, req.top_logprobs or 0) if req.logprobs else None
        usage = {
            "prompt_tokens": estimate_prompt_tokens(req),
            "completion_tokens": len(tokens),
            "total_tokens": estimate_prompt_tokens(req) + len(tokens),
        }
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": MODEL_ID,
            "system_fingerprint": fingerprint,
        }
        n = req.n or 1
        if req.stream:
            include_usage = req.stream_options is not None and bool(req.stream_options.include_usage)
            chunks = _stream(base, tokens, logprobs, finish, n, usage if include_usage else None)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"})
        content = "".join(t.token for t in tokens)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                "finish_reason": finish,
            }
            for i in range(n)
        ]
        body = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
        return JSONResponse(body)

    return app


async def _stream(
    base: dict[str, Any],
    tokens: list[TokenChoice],
    logprobs: list[dict[str, Any]] | None,
    finish: str,
    n: int,
    usage: dict[str, int] | None,
) -> AsyncIterator[bytes]:
    """SSE chunks: the role, one chunk per token (with its logprobs), the finish reason, usage, [DONE]."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
        if usage is not None and "usage" not in extra:
            body["usage"] = None  # OpenAI sends usage: null on every chunk but the last when it was asked for
        return f"data: {json.dumps(body)}\n\n".encode()

    for i in range(n):
        role = {"role": "assistant", "content": "", "refusal": None}
        yield chunk([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
        for k, token in enumerate(tokens):
            lp = {"content": [logprobs[k]], "refusal": None} if logprobs is not None else None
            yield chunk([{"index": i, "delta": {"content": token.token}, "logprobs": lp, "finish_reason": None}])
        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if usage is not None:
        total = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"] * n,
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"] * n,
        }
        yield chunk([], usage=total)
    yield b"data: [DONE]\n\n"


def serve_reference_teacher(
    data: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    latency_ms: float = 0.0,
    *,
    seed: int = 0,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    config: TeacherConfig | None = None,
    log_level: str = "warning",
) -> None:
    """Trains or loads the teacher, listens, prints `READY http://HOST:PORT` (port 0 = ephemeral), serves."""
    import uvicorn
    from threadpoolctl import threadpool_limits

    dataset = load_dataset(data)
    # Bound before the teacher is trained: a port in use or an address this machine lacks fails at once.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    bound_port = sock.getsockname()[1]
    teacher = build_reference_teacher(dataset, seed, config=config, cache_dir=cache_dir)
    _ = teacher.encoder  # load the ONNX session before announcing readiness
    # One BLAS thread for the per-request matrix-vector products: on a busy 2-core machine OpenBLAS's threads
    # made the 4500 x 384 cosine product take 15 ms instead of 0.3 ms (measured).
    blas_limits = threadpool_limits(limits=1)
    print(f"reference teacher metrics on the calibration split: {json.dumps(teacher.metrics)}", file=sys.stderr)
    app = create_app(teacher, latency_ms=latency_ms)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"READY http://{host}:{bound_port}", flush=True)

    server = _Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        blas_limits.restore_original_limits()


def main(argv: list[str] | None = None) -> None:
    """`python -m router_models.reference_teacher_server --data PATH [--port N]` (the CLI calls the same)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    serve_reference_teacher(args.data, args.host, args.port, args.latency_ms, seed=args.seed, cache_dir=args.cache_dir)


if __name__ == "__main__":
    main()
