"""The registry reader: keeps each task's current specialist loaded and hot-swaps it when `current` moves.

Layout (written by router_models.registry): <registry>/<task>/current holds a version name, replaced
atomically; the version lives in <registry>/<task>/versions/<version>/ (see gateway.specialist).

API (the app's lifespan and request path)::

    reader = RegistryReader(registry_dir, {"intent": labels}, poll_interval_s=2.0, on_load=callback)
    # or RegistryReader.from_settings(settings, on_load=callback)
    await reader.start()         # first load (in a thread), then the polling task
    sp = reader.get("intent")    # Specialist | None (None: no specialist yet -> reason "no_specialist")
    result = await reader.areload("intent")   # admin endpoint; KeyError for an unknown task
    await reader.stop()          # lifespan shutdown
    reader.loads_ok["intent"], reader.load_failures[("intent", "sha_mismatch")], reader.last_result("intent")

`get` is a plain dict read and a swap replaces one reference, so a request that already holds a Specialist
finishes on it whatever happens meanwhile. Loading (file reads, hashing, onnxruntime session creation) runs
in a worker thread, never on the event loop.

A refused version (see gateway.specialist.REFUSAL_REASONS) is logged on logger "apprentice.registry", counted,
reported to `on_load`, and the previous version keeps serving. A broken artifact is not retried until the
pointer file changes (new inode, mtime or size) or an admin reload asks: it costs one attempt, not one per
poll. A refusal that may pass by itself is tried again, pointer unchanged, after a delay that doubles from
the poll interval up to RETRY_MAX_S: a version that is not there yet (`missing_file`: a synced registry may
copy `current` before the version), or a pointer that cannot be read just now (`bad_pointer` from an OS error);
such repeats are logged and counted once. A `current` that disappears keeps the loaded version serving (a
shared volume may blink); to take a specialist out of service, point `current` at another version.

`on_load(result)` is called from the loading thread for every load and every new refusal, and when a refusal
ends without a load (the pointer moved back to the serving version, or went away: outcomes "unchanged",
"no_pointer"); `result.result` is the metric label: "loaded" or the refusal reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gateway.specialist import RefusalReason, Specialist, SpecialistLoadError

if TYPE_CHECKING:
    from gateway.settings import Settings

logger = logging.getLogger("apprentice.registry")

POINTER_FILE = "current"
VERSIONS_DIR = "versions"
# Same rule as Manifest.version: the pointer's content becomes a path, so nothing like "../x" gets through.
_VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Outcome = Literal["loaded", "unchanged", "refused", "no_pointer"]
# What identifies one state of the pointer file: os.replace gives a new inode even within one mtime tick.
_PointerStamp = tuple[int, int, int]
_UNREADABLE: _PointerStamp = (-1, -1, -1)  # the stamp of a pointer that could not be stat'ed
# The longest wait between two tries of a refusal that may pass by itself (a version not there yet).
RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class _Retry:
    stamp: _PointerStamp  # the pointer's state when it was refused
    due: float  # time.monotonic() of the next try
    delay: float


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of checking one task's pointer.

    version: what `current` names (None without a pointer); serving: the version answering afterwards;
    previous: the version that answered before; reason/detail: why a version was refused.
    """

    task: str
    outcome: Outcome
    version: str | None
    serving: str | None
    previous: str | None
    reason: RefusalReason | None = None
    detail: str = ""

    @property
    def result(self) -> str:
        """The metric label: "loaded", the refusal reason, or the outcome."""
        return self.reason if self.reason is not None else self.outcome


