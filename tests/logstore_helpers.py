"""What the log writer's tests share: records to write, waiting on the writer, reading back, and a second
SQLite client holding the write lock (to the writer the store is then down)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from gateway.inference_log import InferenceRecord
from gateway.logstore import LogStore

PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=3"
FAST = {"flush_interval_s": 0.02, "retry_initial_s": 0.05, "retry_max_s": 0.2}


def make_record(i: int, **fields) -> InferenceRecord:
    values = {
        "task": "intent",
        "route": "teacher",
        "reason": "ood",
        "input_text": f"what is my balance {i}",
        "teacher_model": "gpt-4o-mini",
        "teacher_text": "balance",
        "teacher_label": "balance",
        "label_distribution": {"balance": 0.8, "transfer": 0.2},
        "request": {"messages": [{"role": "user", "content": f"what is my balance {i}"}]},
        "response": {"choices": [{"message": {"role": "assistant", "content": "balance"}}]},
        "status": 200,
        "latency_ms": 3.0,
        "created_at": 1_700_000_000.0 + i,
    }
    values.update(fields)
    return InferenceRecord(**values)


async def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.jsonl"))


def stored_ids(store: LogStore) -> list[str]:
    return [record.id for record in store.iter_records("intent")]


class SqliteLock:
    """Another client holding SQLite's write lock: to the writer the store is down ("database is locked")."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> SqliteLock:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()
