"""Shadow traffic: a sampled share of specialist-served requests also goes to the teacher, in the background.

It never delays the client: at most `max_concurrency` shadow calls run at once and any beyond that are
skipped and counted. Agreement over a sliding window per task is the live quality signal; the window starts
empty whenever a new version serves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import Coroutine
from typing import Any

from gateway.metrics import Metrics

log = logging.getLogger("apprentice.shadow")


class ShadowRunner:
    def __init__(self, metrics: Metrics, *, max_concurrency: int, window: int) -> None:
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.window = window
        self._tasks: set[asyncio.Task[None]] = set()
        self._agreement: dict[str, deque[bool]] = {}
        # reset() comes from the registry's loading thread, answers from the event loop.
        self._lock = threading.Lock()

    def try_start(self, task: str, job: Coroutine[Any, Any, bool | None]) -> bool:
        """Starts `job` (returns agreement, or None if the teacher gave no usable answer) unless at the bound."""
        if len(self._tasks) >= self.max_concurrency:
            job.close()
            self.metrics.shadow.labels(task=task, outcome="skipped").inc()
            return False
        running = asyncio.create_task(self._run(task, job))
        self._tasks.add(running)
        running.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, task: str, job: Coroutine[Any, Any, bool | None]) -> None:
        try:
            agreed = await job
        except Exception as exc:  # noqa: BLE001 - a failed shadow call must never surface to a client
            log.warning("shadow request for task %s failed: %r", task, exc)
            self.metrics.shadow.labels(task=task, outcome="error").inc()
            return
        if agreed is None:
            self.metrics.shadow.labels(task=task, outcome="no_label").inc()
            return
        self.metrics.shadow.labels(task=task, outcome="agree" if agreed else "disagree").inc()
        with self._lock:
            window = self._agreement.setdefault(task, deque(maxlen=self.window))
            window.append(agreed)
            self._export(task, window)

    def reset(self, task: str) -> None:
        """A new version serves: its agreement starts empty, not with the last version's answers (after a
        rollback the alert would otherwise keep firing on the bad version's disagreements)."""
        with self._lock:
            window = self._agreement.setdefault(task, deque(maxlen=self.window))
            window.clear()
            self._export(task, window)

    def _export(self, task: str, window: deque[bool]) -> None:
        agreeing = sum(window)
        self.metrics.shadow_agreement.labels(task=task).set(agreeing / len(window) if window else math.nan)
        self.metrics.shadow_window.labels(task=task).set(len(window))
        self.metrics.shadow_window_agreeing.labels(task=task).set(agreeing)

    def agreement(self, task: str) -> tuple[float | None, int]:
        with self._lock:
            window = self._agreement.get(task)
            if not window:
                return None, 0
            return sum(window) / len(window), len(window)

    async def drain(self, timeout_s: float) -> None:
        """Lets running shadow calls finish (their records matter) for at most `timeout_s`."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
