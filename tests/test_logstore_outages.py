"""The log writer while its store is down or changed under it: a locked SQLite, PostgreSQL refusing connections,
a schema renamed away, dropped and made anew, or moved on by a newer gateway. Nothing written is lost."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import psycopg
import pytest
import sqlalchemy.exc
from logstore_helpers import FAST, PG_DSN, SqliteLock, make_record, spool_files, stored_ids, wait_until

from gateway.logstore import LogStore, LogWriter


class TcpProxy:
    """A TCP forwarder to PostgreSQL that can be cut (connection refused, live connections reset) and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        server.settimeout(0.05)
        self.port = server.getsockname()[1]
        self._server = server
        self._spawn(self._accept, server)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        server, self._server = self._server, None
        for thread in self._threads[:1]:
            thread.join()
        if server is not None:
            server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join()
        for sock in sockets:
            sock.close()
        self._threads = []


async def test_sqlite_locked_mid_run_loses_nothing(tmp_path):
    db = tmp_path / "log.db"
    store = LogStore(f"sqlite:///{db}", busy_timeout_ms=50)
    writer = LogWriter(store, spool_dir=tmp_path / "spool", batch_size=20, **FAST)
    await writer.start()
    records = [make_record(i) for i in range(300)]
    for record in records[:100]:
        writer.submit(record)
    await wait_until(lambda: writer.stats.written == 100, what="first writes")
    with SqliteLock(db):
        for record in records[100:200]:
            writer.submit(record)
            await asyncio.sleep(0)
        await wait_until(lambda: writer.stats.spooled == 100, what="spooling while locked")
        assert not writer.store_available
        await asyncio.sleep(0.3)  # a few failed replay rounds
        assert writer.stats.write_errors >= 2
    for record in records[200:]:
        writer.submit(record)
    await wait_until(lambda: store.count() == 300, what="replay after the lock is gone")
    await writer.aclose()
    assert sorted(stored_ids(store)) == sorted(r.id for r in records)  # each exactly once
    # Until a replay round sees the store back, new batches keep going to the spool: both paths count.
    assert writer.stats.written + writer.stats.replayed == 300 and writer.stats.replayed >= 100
    assert writer.stats.spooled == writer.stats.replayed and writer.stats.dropped == 0
    assert spool_files(tmp_path / "spool") == []


@pytest.mark.postgres
async def test_postgres_connection_refused_mid_run_loses_nothing(tmp_path, pg_url):
    proxy = TcpProxy(("127.0.0.1", 5432))
    proxy.start()
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    writer = LogWriter(LogStore(url, connect_timeout_s=2), spool_dir=tmp_path / "spool", batch_size=20, **FAST)
    direct = LogStore(pg_url)
    try:
        await writer.start()
        records = [make_record(i) for i in range(240)]
        for record in records[:80]:
            writer.submit(record)
        await wait_until(lambda: writer.stats.written == 80, what="first writes")
        proxy.stop()
        for record in records[80:160]:
            writer.submit(record)
            await asyncio.sleep(0)
        await wait_until(lambda: writer.stats.spooled == 80, what="spooling while refused")
        await asyncio.sleep(0.3)
        assert direct.count() == 80
        proxy.start()  # same port
        for record in records[160:]:
            writer.submit(record)
        await wait_until(lambda: direct.count() == 240, what="replay after reconnect")
        await writer.aclose()
        assert sorted(stored_ids(direct)) == sorted(r.id for r in records)
        assert writer.stats.written + writer.stats.replayed == 240 and writer.stats.replayed >= 80
        assert writer.stats.dropped == 0
        assert spool_files(tmp_path / "spool") == []
    finally:
        direct.close()
        proxy.stop()


