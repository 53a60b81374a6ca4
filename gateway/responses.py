"""The specialist's answer in exactly the shape the teacher would have sent: chat.completion or SSE chunks.

Usage is estimated with `TokenEstimator`, the same estimate the savings metric prices, calibrated per task
on the usage its teacher actually reported.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gateway.protocol import ChatCompletionRequest


def estimate_prompt_tokens(request: ChatCompletionRequest) -> int:
    """ceil(chars / 4) + 4 per message + 3: a provider-neutral prompt-token estimate. The gateway scales it by
    what each task's teacher really counted; the reference teacher reports it as its usage."""
    chars = 0
    for m in request.messages:
        if isinstance(m.content, str):
            chars += len(m.content)
        elif isinstance(m.content, list):
            chars += sum(len(str(getattr(p, "text", "") or "")) for p in m.content)
    return math.ceil(chars / 4) + 4 * len(request.messages) + 3


class TokenEstimator:
    """Prompt tokens ~ chars/4 + 4 per message + 3, scaled by what the teacher really counted for this task;
    completion tokens = the teacher's running mean for this task (before any: label chars/4 + 1)."""

    def __init__(self) -> None:
        self._prompt_ratio = 1.0
        self._completion_mean: float | None = None
        self._seen = 0

    def observe(self, request: ChatCompletionRequest, prompt_tokens: int, completion_tokens: int) -> None:
        raw = estimate_prompt_tokens(request)
        alpha = max(0.01, 1.0 / (self._seen + 1))
        self._seen += 1
        self._prompt_ratio += alpha * (prompt_tokens / raw - self._prompt_ratio)
        mean = self._completion_mean if self._completion_mean is not None else float(completion_tokens)
        self._completion_mean = mean + alpha * (completion_tokens - mean)

    def estimate(self, request: ChatCompletionRequest, label: str) -> tuple[int, int]:
        prompt = max(1, round(estimate_prompt_tokens(request) * self._prompt_ratio))
        if self._completion_mean is None:
            completion = math.ceil(len(label) / 4) + 1
        else:
            completion = max(1, round(self._completion_mean))
        return prompt, completion


@dataclass(frozen=True, slots=True)
class SpecialistAnswer:
    label: str
    version: str
    task: str
    prompt_tokens: int
    completion_tokens: int
    # label -> probability, most likely first; used for logprobs when the client asked for them
    distribution: list[tuple[str, float]]


def _logprobs(answer: SpecialistAnswer, top: int) -> dict[str, Any]:
    alternatives = [
        {"token": label, "logprob": math.log(max(p, 1e-12)), "bytes": list(label.encode())}
        for label, p in answer.distribution[:top]
    ]
    p_label = dict(answer.distribution).get(answer.label, 1.0)
    return {
        "content": [
            {
                "token": answer.label,
                "logprob": math.log(max(p_label, 1e-12)),
                "bytes": list(answer.label.encode()),
                "top_logprobs": alternatives,
            }
        ],
        "refusal": None,
    }


def _usage(answer: SpecialistAnswer) -> dict[str, Any]:
    # The details OpenAI's answers carry, all zero here: clients read e.g. usage.prompt_tokens_details.cached_tokens
    # without checking, and must not fail only when the specialist answered.
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }  # fmt: skip


def completion_body(answer: SpecialistAnswer, request: ChatCompletionRequest) -> dict[str, Any]:
    logprobs = _logprobs(answer, request.top_logprobs or 0) if request.logprobs else None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "service_tier": "default",
        "system_fingerprint": f"apprentice-{answer.task}-{answer.version}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.label, "refusal": None, "annotations": []},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(answer),
    }


def stream_events(answer: SpecialistAnswer, request: ChatCompletionRequest) -> Iterator[bytes]:
    """SSE events: role, content, finish_reason, the usage chunk if asked for, then [DONE]."""
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
        "service_tier": "default",
        "system_fingerprint": f"apprentice-{answer.task}-{answer.version}",
    }
    logprobs = _logprobs(answer, request.top_logprobs or 0) if request.logprobs else None
    deltas: list[tuple[dict[str, Any], Any, str | None]] = [
        ({"role": "assistant", "content": "", "refusal": None}, None, None),
        ({"content": answer.label}, logprobs, None),
        ({}, None, "stop"),
    ]
    for delta, lp, finish in deltas:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            chunk["usage"] = None
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    if include_usage:
        yield b"data: " + json.dumps({**base, "choices": [], "usage": _usage(answer)}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
