"""The durable inference-log writer: a bounded queue, batched writes off the event loop, a spool, a replayer.

Flow: `submit` (on the event loop) puts the record in a bounded asyncio queue and returns. A writer task takes
a batch (batch_size records, or whatever arrived within flush_interval_s) and inserts it in a worker thread.
If the store fails, the batch is appended to this process's spool file (fsync'd) and the writer spools
directly until the replayer, retrying with exponential backoff, has written every spooled record back.
If the queue is full, `submit` appends the record to the spool itself. `aclose` flushes the queue; what the
store cannot take stays in the spool, and the next `start` with the same spool_dir replays it.

Counters (`LogWriter.stats`, and `on_count(name, n)` for Prometheus): written (inserted from the queue),
spooled, replayed (inserted from the spool), rejected (refused by the store as bad data: set aside in
spool_dir/rejected-*.jsonl, never replayed), dropped (could not even be serialised: logged as an error;
stays 0 in practice), write_errors (failed store attempts), unspooled (records the spool could not take,
held in memory, at every attempt). `on_count` is called from the event loop and from
worker threads, so it must be thread-safe (prometheus_client counters are). Replays are idempotent on the
record id, so a record spooled twice is still stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc

from gateway.inference_log import InferenceRecord
from gateway.logstore_schema import SchemaTooNewError
from gateway.logstore_spool import Spool, encode_record
from gateway.redact import redact_record

if TYPE_CHECKING:
    from gateway.logstore import LogStore

log = logging.getLogger("apprentice.logstore")

CountHook = Callable[[str, int], None]


@dataclass
class LogWriterStats:
    """Cumulative record counts since the writer was created."""

    written: int = 0
    spooled: int = 0
    replayed: int = 0
    rejected: int = 0
    dropped: int = 0
    write_errors: int = 0
    # Records the spool could not take (disk full, unwritable), held in memory; counted at every attempt, so
    # it keeps rising while they wait for the store.
    unspooled: int = 0


def brief(exc: BaseException) -> str:
    """One line about a store error, without the SQL and its parameters (they hold user text)."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def _is_bad_record(exc: BaseException) -> bool:
    """Whether the store refused the data (this record) rather than failed (every record)."""
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError):
        return True
    # Raised by the driver or a serialiser for a value it cannot send (psycopg binds outside SQLAlchemy's
    # StatementError); an outage is an OSError or a DBAPIError, never these.
    if isinstance(exc, ValueError | TypeError) and not isinstance(exc, OSError):
        return True
    # A StatementError that is not a DBAPIError was raised while binding parameters (e.g. NaN in JSON).
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)


