"""Wire models only: what a chat completion request must look like, checked before anything is forwarded.

Unknown fields are allowed and forwarded untouched (OpenAI adds parameters faster than any gateway); the
fields we read or that OpenAI itself constrains are validated so that a bad request gets a 400 naming the
field instead of an upstream round trip.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[ContentPart]", "function-after", "literal"):
            # pydantic's union branch names are not fields of the request
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_chat_request(body: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """The raw JSON object (forwarded as-is) and its validated view; InvalidRequest names the bad field."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}. The body must be a JSON object."
        ) from exc
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        request = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {err['msg']}."
        raise InvalidRequest(message, param=param, code="invalid_value") from exc
    return raw, request


def task_input_text(request: ChatCompletionRequest, mode: str) -> str | None:
    """The text the router scores: the last user message (default) or all user messages joined."""
    texts: list[str] = []
    for message in request.messages:
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            texts.append(message.content)
        elif isinstance(message.content, list):
            parts = [getattr(p, "text", None) for p in message.content if p.type == "text"]
            texts.append("\n".join(p for p in parts if isinstance(p, str)))
    if not texts:
        return None
    return texts[-1] if mode == "last_user_message" else "\n".join(texts)
