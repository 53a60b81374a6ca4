"""gateway.registry.RegistryReader: loading `current`, refusing broken versions, hot swaps under load.

Versions are real TF-IDF artifacts written and promoted by router_models (export + registry writer); broken
ones are made by copying a good version and damaging one thing, then pointing `current` at it by hand (the
real writer refuses to promote them).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway.registry import RegistryReader, ReloadResult
from router_models.export import write_tfidf_version
from router_models.registry import promote

TASK = "intent"
LABELS = ["balance", "bye", "greet"]
TEXTS = [
    "hello there", "hi friend", "good morning to you", "hey how are you",
    "bye now", "see you later", "goodbye friend", "farewell and take care",
    "what is my balance", "how much money do i have", "show my account balance", "balance please",
]  # fmt: skip
TARGETS = ["greet"] * 4 + ["bye"] * 4 + ["balance"] * 4
QUERIES = ["hello friend", "see you", "my balance please", "qwzx"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A registry with two good versions of TASK (v1 current); each test copies it."""
    root = tmp_path_factory.mktemp("template")
    v1 = write_tfidf_version(root, TASK, TEXTS, TARGETS, LABELS, c=10.0, tau=0.5)
    v2 = write_tfidf_version(root, TASK, TEXTS, TARGETS, LABELS, c=2.0, tau=0.5, do_promote=False)
    return root, v1.name, v2.name


@pytest.fixture
def registry(template: tuple[Path, str, str], tmp_path: Path) -> Path:
    shutil.copytree(template[0], tmp_path / "registry")
    return tmp_path / "registry"


@pytest.fixture
def v1(template: tuple[Path, str, str]) -> str:
    return template[1]


@pytest.fixture
def v2(template: tuple[Path, str, str]) -> str:
    return template[2]


def point(registry: Path, version: str, task: str = TASK) -> None:
    """Move `current` the way the writer does (temp file + os.replace), without its verification."""
    tmp = registry / task / ".current.test.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, registry / task / "current")


_names = itertools.count(1)


def broken_copy(registry: Path, version: str, case: str) -> str:
    """A copy of `version` damaged as `case` says; returns its version name."""
    src = registry / TASK / "versions" / version
    name = f"{version[:-6]}{next(_names):06x}"
    dst = src.parent / name
    dst.mkdir()
    model = (src / "model.onnx").read_bytes()
    manifest = json.loads((src / "manifest.json").read_text()) | {"version": name}
    if case == "sha_mismatch":
        model = model[:-1] + bytes([model[-1] ^ 1])
    elif case == "labels_mismatch":
        manifest["labels"] = ["balance", "bye", "weather"]
    elif case == "truncated":
        model = model[: len(model) // 3]
        manifest["model_sha256"] = hashlib.sha256(model).hexdigest()
    (dst / "model.onnx").write_bytes(model)
    text = '{"task": "intent", "version": ' if case == "invalid_manifest" else json.dumps(manifest)
    (dst / "manifest.json").write_text(text)
    return name


def make_reader(registry: Path, events: list[ReloadResult] | None = None, interval: float = 0.1) -> RegistryReader:
    return RegistryReader(
        registry,
        {TASK: list(reversed(LABELS))},
        poll_interval_s=interval,
        on_load=events.append if events is not None else None,
    )


def test_no_pointer_means_no_specialist(tmp_path: Path) -> None:
    reader = make_reader(tmp_path)
    assert [r.outcome for r in reader.poll()] == ["no_pointer"]
    assert reader.get(TASK) is None
    assert reader.poll() == []  # nothing changed, nothing reported
    assert reader.get("unknown-task") is None


def test_loads_current_and_reports_it(registry: Path, v1: str, caplog: pytest.LogCaptureFixture) -> None:
    events: list[ReloadResult] = []
    reader = make_reader(registry, events)
    with caplog.at_level(logging.INFO, logger="apprentice.registry"):
        (result,) = reader.poll()
    assert (result.outcome, result.version, result.serving, result.previous) == ("loaded", v1, v1, None)
    specialist = reader.get(TASK)
    assert specialist is not None and specialist.version == v1
    assert specialist.decide("my balance please").label == "balance"
    assert reader.loads_ok[TASK] == 1 and events == [result] and result.result == "loaded"
    assert any(TASK in r.message and v1 in r.message and "loaded" in r.message for r in caplog.records)
    assert reader.poll() == []  # unchanged pointer: no reload
    assert reader.get(TASK) is specialist


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("sha_mismatch", "sha_mismatch"),
        ("labels_mismatch", "labels_mismatch"),
        ("truncated", "corrupt"),
        ("invalid_manifest", "bad_manifest"),
    ],
)
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    registry: Path, v1: str, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[ReloadResult] = []
    reader = make_reader(registry, events)
    reader.poll()
    old = reader.get(TASK)
    bad = broken_copy(registry, v1, case)
    point(registry, bad)
    with caplog.at_level(logging.WARNING, logger="apprentice.registry"):
        (result,) = reader.poll()
    assert (result.outcome, result.reason, result.version, result.serving) == ("refused", reason, bad, v1)
    assert reader.get(TASK) is old
    assert old is not None and old.decide("hello friend").label == "greet"
    assert reader.load_failures[(TASK, reason)] == 1 and events[-1].result == reason
    (line,) = [r.getMessage() for r in caplog.records]
    assert TASK in line and bad in line and reason in line

    # Not retried in a hot loop: the same pointer is attempted once...
    for _ in range(3):
        assert reader.poll() == []
    assert reader.load_failures[(TASK, reason)] == 1 and len(events) == 2
    # ...until the pointer is written again, or an admin reload asks.
    point(registry, bad)
    assert [r.outcome for r in reader.poll()] == ["refused"]
    assert reader.reload(TASK).outcome == "refused"
    assert reader.load_failures[(TASK, reason)] == 3
    assert reader.get(TASK) is old