class RegistryReader:
    """Loads each configured task's `current` specialist and swaps it when the pointer changes."""

    def __init__(
        self,
        registry_dir: Path,
        tasks: Mapping[str, Sequence[str]],
        poll_interval_s: float = 2.0,
        on_load: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        self.registry_dir = Path(registry_dir)
        self.poll_interval_s = poll_interval_s
        self.loads_ok: Counter[str] = Counter()
        self.load_failures: Counter[tuple[str, RefusalReason]] = Counter()
        self._labels = {task: list(labels) for task, labels in tasks.items()}
        self._on_load = on_load
        self._current: dict[str, Specialist] = {}
        # Last pointer state acted on per task; a poll that sees the same stamp does nothing.
        self._stamps: dict[str, _PointerStamp | None] = {}
        # Tasks to check again, pointer unchanged or not, once due: a refusal that may pass by itself.
        self._retry: dict[str, _Retry] = {}
        self._last: dict[str, ReloadResult] = {}
        # Per task, so the poller and an admin reload never load the same task twice at once.
        self._locks = {task: threading.Lock() for task in tasks}
        self._poller: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, on_load: Callable[[ReloadResult], None] | None = None) -> RegistryReader:
        return cls(
            settings.registry.path,
            {name: task.labels for name, task in settings.tasks.items()},
            poll_interval_s=settings.registry.poll_interval_s,
            on_load=on_load,
        )

    @property
    def tasks(self) -> list[str]:
        return list(self._labels)

    def get(self, task: str) -> Specialist | None:
        """The specialist serving `task` now, or None. Lock-free: one dict read."""
        return self._current.get(task)

    def last_result(self, task: str) -> ReloadResult | None:
        """The most recent check of `task` that did something (load, refusal, pointer gone)."""
        return self._last.get(task)

    def task_dir(self, task: str) -> Path:
        return self.registry_dir / task

    # -- checking and loading (blocking: call from a thread) ---------------------------------------------

    def poll(self) -> list[ReloadResult]:
        """Check every task's pointer once; returns what changed. Never raises."""
        results = []
        for task in self._labels:
            try:
                result = self._check(task, force=False)
            except Exception:  # a bug in one task's check must not stop the poller or the other tasks
                logger.exception("task=%s registry check failed", task)
                continue
            if result is not None:
                results.append(result)
        return results

    def reload(self, task: str) -> ReloadResult:
        """Re-read `task`'s pointer now, retrying a version refused before. KeyError for an unknown task."""
        if task not in self._labels:
            raise KeyError(task)
        result = self._check(task, force=True)
        assert result is not None  # a forced check always reports
        return result

    def _check(self, task: str, *, force: bool) -> ReloadResult | None:
        with self._locks[task]:
            pointer = self.task_dir(task) / POINTER_FILE
            serving = self._current.get(task)
            previous = serving.version if serving is not None else None
            retry = self._retry.get(task)
            try:
                stamp = _stamp(pointer)
            except OSError as exc:  # the task directory cannot be read (permissions, a stale mount)
                stamp = _UNREADABLE
                why = f"cannot read {pointer}: {exc.strerror or exc}"
            # A pending retry waits until due, unless the pointer has moved since (then it is read at once).
            if not force and retry is not None and retry.stamp == stamp and time.monotonic() < retry.due:
                return None
            self._retry.pop(task, None)
            if stamp == _UNREADABLE:
                return self._refused_for_now(task, _UNREADABLE, retry, force, previous, "bad_pointer", why)
            if not force and retry is None and task in self._stamps and stamp == self._stamps[task]:
                return None
            self._stamps[task] = stamp
            if stamp is None:
                return self._no_pointer(task, previous)
            try:
                version = pointer.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                # replaced or removed between stat and read: the next poll sees the new stamp
                self._stamps.pop(task, None)
                return ReloadResult(task, "unchanged", None, previous, previous)
            except OSError as exc:  # a stale NFS handle, an I/O error: tried again
                why = f"cannot read {pointer}: {exc.strerror or exc}"
                return self._refused_for_now(task, stamp, retry, force, previous, "bad_pointer", why)
            except UnicodeDecodeError as exc:
                return self._refused(task, None, previous, SpecialistLoadError("bad_pointer", str(exc)))
            if serving is not None and version == serving.version:
                unchanged = ReloadResult(task, "unchanged", version, previous, previous)
                # Pointed back at the serving version after a refusal: reported, so the refusal is over.
                refused = (last := self._last.get(task)) is not None and last.outcome == "refused"
                return self._report(unchanged) if refused else unchanged
            quiet = not force and retry is not None and retry.stamp == stamp
            result = self._load(task, version, previous, quiet=quiet)
            if result.reason == "missing_file":
                # Tried again: a synced registry (rsync, an object-store sync) may copy `current` before the
                # version's directory, and the pointer will not change again when it arrives.
                self._schedule_retry(task, stamp, retry)
            return result

    def _refused_for_now(
        self,
        task: str,
        stamp: _PointerStamp,
        retry: _Retry | None,
        force: bool,
        previous: str | None,
        reason: RefusalReason,
        why: str,
    ) -> ReloadResult:
        """A refusal that may pass by itself (the pointer cannot be read just now): tried again later."""
        quiet = not force and retry is not None and retry.stamp == stamp
        self._schedule_retry(task, stamp, retry)
        return self._refused(task, None, previous, SpecialistLoadError(reason, why), quiet=quiet)

    def _schedule_retry(self, task: str, stamp: _PointerStamp, retry: _Retry | None) -> None:
        """Check `task` again after a delay that doubles from the poll interval to RETRY_MAX_S while the same
        pointer keeps failing: a load is hashing and an onnxruntime session, not a stat."""
        delay = self.poll_interval_s if retry is None or retry.stamp != stamp else retry.delay * 2
        delay = min(delay, max(RETRY_MAX_S, self.poll_interval_s))
        self._retry[task] = _Retry(stamp, time.monotonic() + delay, delay)

    def _no_pointer(self, task: str, previous: str | None) -> ReloadResult:
        result = ReloadResult(task, "no_pointer", None, previous, previous)
        if previous is not None:
            logger.warning("task=%s %s pointer is gone; still serving version=%s", task, POINTER_FILE, previous)
        else:
            logger.info("task=%s has no specialist yet (no %s)", task, self.task_dir(task) / POINTER_FILE)
        return self._report(result)

    def _load(self, task: str, version: str, previous: str | None, *, quiet: bool = False) -> ReloadResult:
        try:
            if not _VERSION_NAME.fullmatch(version):
                raise SpecialistLoadError("bad_pointer", f"{POINTER_FILE} holds {version[:80]!r}, not a version")
            version_dir = self.task_dir(task) / VERSIONS_DIR / version
            specialist = Specialist.load(version_dir, task=task, labels=self._labels[task])
        except SpecialistLoadError as exc:
            return self._refused(task, version, previous, exc, quiet=quiet)
        self._current[task] = specialist  # the swap: one reference replaced
        result = ReloadResult(task, "loaded", version, version, previous)
        self.loads_ok[task] += 1
        logger.info(
            "task=%s version=%s loaded (tau=%.4f, previous=%s)", task, version, specialist.tau, previous or "none"
        )
        return self._report(result)

    def _refused(
        self, task: str, version: str | None, previous: str | None, exc: SpecialistLoadError, *, quiet: bool = False
    ) -> ReloadResult:
        """`quiet`: a poll's retry of the same pointer (a version not there yet, a directory it cannot read)."""
        result = ReloadResult(task, "refused", version, previous, previous, exc.reason, exc.detail)
        if quiet and self._last.get(task) == result:
            # The same refusal at a retry: counted and logged once, not at every poll.
            logger.debug("task=%s version=%s still refused reason=%s", task, version, exc.reason)
            return result
        self.load_failures[(task, exc.reason)] += 1
        logger.warning(
            "task=%s version=%s refused reason=%s: %s; still serving %s",
            task, version, exc.reason, exc.detail, previous or "no specialist",
        )  # fmt: skip
        return self._report(result)

    def _report(self, result: ReloadResult) -> ReloadResult:
        self._last[result.task] = result
        self._notify(result)
        return result

    def _notify(self, result: ReloadResult) -> None:
        if self._on_load is None:
            return
        try:
            self._on_load(result)
        except Exception:  # a metrics callback must never undo or block a swap
            logger.exception("task=%s on_load callback failed", result.task)

    # -- asyncio integration -------------------------------------------------------------------------------

    async def areload(self, task: str) -> ReloadResult:
        """`reload` in a worker thread, for the admin endpoint."""
        if task not in self._labels:
            raise KeyError(task)
        return await asyncio.to_thread(self.reload, task)

    async def run(self) -> None:
        """Poll forever (until cancelled): check all pointers in a thread, then sleep poll_interval_s."""
        while True:
            await asyncio.to_thread(self.poll)
            await asyncio.sleep(self.poll_interval_s)

    async def start(self) -> None:
        """Load what the registry holds now, then poll in a background task. Idempotent."""
        if self._poller is not None:
            return
        await asyncio.to_thread(self.poll)
        self._poller = asyncio.create_task(self.run(), name="apprentice-registry-poller")

    async def stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is None:
            return
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


def _stamp(pointer: Path) -> _PointerStamp | None:
    try:
        st = os.stat(pointer)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
