"""The inference-log record and the sink interface the gateway writes teacher answers to.

The gateway never blocks a response on the log: `InferenceSink.submit` must return at once and never raise.
The durable SQLAlchemy writer lives in `gateway.logstore`; `MemorySink` serves tests and `--log-url memory://`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Route = Literal["teacher", "shadow"]
# The reason of a request the specialist cannot honour (tools, an image, a JSON format, a stop sequence inside a
# label, ...): its answer replies to more than the input text, and distill never learns from it.
UNSUPPORTED_REASON = "unsupported_request"


def input_hash(text: str) -> str:
    """The key distill dedupes on: sha256 of the task input as the router saw it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class InferenceRecord:
    """One teacher answer for a task request, served (`route="teacher"`) or shadowed (`route="shadow"`)."""

    task: str
    route: Route
    reason: str
    input_text: str
    teacher_model: str
    teacher_text: str
    teacher_label: str | None
    label_distribution: dict[str, float] | None
    request: dict[str, Any]
    response: dict[str, Any] | None
    status: int
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    score: float | None = None
    specialist_label: str | None = None
    specialist_version: str | None = None
    # The teacher's finish_reason. Distill passes over "length" and "content_filter": a cut-short answer is
    # neither a label nor a decline. None where the teacher never said (a stream that ended early) and in
    # rows logged before the log schema's version 2.
    finish_reason: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    input_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.input_sha256:
            object.__setattr__(self, "input_sha256", input_hash(self.input_text))


class InferenceSink(Protocol):
    """Where teacher answers go. `submit` is called on the event loop and must not block or raise."""

    def submit(self, record: InferenceRecord) -> None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class MemorySink:
    """Keeps records in a list; for tests and for running without a store."""

    def __init__(self) -> None:
        self.records: list[InferenceRecord] = []

    def submit(self, record: InferenceRecord) -> None:
        self.records.append(record)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
