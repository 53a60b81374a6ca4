"""The writer's on-disk spool: JSON-lines segments that hold records the store could not take (yet).

Each process writes its own segments, `spool-<pid>-<start ms>-<random>-<n>.jsonl`, and holds an exclusive
flock on each until it has replayed or closed it. The kernel drops the lock when a process dies, however it
dies, so a segment that can be locked is an orphan: any writer sharing the spool directory adopts and
replays it. The spool directory must be on a local file system (flock over NFS is not reliable).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.inference_log import InferenceRecord
from gateway.logstore_schema import json_dumps, record_to_row, row_to_record

log = logging.getLogger("apprentice.logstore")

SPOOL_GLOB = "spool-*.jsonl"


def encode_record(record: InferenceRecord) -> bytes:
    """One spool line. ASCII-only JSON, so lone surrogates in user text cannot break the encoding."""
    return json_dumps(record_to_row(record)).encode("ascii") + b"\n"


@dataclass(eq=False)
class Segment:
    """One spool file this process holds the lock on."""

    path: Path
    file: BinaryIO
    lines: int = 0
    bad_lines: int = 0


def _write_whole(segment: Segment, data: bytes) -> None:
    """Append all of `data` or none of it: a write cut short (a full disk) is cut back off the file, so the
    next append does not continue a torn line and lose its first record with it."""
    fd = segment.file.fileno()
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.ftruncate(fd, start)
        raise


def _lock(file: BinaryIO) -> bool:
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    """Append, seal, adopt, read back and remove spool segments; every method is thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._prefix = f"spool-{os.getpid()}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"
        self._lock = threading.Lock()
        self._seq = 0
        self._current: Segment | None = None
        self._sealed: list[Segment] = []
        self._unsynced = False
        self._closed = False
        self._unreadable: set[Path] = set()  # paths that cannot be replayed, skipped after one error

    def _open_segment(self) -> Segment:
        self._seq += 1
        path = self.directory / f"{self._prefix}-{self._seq}.jsonl"
        # Locked under a name other writers do not scan, then renamed: under its own name the file would be
        # unlocked for a moment, and another writer could adopt it as an orphan while this one appends to it.
        hidden = self.directory / f".{path.name}.new"
        file = open(hidden, "xb", buffering=0)  # noqa: SIM115 - the segment outlives this call
        if not _lock(file):
            file.close()
            raise OSError(f"cannot lock the new spool file {hidden}")
        os.rename(hidden, path)
        self._fsync_directory()  # the new name must survive a crash as well as its contents
        return Segment(path, file)

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append(self, lines: Sequence[bytes], *, fsync: bool) -> None:
        """Append encoded records to this process's current segment; fsync unless the caller defers it."""
        if not lines:
            return
        data = b"".join(lines)
        with self._lock:
            if self._closed:
                # After close (a late submit): a segment of its own, closed at once, replayed by the next start.
                segment = self._open_segment()
                try:
                    _write_whole(segment, data)
                    os.fsync(segment.file.fileno())
                finally:
                    segment.file.close()
                return
            if self._current is None:
                self._current = self._open_segment()
            segment = self._current
            _write_whole(segment, data)
            segment.lines += len(lines)
            if fsync:
                os.fsync(segment.file.fileno())
                self._unsynced = False
            else:
                self._unsynced = True

    def sync(self) -> None:
        """fsync appends that were deferred (the queue-full path appends on the event loop, without fsync)."""
        with self._lock:
            if self._unsynced and self._current is not None:
                os.fsync(self._current.file.fileno())
            self._unsynced = False

    def pending(self) -> bool:
        """Whether this process holds records in the spool."""
        with self._lock:
            return bool(self._sealed) or (self._current is not None and self._current.lines > 0)

    def seal(self) -> list[Segment]:
        """Close the current segment for appends and adopt orphans; return every segment to replay."""
        with self._lock:
            if self._current is not None:
                os.fsync(self._current.file.fileno())
                self._unsynced = False
                self._sealed.append(self._current)
                self._current = None
            owned = {segment.path for segment in self._sealed}
            for path in sorted(self.directory.glob(SPOOL_GLOB)):
                if path not in owned:
                    adopted = self._adopt(path)
                    if adopted is not None:
                        self._sealed.append(adopted)
            return list(self._sealed)

    def _adopt(self, path: Path) -> Segment | None:
        if path in self._unreadable:
            return None
        try:
            file = open(path, "rb")  # noqa: SIM115 - kept open to hold the lock until the segment is replayed
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory or a file this process may not read: not ours to replay
            self._unreadable.add(path)
            log.error("inference log: cannot open spool file %s (%s); left where it is", path, exc)
            return None
        if not _lock(file):
            file.close()  # a live process owns it
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            # Another writer replayed and removed it between our open and our lock.
            file.close()
            return None
        log.info("inference log: adopting spool file %s left by a process that is gone", path.name)
        return Segment(path, file)

    def read(self, segment: Segment, chunk: int, max_bytes: int = 32 << 20) -> Iterator[list[InferenceRecord]]:
        """The segment's records in chunks of at most `chunk` records and about `max_bytes` of lines (a record
        of 1 MB of text took 2 MB of memory decoded: a thousand of them at start-up could exhaust a pod's memory
        on every start); a torn or corrupt line is counted in segment.bad_lines."""
        segment.bad_lines = 0
        batch: list[InferenceRecord] = []
        size = 0
        try:
            reader = open(segment.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # replayed and removed by another writer meanwhile: nothing left to do
            return
        with reader:
            for number, line in enumerate(reader, start=1):
                if not line.strip():
                    continue
                try:
                    batch.append(row_to_record(json.loads(line)))
                except Exception as exc:  # noqa: BLE001 - any line that is not a record; RecursionError too
                    segment.bad_lines += 1
                    log.error("inference log: unreadable line %d in %s (%s)", number, segment.path.name, exc)
                    continue
                size += len(line)
                if len(batch) >= chunk or size >= max_bytes:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    def remove(self, segment: Segment) -> None:
        """Delete a replayed segment and let go of it."""
        with self._lock:
            segment.path.unlink(missing_ok=True)
            segment.file.close()
            if segment in self._sealed:  # close() may have released it already (shutdown timeout)
                self._sealed.remove(segment)

    def reject(self, record: InferenceRecord, error: BaseException) -> None:
        """Set aside a record the store refuses (bad data, not an outage): kept on disk, never replayed."""
        line = json_dumps({"error": repr(error), "record": record_to_row(record)})
        path = self.directory / f"rejected-{self._prefix}.jsonl"
        with self._lock, open(path, "ab") as file:
            file.write(line.encode("ascii") + b"\n")
            file.flush()
            os.fsync(file.fileno())

    def close(self) -> None:
        """fsync and release every segment; what was not replayed stays on disk for the next start."""
        with self._lock:
            if self._current is not None:
                os.fsync(self._current.file.fileno())
                self._sealed.append(self._current)
                self._current = None
            for segment in self._sealed:
                segment.file.close()
            self._sealed.clear()
            self._closed = True
