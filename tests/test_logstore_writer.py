"""The durable log writer against real stores: batching, queue-full spill, restart replay of a spool left
behind, the spool itself, records the store refuses, redaction, and records neither store nor disk can take.
Outages of the store are in test_logstore_outages."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import math
import os
import sqlite3
import time

import pytest
import sqlalchemy.exc
from logstore_helpers import FAST, SqliteLock, make_record, spool_files, stored_ids, wait_until

from gateway.inference_log import input_hash
from gateway.logstore import LogStore, LogWriter
from gateway.logstore_spool import Spool, encode_record


async def test_writes_everything_in_batches_off_the_loop(tmp_path):
    counts: dict[str, int] = {}
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(
        store,
        spool_dir=tmp_path / "spool",
        batch_size=50,
        on_count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n),
        **FAST,
    )
    await writer.start()
    records = [make_record(i) for i in range(500)]
    for i, record in enumerate(records):
        writer.submit(record)
        if i % 100 == 0:
            await asyncio.sleep(0)
    await wait_until(lambda: store.count() == 500, what="background writes")  # before aclose
    assert writer.queue_depth == 0
    await writer.aclose()
    assert stored_ids(store) == [r.id for r in records]
    assert writer.stats.written == 500 and writer.stats.spooled == 0 and writer.stats.dropped == 0
    assert counts == {"written": 500}
    assert spool_files(tmp_path / "spool") == []


async def test_a_lone_record_is_flushed_after_the_interval(tmp_path):
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=tmp_path / "spool", batch_size=1000, flush_interval_s=0.05)
    await writer.start()
    writer.submit(make_record(1))
    await wait_until(lambda: store.count() == 1, timeout=2.0, what="the flush interval")
    await writer.aclose()


async def test_queue_full_spills_to_the_spool_not_to_the_floor(tmp_path):
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=tmp_path / "spool", queue_size=8, **FAST)
    await writer.start()
    records = [make_record(i) for i in range(300)]
    for record in records:  # no await: the writer task cannot run, the queue fills
        writer.submit(record)
    assert writer.queue_depth == 8
    assert writer.stats.spooled == 292 and writer.stats.dropped == 0
    assert sum(len(p.read_bytes().splitlines()) for p in spool_files(tmp_path / "spool")) == 292
    await wait_until(lambda: store.count() == 300, what="replay of the spilled records")
    await writer.aclose()
    assert sorted(stored_ids(store)) == sorted(r.id for r in records)
    assert writer.stats.replayed == 292 and writer.stats.written == 8 and writer.stats.dropped == 0
    assert spool_files(tmp_path / "spool") == []


async def test_restart_replays_the_spool_left_behind(tmp_path):
    db = tmp_path / "log.db"
    spool = tmp_path / "spool"
    records = [make_record(i) for i in range(60)]
    first = LogWriter(LogStore(f"sqlite:///{db}", busy_timeout_ms=50), spool_dir=spool, **FAST)
    await first.start()  # migrates while the store is still free
    with SqliteLock(db):
        for record in records:
            first.submit(record)
        await first.aclose()  # flush fails: everything goes to the spool
    assert first.stats.spooled == 60 and first.stats.written == 0 and first.stats.dropped == 0
    assert sum(len(p.read_bytes().splitlines()) for p in spool_files(spool)) == 60
    late = make_record(999)
    first.submit(late)  # after close: spooled, for the next start
    assert first.stats.spooled == 61

    second = LogWriter(LogStore(f"sqlite:///{db}"), spool_dir=spool, **FAST)
    await second.start()
    await wait_until(lambda: second.stats.replayed == 61, what="replay at start")
    await second.aclose()
    store = LogStore(f"sqlite:///{db}")
    assert sorted(stored_ids(store)) == sorted([r.id for r in [*records, late]])
    store.close()
    assert spool_files(spool) == []


async def test_a_live_writers_spool_is_not_taken_over(tmp_path):
    db = tmp_path / "log.db"
    spool = tmp_path / "spool"
    owner = LogWriter(LogStore(f"sqlite:///{db}", busy_timeout_ms=50), spool_dir=spool, queue_size=1, **FAST)
    await owner.start()
    with SqliteLock(db):
        owner.submit(make_record(1))
        owner.submit(make_record(2))  # queue full: spooled by submit, in the owner's locked segment
        other = LogWriter(LogStore(f"sqlite:///{tmp_path}/other.db"), spool_dir=spool, **FAST)
        await other.start()
        await asyncio.sleep(0.2)
        assert owner.stats.spooled == 2 and spool_files(spool)
        assert other.stats.replayed == 0 and other.store.count() == 0
        await other.aclose()
    await owner.aclose()
    store = LogStore(f"sqlite:///{db}")
    assert store.count() == 2
    store.close()


async def test_spool_lines_and_files_that_hold_no_record_never_stop_the_replay(tmp_path):
    """Whatever an orphan spool holds that is not a record, the good lines are replayed and the store stays
    in use: once, one such line (or a directory named like a spool file) stranded every later record."""
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [make_record(i) for i in range(3)]
    bad_type = json.dumps({**json.loads(encode_record(good[0])), "id": "x", "input_sha256": "", "input_text": 7})
    lines = [encode_record(good[0]), b"[" * 100_000 + b"\n", bad_type.encode() + b"\n", encode_record(good[1])]
    (spool / "spool-1-1-aaaaaa-1.jsonl").write_bytes(b"".join(lines))
    (spool / "spool-2-2-bbbbbb-1.jsonl").mkdir()
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=spool, **FAST)
    await writer.start()
    await wait_until(lambda: writer.stats.replayed == 2, what="the good lines replayed")
    writer.submit(good[2])
    await wait_until(lambda: writer.stats.written == 1, what="a new record written, not spooled")
    assert writer.store_available
    await writer.aclose()
    assert sorted(stored_ids(store)) == sorted(r.id for r in good)
    assert writer.stats.dropped == 2 and writer.stats.spooled == 0
    store.close()


def test_a_spool_append_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    first, second, third = (encode_record(make_record(i)) for i in range(3))
    spool.append([first], fsync=True)
    real_write = os.write

    def half_then_full(fd: int, data) -> int:
        monkeypatch.setattr(os, "write", full)
        return real_write(fd, bytes(data[: len(data) // 2]))

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        spool.append([second], fsync=True)
    monkeypatch.setattr(os, "write", real_write)
    spool.append([third], fsync=True)  # the disk has room again
    (segment,) = spool.seal()
    assert [r.id for chunk in spool.read(segment, 10) for r in chunk] == [
        json.loads(first)["id"],
        json.loads(third)["id"],
    ]
    assert segment.bad_lines == 0
    spool.close()


def test_a_new_spool_file_is_locked_before_other_writers_can_see_it(tmp_path, monkeypatch):
    """Another writer adopts any spool-*.jsonl it can lock; a new segment must never be one for a moment."""
    spool = Spool(tmp_path / "spool")
    seen: list[bool] = []
    real_rename = os.rename

    def rename(src, dst) -> None:
        # Just before the file takes its scanned name: nothing under that name yet, and its lock held.
        seen.append(not list((tmp_path / "spool").glob("spool-*.jsonl")))
        with open(src, "rb") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    spool.append([encode_record(make_record(1))], fsync=True)
    assert seen == [True, True]
    assert len(list((tmp_path / "spool").glob("spool-*.jsonl"))) == 1
    spool.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_numbers_json_cannot_spell_are_stored_as_null_and_never_stop_the_log(tmp_path, caplog, request, backend):
    """NaN and +-Infinity: Python's parser reads them from a client's request, and a teacher may send a logprob of
    -Infinity. PostgreSQL refuses them in JSON; one such record once stopped every later write to it."""
    url = f"sqlite:///{tmp_path}/log.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    store = LogStore(url)
    writer = LogWriter(store, spool_dir=tmp_path / "spool", **FAST)
    await writer.start()
    odd = [
        make_record(1, label_distribution={"balance": math.nan, "timer": 0.5}),
        make_record(2, request={"messages": [], "temperature": math.inf}),
        make_record(3, response={"choices": [{"logprobs": {"content": [{"token": "x", "logprob": -math.inf}]}}]}),
    ]
    unserialisable = make_record(4, request={"messages": object()})
    good = [make_record(i) for i in range(5, 15)]
    with caplog.at_level(logging.ERROR, logger="apprentice.logstore"):
        for record in [*good[:5], *odd, unserialisable, *good[5:]]:
            writer.submit(record)
        await writer.aclose()
    try:
        stored = {r.id: r for r in store.iter_records("intent")}
    finally:
        store.close()
    assert sorted(stored) == sorted(r.id for r in [*good, *odd])
    assert stored[odd[0].id].label_distribution == {"balance": None, "timer": 0.5}
    assert stored[odd[1].id].request["temperature"] is None
    assert stored[odd[2].id].response["choices"][0]["logprobs"]["content"][0]["logprob"] is None
    assert writer.stats.written == 13 and writer.stats.spooled == 0
    # The one legitimate drop: a record that cannot be serialised anywhere, and it is logged.
    assert writer.stats.dropped == 1
    assert any("DROPPED" in m and unserialisable.id in m for m in caplog.messages)


async def test_redaction_happens_before_the_write(tmp_path):
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=tmp_path / "spool", redact=True, **FAST)
    await writer.start()
    raw = "reach me at ann@example.org or +1 555 123 4567"
    writer.submit(make_record(1, input_text=raw, request={"messages": [{"role": "user", "content": raw}]}))
    await writer.aclose()
    (stored,) = store.iter_records("intent")
    assert stored.input_text == "reach me at [EMAIL] or [PHONE]"
    assert stored.request == {"messages": [{"role": "user", "content": "reach me at [EMAIL] or [PHONE]"}]}
    assert stored.input_sha256 == input_hash(stored.input_text)
    store.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"ann@example.org" not in path.read_bytes(), path


async def test_a_batch_held_after_an_unexpected_failure_is_stored_redacted(tmp_path):
    """A bug in the write path holds the batch for the replayer: what it holds has been redacted."""
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=tmp_path / "spool", redact=True, **FAST)
    await writer.start()
    await wait_until(lambda: writer.stats.replayed == 0 and not writer._pending(), what="the first round")
    real_store, real_spool = writer._store_records, writer._spool_records
    failures = {"store": 1, "spool": 1}

    def store_once(records):
        if failures["store"]:
            failures["store"] -= 1
            raise ConnectionError("store down")
        return real_store(records)

    def spool_once(records, *, fsync):
        if failures["spool"]:
            failures["spool"] -= 1
            raise RuntimeError("a bug in the spool path")
        return real_spool(records, fsync=fsync)

    writer._store_records, writer._spool_records = store_once, spool_once
    raw = "reach me at ann@example.org"
    writer.submit(make_record(1, input_text=raw, request={"messages": [{"role": "user", "content": raw}]}))
    await wait_until(lambda: writer.stats.replayed == 1, what="the held batch to be replayed")
    await writer.aclose()
    assert failures == {"store": 0, "spool": 0}
    (stored,) = store.iter_records("intent")
    assert stored.input_text == "reach me at [EMAIL]"
    assert stored.request == {"messages": [{"role": "user", "content": "reach me at [EMAIL]"}]}
    store.close()


def test_the_spool_is_read_back_in_chunks_bounded_by_size_as_well_as_count(tmp_path):
    spool = Spool(tmp_path / "spool")
    big = [make_record(i, input_text="x" * 300_000) for i in range(10)]
    spool.append([encode_record(r) for r in big], fsync=True)
    (segment,) = spool.seal()
    sizes = [len(chunk) for chunk in spool.read(segment, 1000, max_bytes=1_000_000)]
    assert sizes == [4, 4, 2]  # about 300 kB a line: a chunk ends once it passes 1 MB
    assert [r.id for chunk in spool.read(segment, 3) for r in chunk] == [r.id for r in big]
    spool.close()


async def test_the_writer_reports_its_queue_depth_as_it_takes_and_finishes_batches(tmp_path):
    """Each worker's apprentice_log_queue_depth follows its own queue, not only when a scrape reaches it."""
    store = LogStore(f"sqlite:///{tmp_path}/log.db")
    writer = LogWriter(store, spool_dir=tmp_path / "spool", batch_size=4, **FAST)
    depths: list[int] = []
    writer.on_depth = depths.append
    loop = asyncio.get_running_loop()
    real_store, first = writer._store_records, [True]

    def slow_first_write(records):  # three more records arrive while the first batch is written
        if first[0]:
            first[0] = False
            for i in range(3):
                loop.call_soon_threadsafe(writer.submit, make_record(100 + i))
            time.sleep(0.2)
        return real_store(records)

    writer._store_records = slow_first_write
    await writer.start()
    for i in range(10):  # queued before the writer task runs
        writer.submit(make_record(i))
    await wait_until(lambda: writer.stats.written == 13, what="the thirteen records")
    await wait_until(lambda: bool(depths) and depths[-1] == 0, what="the depth after the last batch")
    await writer.aclose()
    # Taken: four of ten, six wait. Written: three more came meanwhile, nine wait.
    assert depths[:2] == [6, 9]
    store.close()


