"""The inference-log store on real SQLite and PostgreSQL (round trip, migrations, windowing, prune), the
duration parser and redaction."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import threading
import time

import pytest
from sqlalchemy import MetaData, create_engine, inspect, text, update

import gateway.logstore_schema as schema
from gateway.durations import parse_duration
from gateway.inference_log import InferenceRecord, MemorySink, input_hash
from gateway.logstore import LogStore, LogWriter, create_sink, prune_log
from gateway.logstore_schema import inference_log
from gateway.redact import luhn_valid, redact_record, redact_text
from gateway.settings import LogConfig, Settings
from router_models.distill_data import read_log


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/inference.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    log_store = LogStore(store_url, chunk_size=4)
    log_store.migrate()
    yield log_store
    log_store.close()


def make_record(i: int, task: str = "intent", created_at: float | None = None, **fields) -> InferenceRecord:
    values = {
        "task": task,
        "route": "teacher",
        "reason": "low_confidence",
        "input_text": f"how do I change my pin {i}",
        "teacher_model": "gpt-4o-mini",
        "teacher_text": "pin_change",
        "teacher_label": "pin_change",
        "label_distribution": {"pin_change": 0.9, "card_declined": 0.1},
        "request": {"model": task, "messages": [{"role": "user", "content": f"how do I change my pin {i}"}]},
        "response": {"id": f"chatcmpl-{i}", "choices": [{"message": {"role": "assistant", "content": "pin"}}]},
        "status": 200,
        "latency_ms": 12.5,
        "created_at": 1_700_000_000.0 + i if created_at is None else created_at,
    }
    values.update(fields)
    return InferenceRecord(**values)


def test_round_trip_of_every_field(store):
    full = make_record(
        1,
        route="shadow",
        reason="shadow",
        input_text="naïve café ☕ 日本語 \"quoted\" 'single'",
        teacher_text="The label is: pin_change",
        label_distribution={"pin_change": 0.1 + 0.2, "other": 1e-300, "ünïcode": 0.5},
        request={"messages": [{"role": "user", "content": "x"}], "temperature": 0.0, "logprobs": True, "n": 1},
        response={"choices": [{"logprobs": {"content": [{"token": "pin", "logprob": -0.0123}]}}], "usage": None},
        status=502,
        latency_ms=1234.56789,
        prompt_tokens=17,
        completion_tokens=3,
        cost_usd=0.000012345,
        score=0.987654321,
        specialist_label="card_declined",
        specialist_version="20261129T051500Z-a1b2c3",
        created_at=1_764_000_000.123456,
    )
    sparse = make_record(2, teacher_label=None, label_distribution=None, response=None)
    assert {f.name for f in dataclasses.fields(InferenceRecord)} == set(schema.RECORD_FIELDS)
    assert store.insert_many([full, sparse]) == 2
    assert list(store.iter_records("intent")) == [sparse, full]  # sparse is older
    assert sparse.response is None and sparse.teacher_label is None


def test_insert_skips_ids_already_stored(store):
    record = make_record(1)
    store.insert_many([record])
    store.insert_many([record, make_record(2)])  # a replayed batch must not duplicate
    assert store.count() == 2


def test_text_a_column_cannot_hold_does_not_poison_a_batch(store):
    record = make_record(1, input_text="a\x00b", request={"messages": [{"content": "c\x00d"}]})
    surrogate = make_record(2, teacher_text="half an emoji \ud83d")
    store.insert_many([record, surrogate])
    stored, stored_surrogate = store.iter_records("intent")
    assert stored_surrogate.teacher_text == "half an emoji ?"
    assert stored.input_text == "a\ufffdb"  # PostgreSQL text cannot hold NUL
    assert stored.request == {"messages": [{"content": "c\x00d"}]}  # JSON escapes it, so it survives


def test_migrate_is_idempotent_and_recorded(store, store_url):
    assert store.migrate() == schema.LATEST_VERSION
    assert store.migrate() == schema.LATEST_VERSION
    engine = store._engine
    with engine.connect() as conn:
        versions = conn.execute(schema.schema_version.select()).all()
        columns = {column["name"] for column in inspect(conn).get_columns("inference_log", schema=store.schema)}
        indexes = {
            tuple(index["column_names"]) for index in inspect(conn).get_indexes("inference_log", schema=store.schema)
        }
    assert [row.version for row in versions] == [number for number, _, _ in schema.MIGRATIONS]
    assert columns == set(schema.RECORD_FIELDS)
    assert {("task", "created_at"), ("input_sha256",)} <= indexes


def test_concurrent_migrations_apply_once(store_url):
    stores = [LogStore(store_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[object] = []

    def migrate(log_store: LogStore) -> None:
        barrier.wait()
        try:
            results.append(log_store.migrate())
        except Exception as exc:  # noqa: BLE001 - the assertion below shows which
            results.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [schema.LATEST_VERSION] * len(stores)
    assert stores[0].count() == 0
    for log_store in stores:
        log_store.close()


def test_failed_migration_leaves_nothing_behind(store, monkeypatch):
    latest = schema.LATEST_VERSION
    nxt = latest + 1

    def broken(conn) -> None:
        conn.execute(text("CREATE TABLE half_done (x INTEGER)"))
        raise RuntimeError(f"migration {nxt} failed")

    monkeypatch.setattr(schema, "MIGRATIONS", (*schema.MIGRATIONS, (nxt, "broken", broken)))
    monkeypatch.setattr(schema, "LATEST_VERSION", nxt)
    with pytest.raises(RuntimeError, match=f"migration {nxt} failed"):
        store.migrate()
    with store._engine.connect() as conn:
        assert schema.current_version(conn) == latest
        assert not inspect(conn).has_table("half_done", schema=store.schema)


def _version_1_log(store_url: str, monkeypatch, records: list[InferenceRecord]) -> None:
    """A log an older apprentice wrote: schema version 1, without finish_reason."""
    log_store = LogStore(store_url)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
            patch.setattr(schema, "LATEST_VERSION", 1)
            assert log_store.migrate() == 1
        rows = [{k: v for k, v in schema.record_to_row(r).items() if k != "finish_reason"} for r in records]
        with log_store._engine.begin() as conn:
            conn.execute(schema._inference_log_v1(MetaData()).insert(), rows)
    finally:
        log_store.close()


def _version(store: LogStore) -> int:
    with store._engine.connect() as conn:
        return schema.current_version(conn)


def test_a_version_1_log_gains_finish_reason_and_keeps_its_rows(store_url, monkeypatch):
    old = make_record(1)
    _version_1_log(store_url, monkeypatch, [old])
    log_store = LogStore(store_url)
    try:
        assert log_store.migrate() == schema.LATEST_VERSION == 2
        new = make_record(2, finish_reason="length")
        log_store.insert_many([new])
        assert list(log_store.iter_records("intent")) == [old, new]
        assert old.finish_reason is None
    finally:
        log_store.close()


def test_readers_read_a_version_1_log_as_it_is_and_leave_it_at_version_1(store_url, monkeypatch):
    """Distill and prune never migrate: a read-only role could not, and older gateways still writing to the log
    would refuse it at their next start."""
    old, recent = make_record(1), make_record(2, created_at=time.time())
    _version_1_log(store_url, monkeypatch, [old, recent])
    reader = LogStore(store_url)
    try:
        assert list(reader.iter_records("intent")) == [old, recent]
        assert [r.id for r in reader.iter_records("intent", bodies=False)] == [old.id, recent.id]
        # Distill's own reader, as `apprentice distill` calls it.
        settings = Settings(log=LogConfig(url=store_url))
        assert [r.id for r in read_log(settings, "intent", None)] == [old.id, recent.id]
        assert _version(reader) == 1
        assert prune_log(store_url, "1d") == 1
        assert [r.id for r in reader.iter_records("intent")] == [recent.id]
        assert _version(reader) == 1
    finally:
        reader.close()


def test_a_spool_line_from_before_finish_reason_still_reads():
    record = make_record(1, finish_reason="stop")
    line = schema.record_to_row(record)
    del line["finish_reason"]
    assert schema.row_to_record(line) == dataclasses.replace(record, finish_reason=None)
    del line["id"]  # a field every version wrote is still required
    with pytest.raises(KeyError):
        schema.row_to_record(line)


def test_a_schema_newer_than_the_code_is_refused(store):
    with store._engine.begin() as conn:
        conn.execute(schema.schema_version.insert().values(version=99, name="future", applied_at=0.0))
    with pytest.raises(schema.SchemaTooNewError, match="version 99"):
        store.migrate()


def test_iter_records_window_order_and_paging(store):
    times = [50.0, 10.0, 30.0, 30.0, 30.0, 20.0, 40.0, 30.0, 60.0, 30.0]  # ties straddle the 4-row chunks
    records = [make_record(i, created_at=t) for i, t in enumerate(times)]
    others = [make_record(100 + i, task="other", created_at=t) for i, t in enumerate(times)]
    store.insert_many(records[5:] + others)
    store.insert_many(records[:5])
    expected = sorted(records, key=lambda r: (r.created_at, r.id))
    iterator = store.iter_records("intent")
    assert iter(iterator) is iterator  # a generator: rows are fetched chunk by chunk
    assert list(iterator) == expected
    window = list(store.iter_records("intent", since=20.0, until=50.0))  # since inclusive, until exclusive
    assert window == [r for r in expected if 20.0 <= r.created_at < 50.0]
    assert [r.created_at for r in store.iter_records("intent", since=55.0)] == [60.0]
    assert [r.created_at for r in store.iter_records("intent", until=20.0)] == [10.0]
    assert list(store.iter_records("missing")) == []
    # Without bodies: the same records, paged the same way, with the request and response JSON left unread.
    assert list(store.iter_records("intent", bodies=False)) == [
        dataclasses.replace(r, request={}, response=None) for r in expected
    ]


def test_count_and_prune(store):
    now = time.time()
    store.insert_many(
        [make_record(1, created_at=now - 40 * 86400), make_record(2, created_at=now - 2 * 86400)]
        + [make_record(3 + i, task="other", created_at=now - 60) for i in range(3)]
    )
    assert store.count() == 5
    assert store.count("intent") == 2
    assert store.prune(30 * 86400) == 1
    assert store.prune(30 * 86400) == 0
    assert store.count("intent") == 1
    assert store.prune(3600) == 1
    assert store.count() == 3
    with pytest.raises(ValueError, match="older_than_s"):
        store.prune(-1)


def test_prune_log_parses_the_duration(tmp_path):
    url = f"sqlite:///{tmp_path}/inference.db"
    # A mistyped path is an error naming it: a cron job pruning a fresh, empty log every night while the real
    # one grows must not look like success. Nothing is created there.
    with pytest.raises(ValueError, match=f"there is no inference log at {tmp_path}/inference.db"):
        prune_log(url, "30d")
    assert list(tmp_path.iterdir()) == []
    log_store = LogStore(url)
    log_store.migrate()
    log_store.insert_many([make_record(1, created_at=time.time() - 7200), make_record(2, created_at=time.time())])
    log_store.close()
    assert prune_log(url, "90m") == 1
    with pytest.raises(ValueError, match="invalid duration '30 days'"):
        prune_log(url, "30 days")


def test_store_urls_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unsupported log store URL"):
        LogStore("mysql://localhost/db")
    with pytest.raises(ValueError, match="PostgreSQL only"):
        LogStore(f"sqlite:///{tmp_path}/x.db?schema=foo")
    with pytest.raises(ValueError, match="memory://"):
        LogStore("memory://")
    with pytest.raises(ValueError, match="in-memory SQLite"):
        LogStore("sqlite://")


def test_sqlite_runs_in_wal_mode(tmp_path):
    log_store = LogStore(f"sqlite:///{tmp_path}/inference.db")
    log_store.migrate()
    with log_store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    log_store.close()
    engine = create_engine(f"sqlite:///{tmp_path}/inference.db")
    with engine.connect() as conn:  # WAL is a property of the file, seen by any other client
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_create_sink_by_url(tmp_path):
    assert isinstance(create_sink(LogConfig(url="memory://")), MemorySink)
    sink = create_sink(LogConfig(url=f"sqlite:///{tmp_path}/log.db", spool_dir=tmp_path / "spool", redact=True))
    assert isinstance(sink, LogWriter)
    sink.store.close()


@pytest.mark.parametrize(
    ("text_value", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("1h30m", 5400), (" 1.5h ", 5400),
     ("2w", 14 * 86400)],
)  # fmt: skip
def test_parse_duration(text_value, seconds):
    assert math.isclose(parse_duration(text_value), seconds)


@pytest.mark.parametrize("bad", ["", "30", "d", "-1d", "30x", "1h 30m", "30D", "abc", "1.h"])
def test_parse_duration_rejects_bad_input(bad):
    with pytest.raises(ValueError, match=r"invalid duration .*e\.g\. '30d'"):
        parse_duration(bad)


def test_parse_duration_rejects_zero():
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration("0s")


@pytest.mark.parametrize(
    ("raw", "redacted"),
    [
        ("mail jane.doe+work@example.co.uk now", "mail [EMAIL] now"),
        ("call +1 (555) 123-4567 today", "call [PHONE] today"),
        ("call 555-123-4567 or 555.123.4567", "call [PHONE] or [PHONE]"),
        ("uk +44 20 7946 0958", "uk [PHONE]"),
        ("card 4111 1111 1111 1111 expires", "card [CARD] expires"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("amex 378282246310005.", "amex [CARD]."),
        ("ref 4111111111111112 fails luhn", "ref 4111111111111112 fails luhn"),
        ("on 2024-01-15 at 12:30, order 42 of 3", "on 2024-01-15 at 12:30, order 42 of 3"),
        ("no digits here", "no digits here"),
    ],
)
def test_redact_text(raw, redacted):
    assert redact_text(raw) == redacted


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_redact_record_rehashes_and_keeps_structure():
    raw = "I am bob@example.com, card 4111 1111 1111 1111"
    record = make_record(
        1,
        input_text=raw,
        request={"model": "intent", "messages": [{"role": "user", "content": [{"type": "text", "text": raw}]}]},
        response={"id": "chatcmpl-5551234567", "choices": [{"message": {"role": "assistant", "content": raw}}]},
        teacher_text=f"echo {raw}",
    )
    clean = redact_record(record)
    expected = "I am [EMAIL], card [CARD]"
    assert clean.input_text == expected
    assert clean.teacher_text == f"echo {expected}"
    assert clean.request["messages"][0] == {"role": "user", "content": [{"type": "text", "text": expected}]}
    assert clean.response["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert clean.response["id"] == "chatcmpl-5551234567"  # structural fields are left alone
    assert clean.input_sha256 == input_hash(expected) != record.input_sha256
    assert (clean.id, clean.created_at, clean.teacher_label) == (record.id, record.created_at, record.teacher_label)


def test_a_row_whose_label_distribution_cannot_be_read_is_passed_over_by_name(store, store_url):
    """Distill reads with `on_bad_row`: a hand-edited row (a JSON list, a non-number) is reported by id and
    skipped, and the scan goes on past it (chunk_size is 4: the bad rows sit in different chunks)."""
    records = [make_record(i, created_at=1000.0 + i) for i in range(10)]
    records[7] = make_record(7, created_at=1007.0, label_distribution={"pin_change": "0.9"})  # a number as text
    store.insert_many(records)
    table = inference_log
    with store._write() as conn:
        conn.execute(update(table).where(table.c.id == records[2].id).values(label_distribution=[["pin_change", 0.9]]))
        conn.execute(update(table).where(table.c.id == records[5].id).values(label_distribution={"pin_change": "high"}))
    bad: list[tuple[str, str]] = []
    read = list(store.iter_records("intent", bodies=False, on_bad_row=lambda i, why: bad.append((i, why))))
    assert [r.id for r in read] == [r.id for i, r in enumerate(records) if i not in (2, 5)]
    assert [i for i, _ in bad] == [records[2].id, records[5].id]
    assert "a JSON list, not an object" in bad[0][1] and "'high', not a number" in bad[1][1]
    assert read[5].label_distribution == {"pin_change": 0.9}  # records[7]
    assert read[0].label_distribution == {"pin_change": 0.9, "card_declined": 0.1}


def test_a_label_distribution_that_is_not_json_is_passed_over_in_sqlite(tmp_path):
    """SQLite checks no JSON: text that does not parse would fail the whole chunk it is read in."""
    url = f"sqlite:///{tmp_path}/inference.db"
    store = LogStore(url, chunk_size=4)
    store.migrate()
    records = [make_record(i, created_at=1000.0 + i) for i in range(6)]
    store.insert_many(records)
    with sqlite3.connect(tmp_path / "inference.db") as conn:
        conn.execute(
            "UPDATE inference_log SET label_distribution = ? WHERE id = ?", ('{"pin_change": 0.9', records[1].id)
        )
    bad: list[tuple[str, str]] = []
    read = list(store.iter_records("intent", on_bad_row=lambda i, why: bad.append((i, why))))
    store.close()
    assert [r.id for r in read] == [r.id for i, r in enumerate(records) if i != 1]
    assert bad[0][0] == records[1].id and "is not JSON" in bad[0][1]
