"""A real process writing the inference log gets SIGTERM mid-stream: it flushes or spools every record, and a
restart replays the spool, so the store ends up with exactly what was submitted.

Run as a script, this file is that process: `python test_logstore_sigterm.py SQLITE_URL SPOOL_DIR`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def _child(url: str, spool_dir: str) -> None:
    from gateway.inference_log import InferenceRecord
    from gateway.logstore import LogStore, LogWriter

    writer = LogWriter(
        LogStore(url, busy_timeout_ms=100),
        spool_dir=Path(spool_dir),
        batch_size=64,
        flush_interval_s=0.02,
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )
    await writer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    submitted = 0
    while not stop.is_set():
        writer.submit(
            InferenceRecord(
                task="intent", route="teacher", reason="ood", input_text=f"message {submitted}",
                teacher_model="teacher", teacher_text="label", teacher_label="label",
                label_distribution={"label": 1.0}, request={"n": submitted}, response=None, status=200,
                latency_ms=1.0, id=f"rec-{submitted:06d}",
            )
        )  # fmt: skip
        submitted += 1
        if submitted % 50 == 0:
            print(submitted, flush=True)
        await asyncio.sleep(0.001)
    await writer.aclose()
    print(json.dumps({"submitted": submitted, **dataclasses.asdict(writer.stats)}), flush=True)


def _start(url: str, spool: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-W", "error", __file__, url, str(spool)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _wait_for_progress(proc: subprocess.Popen[str], at_least: int) -> int:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, f"child exited early with {proc.wait()}"
        if int(line) >= at_least:
            return int(line)


def _stop(proc: subprocess.Popen[str]) -> dict[str, int]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def _stored_ids(url: str) -> list[str]:
    from gateway.logstore import LogStore

    store = LogStore(url)
    try:
        return [record.id for record in store.iter_records("intent")]
    finally:
        store.close()


def test_sigterm_flushes_everything(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    proc = _start(url, tmp_path / "spool")
    _wait_for_progress(proc, 400)
    result = _stop(proc)
    assert result["dropped"] == 0 and result["spooled"] == 0
    assert sorted(_stored_ids(url)) == [f"rec-{i:06d}" for i in range(result["submitted"])]
    assert list((tmp_path / "spool").glob("spool-*.jsonl")) == []


async def test_sigterm_while_the_store_is_down_spools_and_the_restart_replays(tmp_path):
    from gateway.logstore import LogStore, LogWriter

    db = tmp_path / "log.db"
    url = f"sqlite:///{db}"
    spool = tmp_path / "spool"
    proc = _start(url, spool)
    _wait_for_progress(proc, 200)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the store goes away mid-stream
    try:
        seen = _wait_for_progress(proc, 1)
        _wait_for_progress(proc, seen + 200)
        result = _stop(proc)
    finally:
        lock.execute("COMMIT")
        lock.close()
    assert result["dropped"] == 0 and result["spooled"] >= 200
    assert result["written"] + result["spooled"] == result["submitted"]
    assert len(_stored_ids(url)) == result["written"] < result["submitted"]
    assert list(spool.glob("spool-*.jsonl"))

    restarted = LogWriter(LogStore(url), spool_dir=spool, flush_interval_s=0.02)
    await restarted.start()
    deadline = time.monotonic() + 10
    while restarted.stats.replayed < result["spooled"] and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await restarted.aclose()
    assert restarted.stats.replayed == result["spooled"] and restarted.stats.dropped == 0
    assert sorted(_stored_ids(url)) == [f"rec-{i:06d}" for i in range(result["submitted"])]  # exactly once each
    assert list(spool.glob("spool-*.jsonl")) == []


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2]))