def _disk_full(lines, *, fsync):
    """A spool append on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_records_neither_the_store_nor_a_full_disk_can_take_are_counted_while_held(tmp_path):
    """Held in memory, they are lost if the process dies: `unspooled` rises at every attempt so an alert sees
    the state for as long as it lasts; once the store is back, nothing is lost."""
    db = tmp_path / "log.db"
    store = LogStore(f"sqlite:///{db}", busy_timeout_ms=50)
    counted: list[tuple[str, int]] = []
    writer = LogWriter(store, spool_dir=tmp_path / "spool", on_count=lambda name, n: counted.append((name, n)), **FAST)
    await writer.start()
    await wait_until(lambda: not writer._pending(), what="the first round")
    real_append = writer._spool.append

    writer._spool.append = _disk_full
    records = [make_record(i) for i in range(3)]
    with SqliteLock(db):
        for record in records:
            writer.submit(record)
        await wait_until(lambda: writer.stats.unspooled >= 6, what="held records counted at each attempt")
    writer._spool.append = real_append
    await wait_until(lambda: store.count() == 3, what="the held records stored")
    await writer.aclose()
    assert sorted(stored_ids(store)) == sorted(r.id for r in records)
    assert writer.stats.dropped == 0 and ("unspooled", 3) in counted
    store.close()


async def test_records_held_while_the_store_was_never_reached_keep_being_counted(tmp_path):
    """The store down from the start (its schema never created): every replay round fails before it reaches
    the store, and still offers the held records to the spool, counting them as unspooled again."""
    db = tmp_path / "log.db"
    sqlite3.connect(db).close()
    store = LogStore(f"sqlite:///{db}", busy_timeout_ms=50)
    writer = LogWriter(store, spool_dir=tmp_path / "spool", **FAST)
    real_append = writer._spool.append

    writer._spool.append = _disk_full
    records = [make_record(i) for i in range(3)]
    with SqliteLock(db):
        await writer.start()
        for record in records:
            writer.submit(record)
        await wait_until(lambda: writer.stats.unspooled >= 12, what="the held records counted round after round")
    writer._spool.append = real_append

    def stored() -> int:
        try:
            return store.count()
        except sqlalchemy.exc.OperationalError:  # the writer has not created the table yet
            return 0

    await wait_until(lambda: stored() == 3, what="the held records stored")
    await writer.aclose()
    assert sorted(stored_ids(store)) == sorted(r.id for r in records) and writer.stats.dropped == 0
    store.close()