@pytest.mark.postgres
async def test_postgres_schema_gone_mid_run_loses_nothing(tmp_path, pg_url):
    schema = pg_url.rsplit("schema=", 1)[1]
    writer = LogWriter(LogStore(pg_url), spool_dir=tmp_path / "spool", batch_size=20, **FAST)
    await writer.start()
    records = [make_record(i) for i in range(150)]
    for record in records[:50]:
        writer.submit(record)
    await wait_until(lambda: writer.stats.written == 50, what="first writes")
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_away"')
        for record in records[50:100]:
            writer.submit(record)
            await asyncio.sleep(0)
        await wait_until(lambda: writer.stats.spooled == 50, what="spooling while the schema is gone")
        admin.execute(f'ALTER SCHEMA "{schema}_away" RENAME TO "{schema}"')
    for record in records[100:]:
        writer.submit(record)
    await writer.aclose()  # the final replay happens here if the replayer has not got there first
    direct = LogStore(pg_url)
    try:
        assert sorted(stored_ids(direct)) == sorted(r.id for r in records)
    finally:
        direct.close()
    assert writer.stats.dropped == 0 and writer.stats.replayed >= 50
    assert spool_files(tmp_path / "spool") == []


async def test_a_store_that_comes_back_empty_gets_its_tables_back_and_the_spool_without_a_restart(tmp_path, pg_url):
    schema = pg_url.rsplit("schema=", 1)[1]
    writer = LogWriter(LogStore(pg_url), spool_dir=tmp_path / "spool", batch_size=20, **FAST)
    await writer.start()
    try:
        records = [make_record(i) for i in range(100)]
        for record in records[:50]:
            writer.submit(record)
        await wait_until(lambda: writer.stats.written == 50, what="first writes")
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')  # what it held is gone with it
            admin.execute(f'CREATE SCHEMA "{schema}"')  # made anew, empty
        for record in records[50:]:
            writer.submit(record)
            await asyncio.sleep(0)
        # While the writer runs: the replayer migrates the empty schema and writes the spool back.
        await wait_until(lambda: writer.stats.replayed >= 50, what="the spool written back to the new schema")
        direct = LogStore(pg_url)
        try:
            assert sorted(stored_ids(direct)) == sorted(r.id for r in records[50:])
        finally:
            direct.close()
        assert writer.stats.dropped == 0 and writer.stats.spooled == 50
    finally:
        await writer.aclose()
    assert spool_files(tmp_path / "spool") == []


async def test_a_schema_a_newer_gateway_moved_on_during_an_outage_is_written_to_until_restart(tmp_path):
    """A rolling upgrade: a newer replica migrates the shared log while this one runs, then this one's store
    blips. Its replayer migrates again after the blip, finds the newer schema, and must keep writing (it
    refuses the store only at its next start), not spool forever."""
    from gateway import logstore_schema

    url = f"sqlite:///{tmp_path}/log.db"
    store = LogStore(url)
    writer = LogWriter(store, spool_dir=tmp_path / "spool", batch_size=5, **FAST)
    await writer.start()
    newer = LogStore(url)
    first = make_record(0)
    try:
        writer.submit(first)
        await wait_until(lambda: writer.stats.written == 1, what="first write")
        with newer._engine.begin() as conn:
            conn.execute(
                logstore_schema.schema_version.insert().values(
                    version=logstore_schema.LATEST_VERSION + 1, name="from_a_newer_gateway", applied_at=time.time()
                )
            )
        insert, blips = store.insert_many, [2]

        def blipping(records):
            if blips[0] > 0:
                blips[0] -= 1
                raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))
            return insert(records)

        store.insert_many = blipping
        records = [make_record(i) for i in range(1, 6)]
        for record in records:
            writer.submit(record)
        await wait_until(lambda: writer.stats.replayed == 5, what="the spool written back after the blip")
        assert writer.store_available
        assert sorted(stored_ids(newer)) == sorted(r.id for r in [first, *records])
    finally:
        await writer.aclose()
        newer.close()
    # A new start is refused, as at any start on a schema newer than this gateway knows.
    with pytest.raises(logstore_schema.SchemaTooNewError):
        await LogWriter(LogStore(url), spool_dir=tmp_path / "spool2", **FAST).start()
