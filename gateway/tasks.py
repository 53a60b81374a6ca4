"""The task path: for a request whose model is a configured task, the router decides who answers.

The specialist answers in-process when it is loaded, the request is one it can honour and s(x) >= tau;
otherwise the teacher answers (reason: ood, low_confidence, no_specialist, unsupported_request or forced),
and its answer, label and soft label go to the inference log without delaying the client.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response, StreamingResponse

from gateway.errors import InvalidRequest, PermissionDenied, UpstreamError, sse_error_event
from gateway.inference_log import UNSUPPORTED_REASON, InferenceRecord, InferenceSink
from gateway.protocol import ChatCompletionRequest, task_input_text
from gateway.registry import RegistryReader, ReloadResult
from gateway.responses import SpecialistAnswer, TokenEstimator, completion_body, stream_events
from gateway.serving import SSE_HEADERS, Accounting, ModelTable, Timer, answer_headers
from gateway.settings import Settings, TaskConfig
from gateway.shadow import ShadowRunner
from gateway.softlabels import LabelSet
from gateway.specialist import REFUSAL_REASONS, Decision, Specialist
from gateway.teacher_answer import (
    StreamRewriter,
    TeacherReading,
    fit_logprobs_to_client,
    read_completion,
    teacher_body,
)
from gateway.upstream import TeacherClient

log = logging.getLogger("apprentice.tasks")
FORCE_ROUTES = ("specialist", "teacher")
CLIENT_CLOSED = 499  # the status logged and counted for a stream its client left before the end
# OpenAI's limit on `stop` sequences (its 400 as continuedev/continue#2461 quotes it, code array_above_max_length).
MAX_STOP_SEQUENCES = 4


@dataclass(slots=True)
class TaskState:
    config: TaskConfig
    labels: LabelSet
    estimator: TokenEstimator = field(default_factory=TokenEstimator)
    requests: int = 0
    served: int = 0


# Content parts the specialist reads as text (an assistant's refusal is text too). It cannot see the others
# (images, audio, files), so a request that holds one goes to the teacher.
TEXT_PARTS = frozenset({"text", "refusal"})


def unsupported(request: ChatCompletionRequest) -> str | None:
    """Why the specialist cannot honour this request (it answers one label as plain text), or None."""
    if request.n not in (None, 1):
        return "n > 1"
    if request.tools or request.functions:
        return "tools"
    fmt = request.response_format
    if fmt is not None and fmt.get("type") not in (None, "text"):
        return "response_format"
    if request.audio is not None or any(m != "text" for m in request.modalities or ()):
        return "audio output"
    for message in request.messages:
        if isinstance(message.content, list) and any(p.type not in TEXT_PARTS for p in message.content):
            return "non-text input"
    return None


def token_cap(request: ChatCompletionRequest) -> int | None:
    """The client's max_tokens / max_completion_tokens (the smaller when both are given), or None."""
    caps = [c for c in (request.max_tokens, request.max_completion_tokens) if c is not None]
    return min(caps) if caps else None


def over_token_cap(request: ChatCompletionRequest, label: str) -> bool:
    """Whether `label` (about a token per four characters) may not fit in the client's token cap. The teacher
    would cut such an answer short (finish_reason "length"); the specialist cannot, so the teacher answers. The
    label's own length decides, not the task's mean answer length, which the teacher's longer declines raise."""
    cap = token_cap(request)
    return cap is not None and math.ceil(len(label) / 4) > cap


def cut_by_stop(request: ChatCompletionRequest, labels: Sequence[str]) -> bool:
    """Whether one of the client's stop sequences occurs in one of the task's labels. The teacher would end its
    answer there (the text OpenAI returns never holds a stop sequence), with finish_reason "stop": the specialist
    could not answer so, and distill must not read the fragment as the input's label."""
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    return any(stop and stop in label for stop in stops for label in labels)


