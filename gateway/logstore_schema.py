"""The inference-log table, its explicit migrations, and the record <-> row conversion.

Migrations are an ordered list of plain functions; `apply_migrations` runs the ones a database has not seen,
inside the caller's transaction (which holds the lock that keeps two replicas apart), and records each in
`apprentice_schema_version`. To change the schema, append a function: never edit one that has shipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Double,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    insert,
    select,
)

from gateway.inference_log import InferenceRecord

metadata = MetaData()

schema_version = Table(
    "apprentice_schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("applied_at", Double, nullable=False),
)

# Version 1 of the inference_log columns, frozen: migration 1 creates exactly these, whatever the live table
# has grown into since. Every InferenceRecord field is a column of the same name. JSON (not PostgreSQL's
# JSONB) because JSONB refuses the \u0000 escape a user's text may contain; none_as_null keeps a missing
# response SQL NULL rather than JSON null.
_JSON = JSON(none_as_null=True)
_V1_COLUMNS: tuple[tuple[str, Any, bool], ...] = (  # name, type, nullable
    ("created_at", Double, False),
    ("task", Text, False),
    ("route", Text, False),
    ("reason", Text, False),
    ("input_text", Text, False),
    ("input_sha256", Text, False),
    ("teacher_model", Text, False),
    ("teacher_text", Text, False),
    ("teacher_label", Text, True),
    ("label_distribution", _JSON, True),
    ("request", _JSON, False),
    ("response", _JSON, True),
    ("status", Integer, False),
    ("latency_ms", Double, False),
    ("prompt_tokens", Integer, True),
    ("completion_tokens", Integer, True),
    ("cost_usd", Double, True),
    ("score", Double, True),
    ("specialist_label", Text, True),
    ("specialist_version", Text, True),
)


def _inference_log_v1(meta: MetaData) -> Table:
    table = Table(
        "inference_log",
        meta,
        Column("id", Text, primary_key=True),
        *(Column(name, kind, nullable=nullable) for name, kind, nullable in _V1_COLUMNS),
    )
    Index("ix_inference_log_task_created_at", table.c.task, table.c.created_at)
    Index("ix_inference_log_input_sha256", table.c.input_sha256)
    return table


# The live table the queries use: version 1 plus whatever later migrations add (append their columns here).
inference_log = _inference_log_v1(metadata)
inference_log.append_column(Column("finish_reason", Text, nullable=True))  # version 2
# Fields a spool line written before their migration lacks: they read as None.
_ADDED_FIELDS = frozenset({"finish_reason"})

RECORD_FIELDS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(InferenceRecord))
_TEXT_FIELDS = frozenset(
    name for name, column in inference_log.c.items() if isinstance(column.type, Text) and name in RECORD_FIELDS
)
assert set(RECORD_FIELDS) == set(inference_log.c.keys()), "InferenceRecord and inference_log drifted apart"


def _v1_create_inference_log(conn: Connection) -> None:
    _inference_log_v1(MetaData()).create(conn)  # the table and its two indexes


def _v2_add_finish_reason(conn: Connection) -> None:
    # A nullable column without a default: instant on PostgreSQL and SQLite, whatever the table's size.
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None)
    prep = conn.dialect.identifier_preparer
    table = prep.quote_identifier("inference_log")
    if schema:
        table = f"{prep.quote_schema(schema)}.{table}"
    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN finish_reason TEXT")


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: tuple[Migration, ...] = (
    (1, "create inference_log", _v1_create_inference_log),
    (2, "add inference_log.finish_reason", _v2_add_finish_reason),
)
LATEST_VERSION = MIGRATIONS[-1][0]


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer apprentice than this one; refuse rather than guess."""


def current_version(conn: Connection) -> int:
    """The highest applied migration, 0 for a fresh database."""
    return int(conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one())


def apply_migrations(conn: Connection) -> int:
    """Apply the missing migrations in order inside the caller's (locked) transaction; return the version."""
    schema_version.create(conn, checkfirst=True)
    version = current_version(conn)
    if version > LATEST_VERSION:
        raise SchemaTooNewError(
            f"inference log schema is at version {version}, this apprentice knows up to {LATEST_VERSION}: "
            "upgrade apprentice"
        )
    for number, name, migrate in MIGRATIONS:
        if number > version:
            migrate(conn)
            conn.execute(insert(schema_version).values(version=number, name=name, applied_at=time.time()))
            version = number
    return version


def _clean_text(value: str) -> str:
    # What a user can send but a database column cannot hold must not poison the batch it lands in:
    # PostgreSQL text refuses NUL, and a lone surrogate (valid in a JSON string) is not encodable UTF-8.
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _finite(value: Any) -> Any:
    """`value` with NaN and +-Infinity replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def json_dumps(value: Any) -> str:
    """Strict JSON for the log's JSON columns and spool lines. NaN and +-Infinity, which Python's parser reads
    from a client's request and a teacher may send as a logprob of -Infinity, have no JSON spelling and
    PostgreSQL refuses them: they are written as null, so that one such number costs itself, not the record.
    ASCII-only, so a lone surrogate in user text cannot break the encoding."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))


def record_to_row(record: InferenceRecord) -> dict[str, Any]:
    """The column values of a record (also the JSON object a spool line holds)."""
    row = {name: getattr(record, name) for name in RECORD_FIELDS}
    for name in _TEXT_FIELDS:
        if isinstance(row[name], str):
            row[name] = _clean_text(row[name])
    return row


def row_to_record(row: Mapping[Any, Any]) -> InferenceRecord:
    """The record a row (or a spool line) holds."""
    return InferenceRecord(**{name: row[name] for name in RECORD_FIELDS if name in row or name not in _ADDED_FIELDS})
