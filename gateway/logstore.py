"""The inference-log store: SQLAlchemy Core over SQLite (WAL, the embedded default) or PostgreSQL.

URLs: `sqlite:///path/inference.db` (the directory is created) or `postgresql+psycopg://user@host/db`
(`postgresql://` is taken to mean psycopg 3). A PostgreSQL schema other than the search_path default is
named with the apprentice-specific query parameter `?schema=NAME`: it is removed from the URL before
connecting, `migrate()` creates the schema if needed, and every statement is qualified with it (SQLAlchemy's
schema_translate_map), so several deployments can share one database.

Inserts are idempotent on the record id (ON CONFLICT DO NOTHING): a batch whose commit outcome was unknown
can be spooled and replayed without creating duplicates. The durable writer is `gateway.logstore_writer`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Text, and_, cast, create_engine, delete, event, func, inspect, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from gateway.durations import parse_duration
from gateway.inference_log import InferenceRecord, InferenceSink, MemorySink
from gateway.logstore_schema import apply_migrations, inference_log, json_dumps, record_to_row, row_to_record
from gateway.logstore_writer import LogWriter

if TYPE_CHECKING:
    from gateway.settings import LogConfig

__all__ = ["LogStore", "LogWriter", "create_sink", "prune_log"]


MIGRATE_LOCK_TIMEOUT_MS = 5000


class LogStore:
    """Synchronous access to the inference log; call from worker threads, never on the event loop."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 5000,
        connect_timeout_s: int = 5,
        chunk_size: int = 1000,
        create: bool = True,
    ) -> None:
        """`create=False` is for tools that read or prune an existing log: a SQLite file that does not exist is
        an error naming it, where a writer would create it (a mistyped path must not yield a fresh, empty log)."""
        if url.startswith("memory:"):
            raise ValueError("memory:// keeps nothing and has no store; use create_sink() for it")
        parsed = make_url(url)
        schema_param = parsed.query.get("schema")
        if isinstance(schema_param, tuple):
            raise ValueError("log store URL: give the schema parameter once")
        parsed = parsed.difference_update_query(["schema"])
        backend = parsed.get_backend_name()
        self.chunk_size = chunk_size
        self.schema: str | None = schema_param or None
        self.url = make_url(url).render_as_string(hide_password=True)  # for messages
        if backend == "sqlite":
            if self.schema:
                raise ValueError("log store URL: ?schema= applies to PostgreSQL only")
            database = parsed.database or ""
            if database in ("", ":memory:"):
                # Each pooled connection would get its own empty database; the writer's threads would not agree.
                raise ValueError("log store URL: in-memory SQLite is not supported; use memory:// or a file path")
            if not database.startswith("file:"):
                if not create and not Path(database).is_file():
                    raise ValueError(
                        f"there is no inference log at {database} (log.url); has a gateway with this config run?"
                    )
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, json_serializer=json_dumps, hide_parameters=True)
            _configure_sqlite(engine, busy_timeout_ms)
        elif backend == "postgresql":
            if parsed.drivername == "postgresql":
                parsed = parsed.set(drivername="postgresql+psycopg")
            # pre_ping: after an outage the pool holds dead connections; test each before use.
            engine = create_engine(
                parsed,
                json_serializer=json_dumps,
                pool_pre_ping=True,
                hide_parameters=True,  # errors are logged; parameters hold user text
                connect_args={"connect_timeout": connect_timeout_s},
            )
        else:
            raise ValueError(
                f"unsupported log store URL {self.url!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
            )
        self.dialect = backend
        self._base_engine = engine
        self._engine: Engine = (
            engine.execution_options(schema_translate_map={None: self.schema}) if self.schema else engine
        )
        insert_stmt = (sqlite_insert if backend == "sqlite" else pg_insert)(inference_log)
        self._insert = insert_stmt.on_conflict_do_nothing(index_elements=["id"])
        self._known_columns: set[str] | None = None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(apprentice_write=True)  # SQLite: BEGIN IMMEDIATE (see _configure_sqlite)
            with conn.begin():
                yield conn

    def migrate(self) -> int:
        """Bring the schema to the latest version; idempotent and safe when replicas start together."""
        with self._write() as conn:
            if self.dialect == "postgresql":
                # Waiting for a lock someone holds must not hold up a gateway's start: give up, and the writer
                # spools until a later round migrates.
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{MIGRATE_LOCK_TIMEOUT_MS}ms'")
                # A transaction-level advisory lock serialises concurrent migrators; it is released at commit.
                key = int.from_bytes(
                    hashlib.sha256(f"apprentice.inference_log:{self.schema or ''}".encode()).digest()[:8],
                    "big",
                    signed=True,
                )
                conn.execute(select(func.pg_advisory_xact_lock(key)))
                if self.schema:
                    quoted = conn.dialect.identifier_preparer.quote_identifier(self.schema)
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            return apply_migrations(conn)

    def insert_many(self, records: Sequence[InferenceRecord]) -> int:
        """Insert the records in one transaction; ids already present are skipped. Returns len(records)."""
        if not records:
            return 0
        rows = [record_to_row(record) for record in records]
        with self._write() as conn:
            conn.execute(self._insert, rows)
        return len(rows)

    def iter_records(
        self,
        task: str,
        since: float | None = None,
        until: float | None = None,
        *,
        bodies: bool = True,
        on_bad_row: Callable[[str, str], None] | None = None,
    ) -> Iterator[InferenceRecord]:
        """The task's records with since <= created_at < until, oldest first, read chunk_size rows at a time.

        Keyset paging on (created_at, id): each chunk is its own short read, so a long scan holds no
        transaction open (SQLite WAL could not checkpoint under one) and rows inserted meanwhile are seen.
        `bodies=False` leaves the request and response JSON unread (records carry `{}` and None): distill
        needs neither, and decoding them was a quarter of its time on 100k rows.

        With `on_bad_row`, a row whose label distribution is not a JSON object of numbers (a row edited by
        hand, or written by another tool: SQLite checks no JSON) is passed over: `on_bad_row(id, why)` is
        called and the scan goes on. Without it such a row raises, as a decoding error would.
        """
        table = inference_log
        # A log no writer of this version has opened yet lacks the newer columns: read what it has (the record
        # fields they hold read as None) rather than migrate it from a reader, which a read-only role cannot, and
        # which would make the older gateways still writing to it refuse it at their next start.
        present = self._columns()
        skipped = {"request", "response"} if not bodies else set()
        columns: list[Any] = [c for c in table.c if c.name in present and c.name not in skipped]
        if on_bad_row is not None:  # read as text and decode row by row, so one bad row does not fail its chunk
            columns = [cast(c, Text).label(c.name) if c.name == "label_distribution" else c for c in columns]
        window = [table.c.task == task]
        if since is not None:
            window.append(table.c.created_at >= since)
        if until is not None:
            window.append(table.c.created_at < until)
        after: tuple[float, str] | None = None
        while True:
            conditions = list(window)
            if after is not None:
                conditions.append(table.c.created_at >= after[0])
                conditions.append(
                    or_(
                        table.c.created_at > after[0],
                        and_(table.c.created_at == after[0], table.c.id > after[1]),
                    )
                )
            statement = (
                select(*columns).where(*conditions).order_by(table.c.created_at, table.c.id).limit(self.chunk_size)
            )
            with self._engine.connect() as conn:
                rows = conn.execute(statement).mappings().all()
            for row in rows:
                values = dict(row) if bodies else {**row, "request": {}, "response": None}
                if on_bad_row is not None:
                    try:
                        values["label_distribution"] = _distribution(values["label_distribution"])
                    except ValueError as exc:
                        on_bad_row(str(row["id"]), f"label_distribution {exc}")
                        continue
                yield row_to_record(values)
            if len(rows) < self.chunk_size:
                return
            after = (rows[-1]["created_at"], rows[-1]["id"])

    def _columns(self) -> set[str]:
        """The inference_log columns the database has (all of them once it has been migrated)."""
        if self._known_columns is None or len(self._known_columns) < len(inference_log.c):
            with self._engine.connect() as conn:
                found = {c["name"] for c in inspect(conn).get_columns("inference_log", schema=self.schema)}
            self._known_columns = found or set(inference_log.c.keys())  # no table: let the query name the error
        return self._known_columns

    def has_table(self) -> bool:
        with self._engine.connect() as conn:
            return bool(inspect(conn).has_table("inference_log", schema=self.schema))

    def count(self, task: str | None = None) -> int:
        """Number of records, of one task or of all."""
        statement = select(func.count()).select_from(inference_log)
        if task is not None:
            statement = statement.where(inference_log.c.task == task)
        with self._engine.connect() as conn:
            return int(conn.execute(statement).scalar_one())

    def prune(self, older_than_s: float) -> int:
        """Delete records created more than older_than_s seconds ago; return how many went."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        cutoff = time.time() - older_than_s
        with self._write() as conn:
            result = conn.execute(delete(inference_log).where(inference_log.c.created_at < cutoff))
            return int(result.rowcount)

    def ping(self) -> None:
        """Raise unless the log table can be read (the writer's probe while the store is down)."""
        with self._engine.connect() as conn:
            conn.execute(select(inference_log.c.id).limit(0)).all()

    def close(self) -> None:
        """Close pooled connections (the store can still be used afterwards; it reconnects)."""
        self._base_engine.dispose()


def _distribution(raw: str | None) -> dict[str, float] | None:
    """A label distribution read as text: None, or a JSON object of label -> number; else ValueError."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"is a JSON {type(value).__name__}, not an object")
    out: dict[str, float] = {}
    for label, p in value.items():
        try:
            if isinstance(p, bool | dict | list):
                raise TypeError
            out[str(label)] = float(p)  # a number, or a number written as a string
        except (TypeError, ValueError):
            raise ValueError(f"gives {label!r} the value {p!r}, not a number") from None
    return out


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    """Switch the file to WAL (persistent, so usually a no-op read). Switching needs an exclusive lock and
    SQLite does not wait on busy_timeout for it: several processes opening a new file at once saw "database
    is locked" (seen in CI with four concurrent migrators), so retry until the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy issue BEGIN itself (below): pysqlite's own implicit transactions do not cover DDL,
        # and migrations must be atomic.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            _enable_wal(cursor, busy_timeout_ms / 1000)
            # In WAL mode NORMAL loses at most the last commits on power loss, never corrupts; FULL would
            # fsync every batch.
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that reads first and writes later
        # fails at once with SQLITE_BUSY instead of waiting out busy_timeout.
        immediate = conn.get_execution_options().get("apprentice_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_sink(cfg: LogConfig) -> InferenceSink:
    """The sink a LogConfig asks for: `memory://` keeps records in a list; any other URL is a durable writer."""
    if cfg.url.startswith("memory:"):
        return MemorySink()
    return LogWriter(
        LogStore(cfg.url),
        spool_dir=cfg.spool_dir,
        queue_size=cfg.queue_size,
        batch_size=cfg.batch_size,
        flush_interval_s=cfg.flush_interval_s,
        redact=cfg.redact,
    )


def prune_log(url: str, older_than: str) -> int:
    """`apprentice log prune --older-than DURATION`: delete older records, return how many."""
    seconds = parse_duration(older_than)
    store = LogStore(url, create=False)
    try:
        # Never migrated from here: an older gateway still writing to this log would refuse it at its next start.
        if not store.has_table():  # a store that was never written to: nothing to remove
            return 0
        return store.prune(seconds)
    finally:
        store.close()