class LogWriter:
    """An InferenceSink that never blocks the event loop, never raises from submit, and never drops silently."""

    def __init__(
        self,
        store: LogStore,
        *,
        spool_dir: Path,
        queue_size: int = 10000,
        batch_size: int = 256,
        flush_interval_s: float = 0.25,
        redact: bool = False,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        close_timeout_s: float = 20.0,
        on_count: CountHook | None = None,
    ) -> None:
        self.store = store
        self.stats = LogWriterStats()
        self.on_count = on_count
        # Called on the event loop with the queue's depth whenever the writer takes or finishes a batch: every
        # worker keeps its own gauge current, not only the one a scrape happens to reach.
        self.on_depth: Callable[[int], None] | None = None
        self._spool = Spool(spool_dir)
        self._queue: asyncio.Queue[InferenceRecord | None] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._redact = redact
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._close_timeout_s = close_timeout_s
        self._stats_lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._held: list[InferenceRecord] = []  # neither stored nor spooled (spool unwritable); retried
        self._in_flight: list[InferenceRecord] = []
        self._store_ok = True
        self._migrated = False
        # True once a migration succeeded in this process: a later one that finds a newer schema is tolerated.
        self._schema_checked = False
        self._first_round = True  # the first replay round adopts spool files of dead processes
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replay_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._replayer_task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Records waiting in the queue (for the apprentice_log_queue_depth gauge)."""
        return self._queue.qsize()

    @property
    def store_available(self) -> bool:
        """False while the last store attempt failed and records go to the spool."""
        return self._store_ok

    # -- event-loop side ------------------------------------------------------------------------------

    def submit(self, record: InferenceRecord) -> None:
        """Queue a record; if the queue is full (or the writer closed), append it to the spool instead."""
        try:
            if not self._closed:
                try:
                    self._queue.put_nowait(record)
                    return
                except asyncio.QueueFull:
                    pass
            # Cheap enough for the loop: one small append, fsync deferred to the replayer's next round.
            self._spool_records(self._prepare([record]), fsync=False)
            self._replay_wake.set()
        except Exception:  # submit must never raise into a request handler
            log.exception("inference log: submit failed for record %s (task %s)", record.id, record.task)
            self._count("dropped", 1)

    async def start(self) -> None:
        """Migrate the store (or note it is down), start the writer and replayer, replay orphaned spools."""
        if self._writer_task is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._migrate)
        except SchemaTooNewError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store that is down must not stop the gateway
            log.error(
                "inference log: store %s unavailable at start (%s); spooling until it returns",
                self.store.url,
                brief(exc),
            )
            self._store_ok = False
            self._count("write_errors", 1)
        self._writer_task = asyncio.create_task(self._run_writer(), name="apprentice-log-writer")
        self._replayer_task = asyncio.create_task(self._run_replayer(), name="apprentice-log-replayer")
        self._replay_wake.set()  # the first round adopts spool files left by processes that are gone

    async def aclose(self) -> None:
        """Flush the queue, make one last replay attempt, and leave what the store cannot take in the spool."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout_s
        if self._writer_task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)  # wakes an idle writer; a busy one sees _closed after its batch
            done, _ = await asyncio.wait({self._writer_task}, timeout=self._close_timeout_s)
            if not done:
                # The store hangs. Spool the batch in flight too: replays are idempotent on the id.
                log.error("inference log: flush did not finish in %.0fs; spooling the rest", self._close_timeout_s)
                self._writer_task.cancel()
        leftovers = list(self._in_flight) + self._drain_queue()
        if leftovers:
            await asyncio.to_thread(self._spool_records, self._prepare(leftovers), fsync=True)
        if self._replayer_task is not None:
            self._stop.set()
            self._replay_wake.set()
            await asyncio.wait({self._replayer_task}, timeout=max(0.1, deadline - loop.time()))
            if self._pending():  # one last attempt, even if the store was down a moment ago
                final = asyncio.ensure_future(asyncio.to_thread(self._replay_round))
                final.add_done_callback(lambda done: done.cancelled() or done.exception())
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(final), max(0.1, deadline - loop.time()))
        await asyncio.to_thread(self._finish)

    def _report_depth(self) -> None:
        if self.on_depth is not None:
            try:
                self.on_depth(self._queue.qsize())
            except Exception:  # a metrics hook must never stop the writer
                log.exception("inference log: on_depth hook failed")

    def _drain_queue(self) -> list[InferenceRecord]:
        items: list[InferenceRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return items
            if item is not None:
                items.append(item)

    async def _run_writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = loop.time() + self._flush_interval_s
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._closed:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._in_flight = batch
            self._report_depth()
            prepared: list[list[InferenceRecord]] = []
            try:
                await asyncio.to_thread(self._prepare_and_write, batch, prepared)
            except Exception:  # a bug here must not stop the writer; keep the batch
                log.exception("inference log: writing a batch failed unexpectedly; holding it for the replayer")
                self._hold_after_failure(batch, prepared[0] if prepared else None)
            self._in_flight = []
            self._report_depth()
            if stop or (self._closed and self._queue.empty()):
                return

    async def _run_replayer(self) -> None:
        delay = self._retry_initial_s
        while not self._stop.is_set():
            if not self._pending():
                self._replay_wake.clear()
                if not self._pending():  # re-check: a wake between the test and the clear would be lost
                    await self._replay_wake.wait()  # aclose sets it too
                continue
            try:
                await asyncio.to_thread(self._replay_round)
            except Exception as exc:  # noqa: BLE001 - the store is down: retry later, with backoff
                self._store_ok = False
                # The next round migrates first: a store that comes back empty (a schema dropped and made anew,
                # a database restored from before the log existed) gets its tables back, without a restart.
                self._migrated = False
                self._count("write_errors", 1)
                log.warning(
                    "inference log: store %s still unavailable (%s); retry in %.1fs", self.store.url, brief(exc), delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, self._retry_max_s)
            else:
                delay = self._retry_initial_s

    def _wake_replayer(self) -> None:
        """Thread-safe wake-up of the replayer (the loop may be gone during a late shutdown)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._replay_wake.set)

    # -- worker-thread side ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        try:
            self.store.migrate()
        except SchemaTooNewError as exc:
            if not self._schema_checked:
                raise  # at start, or before this process ever reached the store: refused, as always
            # Migrating again after an outage, and a newer gateway moved the schema on meanwhile (a rolling
            # upgrade): keep writing as before the outage; this gateway refuses the store only at its next start.
            log.warning("inference log: %s; writing on until this gateway restarts", exc)
        self._migrated = True
        self._schema_checked = True

    def _pending(self) -> bool:
        with self._stats_lock:
            held = bool(self._held)
        return held or self._first_round or not self._store_ok or not self._migrated or self._spool.pending()

    def _prepare(self, records: Sequence[InferenceRecord]) -> list[InferenceRecord]:
        if not self._redact:
            return list(records)
        prepared = []
        for record in records:
            try:
                prepared.append(redact_record(record))
            except Exception:  # a record redaction cannot handle is dropped, loudly
                log.exception("inference log: DROPPED record %s (task %s): redaction failed", record.id, record.task)
                self._count("dropped", 1)
        return prepared

    def _hold_after_failure(self, batch: list[InferenceRecord], prepared: list[InferenceRecord] | None) -> None:
        """Keep a batch whose write failed for the replayer, as `_prepare` left it. With redaction on, a batch
        that failed before it was redacted is dropped (loudly, counted) rather than stored unredacted."""
        if prepared is None and self._redact:
            log.error("inference log: DROPPED %d records: redaction failed unexpectedly", len(batch))
            self._count("dropped", len(batch))
            return
        with self._stats_lock:
            self._held.extend(batch if prepared is None else prepared)
        self._wake_replayer()

    def _prepare_and_write(self, batch: list[InferenceRecord], prepared: list[list[InferenceRecord]]) -> None:
        """Redact, then write, in one thread hop. The redacted records are left in `prepared` for the caller:
        a batch held after a failure is held redacted, and what the replayer writes back never skips it."""
        prepared.append(self._prepare(batch))
        self._write_prepared(prepared[0])

    def _write_prepared(self, records: Sequence[InferenceRecord]) -> None:
        """Store records `_prepare` made ready; spool them if the store fails."""
        if self._store_ok:
            try:
                self._count("written", self._store_records(records))
                return
            except Exception as exc:  # noqa: BLE001 - any store failure means: spool, then replay
                self._store_ok = False
                self._count("write_errors", 1)
                log.warning(
                    "inference log: store %s failed (%s); spooling until it returns", self.store.url, brief(exc)
                )
        self._spool_records(records, fsync=True)
        self._wake_replayer()

    def _store_records(self, records: Sequence[InferenceRecord]) -> int:
        """Insert; if the store refuses the data, insert one by one and set the bad records aside.

        Raises when the store is unavailable. Returns how many records were inserted.
        """
        try:
            return self.store.insert_many(records)
        except Exception as exc:
            if not _is_bad_record(exc):
                raise
        inserted = 0
        for record in records:
            try:
                inserted += self.store.insert_many([record])
            except Exception as exc:
                if not _is_bad_record(exc):
                    raise
                self._reject(record, exc)
        return inserted

    def _reject(self, record: InferenceRecord, error: BaseException) -> None:
        try:
            self._spool.reject(record, error)
        except Exception:  # nowhere left to keep it
            log.exception("inference log: DROPPED record %s (task %s): refused by the store (%s) and "
                          "cannot be written to the rejected file", record.id, record.task, brief(error))  # fmt: skip
            self._count("dropped", 1)
            return
        log.error("inference log: record %s (task %s) refused by the store (%s); kept in %s/rejected-*.jsonl",
                  record.id, record.task, brief(error), self._spool.directory)  # fmt: skip
        self._count("rejected", 1)

    def _spool_records(self, records: Sequence[InferenceRecord], *, fsync: bool) -> None:
        encoded: list[tuple[InferenceRecord, bytes]] = []
        for record in records:
            try:
                encoded.append((record, encode_record(record)))
            except Exception as exc:  # noqa: BLE001 - the one legitimate drop, and it is loud
                log.error("inference log: DROPPED record %s (task %s): cannot be serialised (%s)",
                          record.id, record.task, exc)  # fmt: skip
                self._count("dropped", 1)
        try:
            self._spool.append([line for _, line in encoded], fsync=fsync)
        except Exception as exc:  # noqa: BLE001 - disk full, permissions: keep the records in memory
            log.error("inference log: cannot write the spool in %s (%s); holding %d records in memory",
                      self._spool.directory, exc, len(encoded))  # fmt: skip
            self._count("write_errors", 1)
            self._count("unspooled", len(encoded))
            with self._stats_lock:
                self._held.extend(record for record, _ in encoded)
            return
        self._count("spooled", len(encoded))

    def _replay_round(self) -> None:
        """Write back held and spooled records (own segments and orphans); raises if the store is down."""
        with self._replay_lock:
            if not self._migrated:
                try:
                    self._migrate()
                except Exception:
                    # The store is still down: records held in memory go to the spool if its disk has room
                    # now, and are counted as unspooled again if it still has none.
                    with self._stats_lock:
                        held, self._held = self._held, []
                    if held:
                        self._spool_records(held, fsync=True)
                    raise
            with self._stats_lock:
                held, self._held = self._held, []
            if held:
                try:
                    self._count("replayed", self._store_records(held))
                except Exception:
                    self._spool_records(held, fsync=True)
                    raise
            self._spool.sync()
            segments = self._spool.seal()
            if not segments and not held:
                self.store.ping()
            for segment in segments:
                replayed = sum(self._store_records(chunk) for chunk in self._spool.read(segment, 1000))
                self._spool.remove(segment)
                self._count("replayed", replayed)
                if segment.bad_lines:
                    log.error("inference log: DROPPED %d unreadable lines of %s", segment.bad_lines, segment.path)
                    self._count("dropped", segment.bad_lines)
            self._store_ok = True
            self._first_round = False

    def _finish(self) -> None:
        with self._stats_lock:
            held, self._held = self._held, []
        if held:
            self._spool_records(held, fsync=True)
            with self._stats_lock:
                lost, self._held = self._held, []
            for record in lost:
                log.error("inference log: DROPPED record %s (task %s) at shutdown: no store, no spool",
                          record.id, record.task)  # fmt: skip
            self._count("dropped", len(lost))
        self._spool.close()
        self.store.close()

    def _count(self, name: str, n: int) -> None:
        if n <= 0:
            return
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)
        if self.on_count is not None:
            try:
                self.on_count(name, n)
            except Exception:  # a metrics hook must not break logging
                log.exception("inference log: on_count hook failed")
