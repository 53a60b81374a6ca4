"""OpenAI-shaped payloads of the fake upstream: chat completions, stream chunks, logprobs, errors, models."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

DEFAULT_CONTENT = "This is a fake answer from the fake upstream."
_TOKEN_RE = re.compile(r"\s*\S+|\s+")
# The chosen token is near-certain; alternatives trail off, so top_logprobs look like a real model's.
_CHOSEN_LOGPROB = -0.0123
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}


class BadRequest(Exception):
    """A request the fake upstream rejects with an OpenAI error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    """OpenAI's error envelope; `type` and default `code` follow what OpenAI sends for that status."""
    kind, default_code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    error = {"message": message, "type": kind, "param": param, "code": code or default_code}
    return json.dumps({"error": error}).encode()


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def models_body(models: list[str], owner: str) -> bytes:
    return json.dumps({"object": "list", "data": [model_entry(m, owner) for m in models]}).encode()


def model_entry(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1700000000, "owned_by": owner}


def _tokens(text: str) -> list[str]:
    """Split like a BPE model would at word starts: the leading space belongs to the token."""
    return _TOKEN_RE.findall(text) or [""]


def _logprob_entry(token: str, top: int) -> dict[str, Any]:
    alternatives = [{"token": f"alt{j}", "logprob": -4.0 - j, "bytes": list(f"alt{j}".encode())} for j in range(1, top)]
    chosen = {"token": token, "logprob": _CHOSEN_LOGPROB, "bytes": list(token.encode())}
    return {**chosen, "top_logprobs": [chosen, *alternatives] if top > 0 else []}


def _tool_arguments(tool: dict[str, Any]) -> str:
    """Arguments that satisfy the tool's required parameters, so clients can parse and dispatch them."""
    params = tool.get("function", {}).get("parameters") or {}
    props = params.get("properties") or {}
    samples = {"string": "fake", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    args = {}
    for name in params.get("required") or []:
        kind = (props.get(name) or {}).get("type", "string")
        args[name] = samples.get(kind if isinstance(kind, str) else "string", "fake")
    return json.dumps(args)


def _check_tools(tools: Any) -> None:
    """Refuse malformed tools with a 400 as OpenAI does, instead of echoing a bad name into a tool call."""
    if not isinstance(tools, list):
        raise BadRequest(400, "Invalid type for 'tools': expected an array.", param="tools")
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in ("function", "custom"):
            raise BadRequest(400, f"Invalid value for 'tools[{i}].type'.", param=f"tools[{i}].type")
        function = tool.get("function")
        if kind == "function" and not (
            isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("parameters", {}), dict)
        ):
            message = f"Invalid value for 'tools[{i}].function': it needs a string name and object parameters."
            raise BadRequest(400, message, param=f"tools[{i}].function")


def _prompt_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text", "")) for p in content if isinstance(p, dict))
    return max(1, chars // 4) + 3 * len(messages)


@dataclass(slots=True)
class ChatPlan:
    """What to answer for one chat request: decided once, rendered as JSON or as an SSE stream."""

    completion_id: str
    created: int
    model: str
    n: int
    tokens: list[str]
    finish_reason: str
    tool_call: dict[str, Any] | None
    top_logprobs: int | None  # None: the client did not ask for logprobs
    prompt_tokens: int
    include_usage: bool

    @property
    def usage(self) -> dict[str, int]:
        completion = len(self.tokens) * self.n
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def plan_chat(body: Any, models: list[str], completion_id: str, content_override: str | None) -> ChatPlan:
    """Validate a chat request the way OpenAI does and decide the answer; raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "'messages' must be a non-empty array", param="messages")
    if models and model not in models:
        raise BadRequest(404, f"The model `{model}` does not exist or you do not have access to it.")
    n = body.get("n") or 1
    if not isinstance(n, int) or n < 1:
        raise BadRequest(400, "'n' must be a positive integer", param="n")
    tools = body.get("tools")
    if tools is not None:
        _check_tools(tools)
    tool_choice = body.get("tool_choice")
    tool_call = None
    if isinstance(tools, list) and tools and tool_choice != "none":
        tool = tools[0]
        if isinstance(tool_choice, dict):
            wanted = tool_choice.get("function", {}).get("name")
            tool = next((t for t in tools if t.get("function", {}).get("name") == wanted), tool)
        name = tool.get("function", {}).get("name", "tool")
        tool_call = {"id": f"call_{completion_id[-12:]}", "name": name, "arguments": _tool_arguments(tool)}
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        content = "{}"
    else:
        content = content_override if content_override is not None else DEFAULT_CONTENT
    tokens = [] if tool_call else _tokens(content)
    finish_reason = "tool_calls" if tool_call else "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < len(tokens):
        tokens, finish_reason = tokens[:limit], "length"
    top: int | None = None
    if body.get("logprobs") is True:
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            raise BadRequest(400, "'top_logprobs' must be an integer between 0 and 20", param="top_logprobs")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatPlan(
        completion_id,
        int(time.time()),
        model,
        n,
        tokens,
        finish_reason,
        tool_call,
        top,
        _prompt_tokens(messages),
        include_usage,
    )


def completion_body(plan: ChatPlan) -> bytes:
    """A non-streaming `chat.completion`."""
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if plan.tool_call is not None:
        call = plan.tool_call
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]},
            }
        ]
    else:
        message["content"] = "".join(plan.tokens)
    logprobs = None
    if plan.top_logprobs is not None:
        logprobs = {"content": [_logprob_entry(t, plan.top_logprobs) for t in plan.tokens], "refusal": None}
    choices = [
        {"index": i, "message": message, "logprobs": logprobs, "finish_reason": plan.finish_reason}
        for i in range(plan.n)
    ]
    return json.dumps(
        {
            "id": plan.completion_id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
            "usage": plan.usage,
        }
    ).encode()


def stream_events(plan: ChatPlan) -> tuple[list[bytes], list[bytes]]:
    """SSE events of a streamed answer: (content events, closing events including `data: [DONE]`)."""
    head = {
        "id": plan.completion_id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": "fp_fake",
    }
    if plan.include_usage:
        head["usage"] = None  # OpenAI marks every chunk but the last as having no usage

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(i: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    body: list[bytes] = []
    first: dict[str, Any] = {"role": "assistant", "content": "", "refusal": None}
    call = plan.tool_call
    if call is not None:
        first = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": ""},
                }
            ],
        }
    body.append(event([choice(i, first) for i in range(plan.n)]))
    if call is not None:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": call["arguments"]}}]}
        body.append(event([choice(i, delta) for i in range(plan.n)]))
    for token in plan.tokens:
        logprobs = None
        if plan.top_logprobs is not None:
            logprobs = {"content": [_logprob_entry(token, plan.top_logprobs)], "refusal": None}
        body.append(event([choice(i, {"content": token}, logprobs) for i in range(plan.n)]))
    tail = [event([choice(i, {}, None, plan.finish_reason) for i in range(plan.n)])]
    if plan.include_usage:
        tail.append(event([], usage=plan.usage))
    tail.append(b"data: [DONE]\n\n")
    return body, tail
