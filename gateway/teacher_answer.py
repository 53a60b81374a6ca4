"""What the gateway does to a teacher's answer for a task: read the label and soft label, then give the client
exactly what it asked for (logprobs the gateway requested for itself are stripped or trimmed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import ChatCompletionRequest, sse_data, usage_of
from gateway.softlabels import LabelSet, label_distribution

TEACHER_TOP_LOGPROBS = 20


def teacher_body(raw: dict[str, Any], teacher_model: str, *, want_logprobs: bool, stream: bool) -> dict[str, Any]:
    """The request sent to the teacher: the client's, for the teacher model, asking for what distill needs."""
    body = dict(raw)
    body["model"] = teacher_model
    if want_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = TEACHER_TOP_LOGPROBS
    if stream:
        body["stream"] = True
        body["stream_options"] = {**(raw.get("stream_options") or {}), "include_usage": True}
    else:
        # A shadow call of a streamed request reads one JSON answer: the client's stream flag must not go along.
        body.pop("stream", None)
        body.pop("stream_options", None)
    return body


def fit_logprobs_to_client(choice: dict[str, Any], request: ChatCompletionRequest) -> None:
    """Removes logprobs the client did not ask for, trims top_logprobs to the number it asked for."""
    if "logprobs" not in choice:
        return
    if not request.logprobs:
        choice["logprobs"] = None
        return
    keep = request.top_logprobs or 0
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return
    # New entry dicts, never trimmed in place: a StreamRewriter's reading holds the same entries, and the
    # inference log needs all 20 alternatives whatever the client asked for.
    logprobs = choice["logprobs"] = {**logprobs, "content": list(logprobs["content"])}
    for i, entry in enumerate(logprobs["content"]):
        if isinstance(entry, dict) and isinstance(entry.get("top_logprobs"), list):
            logprobs["content"][i] = {**entry, "top_logprobs": entry["top_logprobs"][:keep]}


@dataclass(slots=True)
class TeacherReading:
    """The teacher's answer as distill needs it."""

    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Why the teacher stopped ("stop", "length", ...); None until it says, which a stream cut short never does.
    finish_reason: str | None = None

    def label(self, labels: LabelSet) -> str | None:
        return labels.parse(self.text)

    def distribution(self, labels: LabelSet) -> dict[str, float] | None:
        return label_distribution(self.logprobs, labels) if self.logprobs else None

    def as_response(self, model: str) -> dict[str, Any]:
        """A compact chat.completion of what was streamed, for the inference log."""
        usage = None
        if self.prompt_tokens is not None and self.completion_tokens is not None:
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return {
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "logprobs": {"content": self.logprobs} if self.logprobs else None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": usage,
        }


def read_completion(data: dict[str, Any]) -> TeacherReading:
    reading = TeacherReading()
    choices = data.get("choices") or []
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        reading.text = content if isinstance(content, str) else ""
        logprobs = choices[0].get("logprobs")
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        reading.logprobs = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        finish = choices[0].get("finish_reason")
        reading.finish_reason = finish if isinstance(finish, str) else None
    reading.prompt_tokens, reading.completion_tokens = usage_of(data)
    return reading


class StreamRewriter:
    """Reads a task teacher's SSE stream chunk by chunk and rewrites each chunk for the client."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.request = request
        self.reading = TeacherReading()
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def rewrite(self, line: str) -> bytes | None:
        """The bytes to send for one SSE line, or None to send nothing."""
        data = sse_data(line)
        if data is None or not data.startswith("{"):
            return line.encode() + b"\n"
        try:
            chunk = json.loads(data)
        except ValueError:
            return line.encode() + b"\n"
        self._read(chunk)
        chunk["model"] = self.request.model
        if not self.include_usage:
            if not chunk.get("choices") and chunk.get("usage"):
                return None  # the usage chunk the gateway asked for on its own behalf
            chunk.pop("usage", None)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict):
                fit_logprobs_to_client(choice, self.request)
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n"

    def _read(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.reading.prompt_tokens, self.reading.completion_tokens = usage_of(chunk)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                self.reading.text += delta["content"]
            logprobs = choice.get("logprobs")
            entries = logprobs.get("content") if isinstance(logprobs, dict) else None
            if isinstance(entries, list):
                self.reading.logprobs.extend(e for e in entries if isinstance(e, dict))
            if isinstance(choice.get("finish_reason"), str):
                self.reading.finish_reason = choice["finish_reason"]