def test_a_fixed_pointer_loads_after_a_refusal(registry: Path, v1: str, v2: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    point(registry, broken_copy(registry, v1, "sha_mismatch"))
    reader.poll()
    promote(registry, TASK, v2)
    (result,) = reader.poll()
    assert (result.outcome, result.previous, result.serving) == ("loaded", v1, v2)
    assert reader.get(TASK).version == v2  # type: ignore[union-attr]
    assert reader.last_result(TASK) == result


@pytest.mark.parametrize("content", ["../../../etc/passwd", "", "versions/x y"])
def test_a_pointer_that_names_no_version_is_refused(registry: Path, v1: str, content: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    point(registry, content)
    (result,) = reader.poll()
    assert (result.outcome, result.reason) == ("refused", "bad_pointer")
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


def test_an_unreadable_pointer_is_refused(registry: Path, v1: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    (registry / TASK / "current").write_bytes(b"\xff\xfe\x00garbage")
    (result,) = reader.poll()
    assert (result.outcome, result.reason, result.version) == ("refused", "bad_pointer", None)
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


def test_a_pointer_to_a_missing_version_is_refused(registry: Path, v1: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    point(registry, "20990101T000000Z-abcdef")
    (result,) = reader.poll()
    assert (result.outcome, result.reason) == ("refused", "missing_file")
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


def test_a_version_that_arrives_after_its_pointer_is_loaded_when_it_does(
    registry: Path, v1: str, v2: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A synced registry may copy `current` before the version directory; the pointer then never changes
    again, so the reader tries again, less often each time, and reports the refusal once."""
    events: list[ReloadResult] = []
    reader = make_reader(registry, events, interval=0.2)
    reader.poll()
    parked = registry / "parked"
    (registry / TASK / "versions" / v2).rename(parked)
    point(registry, v2)
    with caplog.at_level(logging.WARNING, logger="apprentice.registry"):
        (result,) = reader.poll()
        assert (result.outcome, result.reason) == ("refused", "missing_file")
        previous = 0.0
        for delay in (0.2, 0.4, 0.8):  # the wait doubles from the poll interval
            assert reader.poll() == [], "tried again before the delay"
            if previous:  # past the last wait, still inside this one: the wait grew
                time.sleep(previous + 0.05)
                assert reader.poll() == [], "the wait did not double"
            time.sleep(delay - (previous + 0.05 if previous else 0.0) + 0.02)
            (result,) = reader.poll()
            assert (result.outcome, result.reason) == ("refused", "missing_file")
            previous = delay
    assert reader.load_failures[(TASK, "missing_file")] == 1
    assert [e.outcome for e in events] == ["loaded", "refused"]
    assert sum("refused" in m for m in caplog.messages) == 1
    parked.rename(registry / TASK / "versions" / v2)
    time.sleep(1.7)
    (result,) = reader.poll()
    assert (result.outcome, result.version) == ("loaded", v2)
    assert reader.get(TASK).version == v2  # type: ignore[union-attr]


def test_a_pointer_moved_while_a_retry_waits_is_read_at_the_next_poll(registry: Path, v1: str) -> None:
    """Back at the serving version after a refusal: reported as "unchanged" (the refusal is over, the
    gateway's refused gauge drops), without waiting for the retry; then a pointer that goes is reported."""
    events: list[ReloadResult] = []
    reader = make_reader(registry, events, interval=30.0)
    reader.poll()
    point(registry, "20990101T000000Z-abcdef")
    assert [r.reason for r in reader.poll()] == ["missing_file"]
    point(registry, v1)
    (result,) = reader.poll()
    assert (result.outcome, result.version, result.serving) == ("unchanged", v1, v1)
    (registry / TASK / "current").unlink()
    assert [r.outcome for r in reader.poll()] == ["no_pointer"]
    assert [e.outcome for e in events] == ["loaded", "refused", "unchanged", "no_pointer"]
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


def test_a_task_directory_or_pointer_that_cannot_be_read_is_a_refusal_tried_again(
    registry: Path, v1: str, v2: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader = make_reader(registry, interval=0.05)
    reader.poll()
    (registry / TASK).rename(registry / "moved")
    (registry / TASK).write_text("a file where the task's directory was")
    with caplog.at_level(logging.WARNING, logger="apprentice.registry"):
        for _ in range(3):
            (result,) = reader.poll()
            assert (result.outcome, result.reason) == ("refused", "bad_pointer")
            assert "cannot read" in result.detail
            time.sleep(0.5)
    assert not any(record.exc_info for record in caplog.records)
    assert reader.load_failures[(TASK, "bad_pointer")] == 1
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]
    (registry / TASK).unlink()
    (registry / "moved").rename(registry / TASK)
    time.sleep(0.5)
    (result,) = reader.poll()
    assert (result.outcome, result.version) == ("unchanged", v1)
    # A pointer that can be stat'ed but not read (here a directory; on NFS, a stale handle) is tried again too.
    current = registry / TASK / "current"
    current.unlink()
    current.mkdir()
    (result,) = reader.poll()
    assert (result.outcome, result.reason) == ("refused", "bad_pointer")
    current.rmdir()
    point(registry, v2)
    (result,) = reader.poll()
    assert (result.outcome, result.version) == ("loaded", v2)


def test_a_vanished_pointer_keeps_the_loaded_version(registry: Path, v1: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    (registry / TASK / "current").unlink()
    assert [r.outcome for r in reader.poll()] == ["no_pointer"]
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


def test_reload_of_an_unknown_task_is_a_key_error(registry: Path) -> None:
    reader = make_reader(registry)
    with pytest.raises(KeyError):
        reader.reload("nope")
    assert reader.reload(TASK).outcome == "loaded"
    assert reader.reload(TASK).outcome == "unchanged"


def test_a_failing_metrics_callback_does_not_stop_the_swap(registry: Path, v1: str) -> None:
    def explode(result: ReloadResult) -> None:
        raise RuntimeError("metrics down")

    reader = RegistryReader(registry, {TASK: LABELS}, on_load=explode)
    reader.poll()
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]


async def test_the_poller_picks_up_a_new_current_within_the_interval(registry: Path, v1: str, v2: str) -> None:
    interval = 0.2
    reader = make_reader(registry, interval=interval)
    await reader.start()
    assert reader.get(TASK).version == v1  # type: ignore[union-attr]
    await asyncio.to_thread(promote, registry, TASK, v2)
    promoted = time.monotonic()
    while reader.get(TASK).version != v2:  # type: ignore[union-attr]
        assert time.monotonic() - promoted < interval + 2.0, "not picked up"
        await asyncio.sleep(0.01)
    took = time.monotonic() - promoted
    print(f"\nnew version served {took * 1000:.0f} ms after the promotion (poll interval {interval * 1000:.0f} ms)")
    # within one interval plus the load itself (a few ms for this model; generous for a shared machine)
    assert took < interval + 1.0
    result = await reader.areload(TASK)
    assert result.outcome == "unchanged"
    await reader.stop()
    await reader.stop()  # idempotent


async def test_stop_ends_the_polling(registry: Path, v2: str) -> None:
    reader = make_reader(registry, interval=0.05)
    await reader.start()
    await reader.stop()
    await asyncio.to_thread(promote, registry, TASK, v2)
    await asyncio.sleep(0.2)
    assert reader.get(TASK).version != v2  # type: ignore[union-attr]


def test_swapping_while_threads_decide_never_fails(registry: Path, v1: str, v2: str) -> None:
    reader = make_reader(registry)
    reader.poll()
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        local: Counter[str] = Counter()
        n = 0
        while not stop.is_set():
            try:
                specialist = reader.get(TASK)
                assert specialist is not None
                decision = specialist.decide(QUERIES[n % len(QUERIES)])
                assert decision.label in LABELS
                local[decision.version] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure at all is what this test counts
                errors.append(exc)
            n += 1
        with lock:
            seen.update(local)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        version = v2 if swaps % 2 == 0 else v1
        point(registry, version)
        assert [r.outcome for r in reader.poll()] == ["loaded"]
        swaps += 1
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert seen[v1] > 0 and seen[v2] > 0
    assert reader.loads_ok[TASK] == swaps + 1
    print(f"\n{swaps} swaps under {sum(seen.values())} decide() calls from 4 threads, 0 errors")