class TaskService:
    def __init__(
        self,
        settings: Settings,
        teacher: TeacherClient,
        accounting: Accounting,
        sink: InferenceSink,
        models: ModelTable,
    ) -> None:
        self.settings = settings
        self.teacher = teacher
        self.accounting = accounting
        self.metrics = accounting.metrics
        self.sink = sink
        self.models = models
        self.states = {name: TaskState(cfg, LabelSet(cfg.labels)) for name, cfg in settings.tasks.items()}
        self.registry: RegistryReader | None = None
        self.shadow = ShadowRunner(
            self.metrics, max_concurrency=settings.shadow.max_concurrency, window=settings.shadow.window
        )
        for name, cfg in settings.tasks.items():
            self.metrics.target_agreement.labels(task=name).set(cfg.target_agreement)
            # Every series at 0 from the start: a refusal must be an increase for the dashboard to see it, and a
            # refusal is counted once per pointer, so its counter would otherwise appear at 1 and stay there.
            for result in ("loaded", *REFUSAL_REASONS):
                self.metrics.registry_loads.labels(task=name, result=result)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.states:
            return
        self.registry = RegistryReader.from_settings(self.settings, on_load=self._registry_event)
        await self.registry.start()

    async def aclose(self) -> None:
        if self.registry is not None:
            await self.registry.stop()
        await self.shadow.drain(timeout_s=5.0)

    def _registry_event(self, result: ReloadResult) -> None:
        # Called from the loading thread; prometheus metrics are thread-safe.
        if result.outcome in ("loaded", "refused"):
            self.metrics.registry_loads.labels(task=result.task, result=result.result).inc()
        # A state, not an event: a gateway that refused the current version at start-up has no increase to show.
        self.metrics.registry_refused.labels(task=result.task).set(1 if result.outcome == "refused" else 0)
        if result.outcome == "loaded" and result.version is not None:
            # Set here, in every worker that swaps, not at scrape time: the version swapped out must drop to 0,
            # or the info gauge names two versions as serving.
            info = self.metrics.specialist_info
            if result.previous is not None and result.previous != result.version:
                info.labels(task=result.task, version=result.previous).set(0)
            info.labels(task=result.task, version=result.version).set(1)
            if result.previous != result.version:
                self.shadow.reset(result.task)

    def readiness(self) -> dict[str, bool]:
        return {"registry": self.registry is not None} if self.states else {}

    def export_gauges(self) -> None:
        for name in self.states:
            specialist = self.registry.get(name) if self.registry else None
            if specialist is not None:
                self.metrics.specialist_info.labels(task=name, version=specialist.version).set(1)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, state in self.states.items():
            specialist = self.registry.get(name) if self.registry else None
            agreement, window = self.shadow.agreement(name)
            out.append(
                {
                    "task": name,
                    "teacher": state.config.teacher,
                    "labels": len(state.config.labels),
                    "target_agreement": state.config.target_agreement,
                    "shadow_rate": state.config.shadow_rate,
                    "specialist_version": specialist.version if specialist else None,
                    "tau": specialist.tau if specialist else None,
                    "live_agreement": agreement,
                    "live_agreement_window": window,
                    "requests_since_start": state.requests,
                    "offload_rate_since_start": state.served / state.requests if state.requests else None,
                }
            )
        return out

    async def reload(self, task: str) -> dict[str, Any]:
        if self.registry is None:
            raise InvalidRequest("no registry is running")
        result = await self.registry.areload(task)
        return {**dataclasses.asdict(result), "result": result.result}

    # -- one request --------------------------------------------------------------------------------------

    async def handle(
        self,
        task: TaskConfig,
        raw: dict[str, Any],
        request: ChatCompletionRequest,
        timer: Timer,
        *,
        force: str | None,
        is_admin: bool,
    ) -> Response:
        if force is not None:
            if not is_admin:
                raise PermissionDenied("x-apprentice-force-route is accepted only with an admin key.")
            if force not in FORCE_ROUTES:
                raise InvalidRequest(
                    f"x-apprentice-force-route must be one of {', '.join(FORCE_ROUTES)}, not {force!r}.",
                    param="x-apprentice-force-route",
                )
        # OpenAI's own refusals, word for word: the teacher would give them, so the specialist must too.
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options"
            )
        if request.top_logprobs is not None and not request.logprobs:
            raise InvalidRequest(
                "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.", param="top_logprobs"
            )
        if isinstance(request.stop, list) and len(request.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP_SEQUENCES}, "
                f"but got an array with length {len(request.stop)} instead.",
                param="stop",
                code="array_above_max_length",
            )
        if request.tool_choice is not None and request.tools is None:
            raise InvalidRequest(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                param="tool_choice",
            )
        state = self.states[task.name]
        state.requests += 1
        specialist = self.registry.get(task.name) if self.registry else None
        text = task_input_text(request, task.input)
        decision: Decision | None = None
        # Checked first, whatever else holds: distill passes over these answers, which reply to more than the
        # input text (tools, an image, a JSON format, a stop sequence inside a label, ...): marked whenever logged.
        if (
            text is None
            or unsupported(request) is not None
            or len(text) > task.max_input_chars
            or cut_by_stop(request, task.labels)
        ):
            reason = UNSUPPORTED_REASON
        elif force == "teacher":
            reason = "forced"
        elif specialist is None:
            reason = "no_specialist"
        else:
            # The distribution is only needed for logprobs; skipping it saves a sort per request.
            top_k = max(1, request.top_logprobs or 0) if request.logprobs else 0
            decision = specialist.decide(text, top_k=top_k)
            self.metrics.child(self.metrics.specialist_latency, task.name).observe(decision.inference_ms / 1000)
            self.metrics.child(self.metrics.router_score, task.name).observe(decision.score)
            capped = (
                decision.route == "specialist" and force != "specialist" and over_token_cap(request, decision.label)
            )
            if (decision.route == "specialist" and not capped) or force == "specialist":
                state.served += 1
                return self._specialist(state, specialist, decision, raw, request, text or "", timer, force)
            reason = UNSUPPORTED_REASON if capped else decision.reason
        try:
            return await self._teacher(state, raw, request, text or "", timer, reason, decision, specialist)
        except UpstreamError as exc:
            # Failed requests count too: a teacher outage must show as requests_total{status="502"}.
            self.metrics.requests.labels(model=task.name, route="teacher", reason=reason, status=str(exc.status)).inc()
            self.metrics.latency.labels(model=task.name, route="teacher").observe(timer.elapsed())
            raise

    def _headers(
        self, route: str, reason: str, decision: Decision | None, specialist: Specialist | None
    ) -> dict[str, str]:
        headers = {"x-apprentice-route": route, "x-apprentice-reason": reason}
        if decision is not None:
            headers["x-apprentice-score"] = f"{decision.score:.6f}"
        if specialist is not None:
            headers["x-apprentice-specialist-version"] = specialist.version
        return headers

    # -- the specialist answers -------------------------------------------------------------------------

    def _specialist(
        self,
        state: TaskState,
        specialist: Specialist,
        decision: Decision,
        raw: dict[str, Any],
        request: ChatCompletionRequest,
        text: str,
        timer: Timer,
        force: str | None,
    ) -> Response:
        task = state.config
        prompt, completion = state.estimator.estimate(request, decision.label)
        cap = token_cap(request)
        if cap is not None:  # a label that fits is reported within the cap, whatever the task's mean answer
            completion = min(completion, cap)
        answer = SpecialistAnswer(
            decision.label,
            specialist.version,
            task.name,
            prompt,
            completion,
            list(decision.label_distribution),
        )
        reason = "forced" if force == "specialist" and decision.route != "specialist" else "specialist"
        m = self.metrics
        m.child(m.tokens, task.name, "specialist", "prompt").inc(prompt)
        m.child(m.tokens, task.name, "specialist", "completion").inc(completion)
        m.child(m.cost, task.name, "specialist").inc(decision.cpu_s * self.accounting.prices.cpu_second_usd)
        avoided = self.accounting.prices.cost(task.teacher, prompt, completion)
        if avoided is not None:
            m.child(m.savings, task.name).inc(avoided)
        if task.shadow_rate > 0 and random.random() < task.shadow_rate:
            self.shadow.try_start(task.name, self._shadow_call(state, raw, request, text, decision, specialist.version))
        headers = answer_headers({}, self._headers("specialist", reason, decision, specialist))
        headers["x-apprentice-overhead-ms"] = timer.overhead_ms(0.0)
        self.accounting.finished(task.name, "specialist", reason, 200, timer, 0.0)
        if request.stream:
            return StreamingResponse(
                _iterate(stream_events(answer, request)),
                media_type="text/event-stream",
                headers={**headers, **SSE_HEADERS},
            )
        return Response(json.dumps(completion_body(answer, request)), media_type="application/json", headers=headers)

    async def _shadow_call(
        self,
        state: TaskState,
        raw: dict[str, Any],
        request: ChatCompletionRequest,
        text: str,
        decision: Decision,
        version: str,
    ) -> bool | None:
        task = state.config
        upstream = self.models.upstream_for(task.teacher)
        want = self.teacher.upstreams[upstream].config.supports_logprobs
        t0 = time.perf_counter()
        done = await self.teacher.complete(upstream, teacher_body(raw, task.teacher, want_logprobs=want, stream=False))
        data = done.chat_completion()
        reading = read_completion(data)
        # Shadow calls are real teacher spend: counted in the cost metric under their own route.
        self.accounting.teacher_cost(
            task.name, task.teacher, reading.prompt_tokens, reading.completion_tokens, route="shadow"
        )
        if reading.prompt_tokens is not None and reading.completion_tokens is not None:
            # Shadow answers are the only teacher answers to the traffic the specialist serves: the usage it
            # reports and the savings it is credited with are estimated from them too.
            state.estimator.observe(request, reading.prompt_tokens, reading.completion_tokens)
        self._record(state, raw, text, reading, data, "shadow", "shadow", decision, version, 200, t0)
        label = reading.label(state.labels)
        return None if label is None else label == decision.label

    # -- the teacher answers ----------------------------------------------------------------------------------

    async def _teacher(
        self,
        state: TaskState,
        raw: dict[str, Any],
        request: ChatCompletionRequest,
        text: str,
        timer: Timer,
        reason: str,
        decision: Decision | None,
        specialist: Specialist | None,
    ) -> Response:
        task = state.config
        upstream = self.models.upstream_for(task.teacher)
        want = self.teacher.upstreams[upstream].config.supports_logprobs
        body = teacher_body(raw, task.teacher, want_logprobs=want, stream=bool(request.stream))
        headers = self._headers("teacher", reason, decision, specialist)
        version = specialist.version if specialist else None
        t0 = time.perf_counter()
        if request.stream:
            stream = await self.teacher.open_stream(upstream, body)
            headers["x-apprentice-upstream"] = stream.upstream
            headers["x-apprentice-overhead-ms"] = timer.overhead_ms(stream.upstream_s)
            headers = answer_headers(stream.headers, headers)

            async def relay() -> AsyncIterator[bytes]:
                rewriter = StreamRewriter(request)
                # 499 (nginx's "client closed request") unless the stream runs to its end: a client that goes
                # away mid-answer leaves a partial text, which distill must not read as the teacher's answer.
                status = CLIENT_CLOSED
                try:
                    async for line in stream.lines():
                        out = rewriter.rewrite(line)
                        if out is not None:
                            yield out
                    status = 200
                except UpstreamError as exc:
                    status = exc.status
                    yield sse_error_event(exc)
                except Exception:  # a bug, not the client leaving (that is GeneratorExit / CancelledError)
                    status = 500
                    raise
                finally:
                    await stream.aclose()
                    reading = rewriter.reading
                    self._finish_teacher(state, request, reading, reason, timer, stream.upstream_s, status)
                    self._record(
                        state, raw, text, reading, reading.as_response(task.teacher), "teacher", reason,
                        decision, version, status, t0,
                    )  # fmt: skip

            return StreamingResponse(relay(), media_type="text/event-stream", headers={**headers, **SSE_HEADERS})

        done = await self.teacher.complete(upstream, body)
        data = done.chat_completion()
        reading = read_completion(data)
        self._record(state, raw, text, reading, data, "teacher", reason, decision, version, done.status, t0)
        data = json.loads(done.content)  # a fresh copy: the log keeps the teacher's logprobs
        data["model"] = request.model
        for choice in data.get("choices") or []:
            if isinstance(choice, dict):
                fit_logprobs_to_client(choice, request)
        headers["x-apprentice-upstream"] = done.upstream
        headers["x-apprentice-overhead-ms"] = timer.overhead_ms(done.upstream_s)
        headers = answer_headers(done.headers, headers)
        self._finish_teacher(state, request, reading, reason, timer, done.upstream_s, done.status)
        return Response(json.dumps(data), status_code=done.status, media_type="application/json", headers=headers)

    def _finish_teacher(
        self,
        state: TaskState,
        request: ChatCompletionRequest,
        reading: TeacherReading,
        reason: str,
        timer: Timer,
        upstream_s: float,
        status: int,
    ) -> None:
        task = state.config
        self.accounting.teacher_cost(task.name, task.teacher, reading.prompt_tokens, reading.completion_tokens)
        if reading.prompt_tokens is not None and reading.completion_tokens is not None:
            state.estimator.observe(request, reading.prompt_tokens, reading.completion_tokens)
        self.accounting.finished(task.name, "teacher", reason, status, timer, upstream_s)

    def _record(
        self,
        state: TaskState,
        raw: dict[str, Any],
        text: str,
        reading: TeacherReading,
        response: dict[str, Any],
        route: str,
        reason: str,
        decision: Decision | None,
        version: str | None,
        status: int,
        t0: float,
    ) -> None:
        task = state.config
        cost = self.accounting.prices.cost(task.teacher, reading.prompt_tokens, reading.completion_tokens)
        self.sink.submit(
            InferenceRecord(
                task=task.name,
                route="shadow" if route == "shadow" else "teacher",
                reason=reason,
                input_text=text,
                teacher_model=task.teacher,
                teacher_text=reading.text,
                teacher_label=reading.label(state.labels),
                label_distribution=reading.distribution(state.labels),
                request=raw,
                response=response,
                status=status,
                latency_ms=(time.perf_counter() - t0) * 1000,
                prompt_tokens=reading.prompt_tokens,
                completion_tokens=reading.completion_tokens,
                cost_usd=cost,
                score=decision.score if decision else None,
                specialist_label=decision.label if decision else None,
                specialist_version=version,
                finish_reason=reading.finish_reason,
            )
        )


async def _iterate(events: Any) -> AsyncIterator[bytes]:
    for event in events:
        yield event
