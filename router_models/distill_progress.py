"""Timed distill steps with rich progress bars on stderr (stdout stays for the CLI's one-line verdict)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

Advance = Callable[[int], None]


class Steps:
    """`with Steps() as steps: with steps.step("train", total=60) as advance: ...` records seconds per step
    in `steps.timings` and, when enabled, shows a spinner or a bar per step."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.timings: dict[str, float] = {}
        self._progress: Any = None

    def __enter__(self) -> Steps:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Advance]:
        start = time.perf_counter()
        task_id = self._progress.add_task(name, total=total) if self._progress is not None else None

        def advance(n: int) -> None:
            if task_id is not None:
                self._progress.advance(task_id, n)

        try:
            yield advance
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
            if task_id is not None:
                # A step that stopped early (converged) still ends as a full bar.
                done = self._progress.tasks[task_id].completed if total is None else total
                self._progress.update(task_id, total=total or max(done, 1), completed=total or max(done, 1))
