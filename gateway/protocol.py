"""Wire models only: what a chat completion request must look like, checked before anything is forwarded.

Unknown fields are allowed and forwarded untouched (OpenAI adds parameters faster than any gateway); the
fields we read or that OpenAI itself constrains are validated so that a bad request gets a 400 naming the
field instead of an upstream round trip.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from gateway import jsoncodec
from gateway.errors import InvalidRequest

# strict: no coercion ("yes" -> True, "0.5" -> 0.5). The raw body is what gets forwarded, so the view we act on
# (e.g. `stream`) must be exactly what the upstream will read; OpenAI itself rejects such values with a 400.
_WIRE = ConfigDict(extra="allow", strict=True)


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 8.0; strict mode alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]


class ContentPart(BaseModel):
    model_config = _WIRE
    type: str


class Message(BaseModel):
    model_config = _WIRE
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = _WIRE
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: JsonInt | None = Field(default=None, ge=1, le=128)
    logprobs: bool | None = None
    top_logprobs: JsonInt | None = Field(default=None, ge=0, le=20)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: JsonInt | None = Field(default=None, ge=1)
    max_completion_tokens: JsonInt | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    seed: JsonInt | None = None
    stop: str | list[str] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None


def _is_branch(part: str) -> bool:
    # pydantic names union branches by type ("str", "list[str]", "dict[str,any]", "function-after[...]"); no
    # field of the request has such a name.
    return part in ("str", "int", "float", "bool", "none", "literal") or any(c in part for c in "[-,")


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch(part):
            out += f".{part}" if out else str(part)
    return out


def _within(param: str, field: str) -> bool:
    return param == field or param.startswith((field + ".", field + "["))


def parse_chat_request(body: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """The raw JSON object (forwarded as-is) and its validated view; InvalidRequest names the bad field."""
    try:
        raw = jsoncodec.loads(body)
    except ValueError as exc:  # bad UTF-8 included
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}. The body must be a JSON object."
        ) from exc
    if not isinstance(raw, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        request = ChatCompletionRequest.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _param(errors[0]["loc"])
        # A union reports one error per branch; the deepest one is about the branch the input took (a list's
        # bad item), not "should be a string". max() keeps the first of equally deep errors.
        err = max((e for e in errors if _within(_param(e["loc"]), first)), key=lambda e: len(_param(e["loc"])))
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
    return _valid_unicode(texts[-1] if mode == "last_user_message" else "\n".join(texts))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (which JSON escapes allow, see `jsoncodec`) replaced by U+FFFD: the router's
    ONNX graph and the input hash need text that UTF-8 can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)  # JSON's parser joined every valid pair: these are alone
    return text


def sse_data(line: str) -> str | None:
    """The value of an SSE `data` line, or None for any other line. The field name may be followed by one
    optional space ("data: {...}" and "data:{...}" are the same event), as the SSE specification says."""
    if not line.startswith("data:"):
        return None
    return line[6:] if line.startswith(" ", 5) else line[5:]


def usage_of(data: Any) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) of a completion or chunk; None for what is missing or not an integer."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None, None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    valid = [v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None for v in (p, c)]
    return valid[0], valid[1]
