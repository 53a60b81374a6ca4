"""The registry writer: complete versions only, atomic `current`, promote/rollback history, the task lock."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gateway.manifest import Manifest, RouterSpec, TextInput
from router_models.export import make_manifest
from router_models.registry import (
    RegistryError,
    RegistryLockedError,
    VersionNotFoundError,
    current_version,
    list_versions,
    promote,
    prune,
    remove_stale_temporaries,
    rollback,
    task_lock,
    version_name,
    write_version,
)

TASK = "intent"
REPO = Path(__file__).resolve().parents[1]


def _manifest(model: bytes, version: str) -> Manifest:
    return make_manifest(
        task=TASK, version=version, student="tfidf", labels=["a", "b"], input_spec=TextInput(), temperature=1.0,
        router=RouterSpec(features=["max_prob"], weights=[1.0], bias=0.0, ood_threshold=0.9), tau=0.5,
        target_agreement=0.97, model_sha256=hashlib.sha256(model).hexdigest(),
    )  # fmt: skip


def _version(root: Path, n: int) -> str:
    model = f"model {n}".encode()
    name = f"2026010{n}T000000Z-{hashlib.sha256(model).hexdigest()[:6]}"
    write_version(root, TASK, {"model.onnx": model, "report.md": b"# r"}, _manifest(model, name))
    return name


def test_version_names_sort_by_time_and_name_the_model():
    from datetime import UTC, datetime

    name = version_name("abcdef" + "0" * 58, datetime(2026, 11, 29, 5, 15, tzinfo=UTC))
    assert name == "20261129T051500Z-abcdef"


def test_write_version_is_complete_and_rejects_a_wrong_sha(tmp_path):
    name = _version(tmp_path, 1)
    vdir = tmp_path / TASK / "versions" / name
    assert sorted(p.name for p in vdir.iterdir()) == ["manifest.json", "model.onnx", "report.md"]
    bad = _manifest(b"other bytes", "20260109T000000Z-000000")
    with pytest.raises(RegistryError, match="sha256"):
        write_version(tmp_path, TASK, {"model.onnx": b"not the model"}, bad)
    # The failed write leaves neither a version nor a temporary directory behind.
    assert [v.version for v in list_versions(tmp_path, TASK)] == [name]
    assert not list((tmp_path / TASK / "versions").glob(".tmp-*"))
    with pytest.raises(RegistryError, match="already exists"):
        _version(tmp_path, 1)


def test_promote_then_rollback_walks_back_one_promotion_at_a_time(tmp_path):
    v1, v2, v3 = (_version(tmp_path, n) for n in (1, 2, 3))
    assert current_version(tmp_path, TASK) is None
    assert promote(tmp_path, TASK, v1) is None
    assert promote(tmp_path, TASK, v2) == v1
    assert promote(tmp_path, TASK, v3) == v2
    assert rollback(tmp_path, TASK) == v2
    assert current_version(tmp_path, TASK) == v2
    assert rollback(tmp_path, TASK) == v1
    with pytest.raises(RegistryError, match="no earlier"):
        rollback(tmp_path, TASK)
    history = [json.loads(line) for line in (tmp_path / TASK / "history.jsonl").read_text().splitlines()]
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", v1, None), ("promote", v2, v1), ("promote", v3, v2), ("rollback", v2, v3), ("rollback", v1, v2),
    ]  # fmt: skip
    listed = {v.version: v.current for v in list_versions(tmp_path, TASK)}
    assert listed == {v1: True, v2: False, v3: False}


def test_promote_refuses_missing_or_tampered_versions(tmp_path):
    v1 = _version(tmp_path, 1)
    with pytest.raises(VersionNotFoundError):
        promote(tmp_path, TASK, "20990101T000000Z-abcdef")
    (tmp_path / TASK / "versions" / v1 / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256"):
        promote(tmp_path, TASK, v1)
    assert current_version(tmp_path, TASK) is None


@pytest.mark.parametrize("typed", ["{v}/", "./{v}"])
def test_a_version_typed_with_a_path_around_it_is_promoted_under_its_plain_name(tmp_path, typed):
    """Tab completion inside versions/ adds "/": `current` still gets the plain name, the only one gateways
    read, and promoting the current version again is still a no-op."""
    v1, v2 = _version(tmp_path, 1), _version(tmp_path, 2)
    promote(tmp_path, TASK, v1)
    assert promote(tmp_path, TASK, typed.format(v=v2)) == v1
    assert current_version(tmp_path, TASK) == v2
    assert promote(tmp_path, TASK, typed.format(v=v2)) == v2  # already current: unchanged
    history = [json.loads(line) for line in (tmp_path / TASK / "history.jsonl").read_text().splitlines()]
    assert [h["version"] for h in history] == [v1, v2]
    assert rollback(tmp_path, TASK) == v1


def test_a_version_name_with_a_path_in_it_is_refused_and_a_symlinked_version_is_not(tmp_path):
    v1 = _version(tmp_path, 1)
    other = tmp_path / "other" / TASK / "versions"
    shutil.copytree(tmp_path / TASK / "versions" / v1, other / v1)
    for typed in (f"../../other/{TASK}/versions/{v1}", f"../versions/{v1}", ".."):
        with pytest.raises(VersionNotFoundError, match="is not a version name"):
            promote(tmp_path, TASK, typed)
    assert current_version(tmp_path, TASK) is None
    # A version kept elsewhere and linked into versions/ is a version like any other (gateways load it).
    store = tmp_path / "store"
    (tmp_path / TASK / "versions" / v1).rename(store)
    (tmp_path / TASK / "versions" / v1).symlink_to(store)
    promote(tmp_path, TASK, v1)
    assert current_version(tmp_path, TASK) == v1


def test_current_never_names_an_incomplete_version(tmp_path):
    """A reader polling as fast as it can while versions are written and promoted never sees `current`
    name a directory without a verified model.onnx and manifest.json."""
    names = [_version(tmp_path, 1)]
    promote(tmp_path, TASK, names[0])
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            name = current_version(tmp_path, TASK)
            vdir = tmp_path / TASK / "versions" / str(name)
            try:
                manifest = Manifest.model_validate_json((vdir / "manifest.json").read_bytes())
                if hashlib.sha256((vdir / "model.onnx").read_bytes()).hexdigest() != manifest.model_sha256:
                    problems.append(f"{name}: model does not match manifest")
            except (OSError, ValueError) as exc:
                problems.append(f"{name}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(2, 10):
            model = os.urandom(200_000)
            name = f"2026020{n}T000000Z-{hashlib.sha256(model).hexdigest()[:6]}"
            write_version(tmp_path, TASK, {"model.onnx": model}, _manifest(model, name))
            promote(tmp_path, TASK, name)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert not list((tmp_path / TASK).glob(".current*"))  # no temp pointer left behind


def test_the_lock_keeps_a_second_run_out_and_is_released_when_the_holder_exits(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from router_models.registry import task_lock\n"
            f"with task_lock(Path({str(tmp_path)!r}), {TASK!r}):\n"
            "    print('locked', flush=True); time.sleep(30)\n"
        )],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        v1 = _version(tmp_path, 1)
        start = time.monotonic()
        with pytest.raises(RegistryLockedError, match=f"pid {holder.pid}"):
            promote(tmp_path, TASK, v1)
        assert time.monotonic() - start < 1.0  # fails fast, does not wait
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    promote(tmp_path, TASK, v1)  # the kernel released the dead holder's lock
    with task_lock(tmp_path, TASK):
        promote(tmp_path, TASK, v1, lock=False)  # a holder can still promote
    assert current_version(tmp_path, TASK) == v1


def test_promote_refuses_a_version_gateways_would_refuse_for_its_name_or_task(tmp_path):
    """A version copied under another name, or one whose manifest is another task's: every gateway refuses
    it, so `current` must not move to it (a replica that restarts would serve nothing)."""
    v1 = _version(tmp_path, 1)
    promote(tmp_path, TASK, v1)
    versions = tmp_path / TASK / "versions"
    shutil.copytree(versions / v1, versions / "hotfix1")
    with pytest.raises(RegistryError, match="its directory is 'hotfix1'"):
        promote(tmp_path, TASK, "hotfix1")
    other = tmp_path / "sentiment" / "versions"
    other.mkdir(parents=True)
    shutil.copytree(versions / v1, other / v1)
    with pytest.raises(RegistryError, match="is for task 'intent', not 'sentiment'"):
        promote(tmp_path, "sentiment", v1)
    assert current_version(tmp_path, TASK) == v1 and current_version(tmp_path, "sentiment") is None


def test_a_check_that_refuses_keeps_current_where_it_was(tmp_path):
    v1, v2 = _version(tmp_path, 1), _version(tmp_path, 2)
    promote(tmp_path, TASK, v1)

    def refuse(version_dir: Path) -> None:
        raise RegistryError(f"no: {version_dir.name}")

    with pytest.raises(RegistryError, match=f"no: {v2}"):
        promote(tmp_path, TASK, v2, check=refuse)
    assert current_version(tmp_path, TASK) == v1


def test_rollback_skips_a_version_whose_manifest_is_corrupt(tmp_path):
    v1, v2, v3 = (_version(tmp_path, n) for n in (1, 2, 3))
    for v in (v1, v2, v3):
        promote(tmp_path, TASK, v)
    (tmp_path / TASK / "versions" / v2 / "manifest.json").write_text('{"task": "intent", "trunc')
    assert rollback(tmp_path, TASK) == v1
    (tmp_path / TASK / "versions" / v1 / "manifest.json").write_text('{"schema_version": 99}')
    promote(tmp_path, TASK, v3)
    with pytest.raises(RegistryError, match="no earlier complete version"):
        rollback(tmp_path, TASK)
    assert current_version(tmp_path, TASK) == v3


def test_the_cli_refuses_to_promote_or_roll_back_to_what_the_gateway_would_not_load(tmp_path):
    """`apprentice registry promote` and `rollback` load a version as a gateway would: a real model whose labels
    are not the config's is refused with the gateway's reason (promote: exit code 2, `current` stays), and
    rollback passes over it to the version before."""
    from task_stack import INTENTS, put_version

    registry = tmp_path / "registry"
    older = put_version(registry, TASK, promote=False)
    other = put_version(registry, TASK, labels=[*INTENTS[:-1], "not_configured"], promote=False)
    newest = put_version(registry, TASK, promote=False)
    for version in (older, other, newest):
        promote(registry, TASK, version)  # the library alone checks only what it can without the gateway
    config = tmp_path / "apprentice.yaml"
    config.write_text(
        yaml.safe_dump({"tasks": {TASK: {"teacher": "gpt-4o", "labels": INTENTS}}, "registry": {"path": str(registry)}})
    )
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "router_models.cli", "registry", *args, "--task", TASK]
        return subprocess.run([*command, "--config", str(config)], capture_output=True, text=True, env=env, cwd=REPO)

    refused = cli("promote", other)
    assert refused.returncode == 2, refused.stderr
    assert f"gateways would refuse version {other}" in refused.stderr and "not_configured" in refused.stderr
    assert current_version(registry, TASK) == newest
    rolled = cli("rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert current_version(registry, TASK) == older, "rollback must pass over the version gateways refuse"


def test_promoting_the_current_version_changes_nothing_and_rollback_never_returns_to_it(tmp_path):
    """Re-promoting the current version once wrote a second history entry for it, and the next rollback then
    reported success while `current` stayed on the version the operator wanted gone."""
    v1, v2 = (_version(tmp_path, n) for n in (1, 2))
    promote(tmp_path, TASK, v1)
    promote(tmp_path, TASK, v2)
    history = tmp_path / TASK / "history.jsonl"
    before = history.read_text()
    assert promote(tmp_path, TASK, v2) == v2
    assert history.read_text() == before
    # A history an older apprentice wrote, with the current version promoted twice in a row.
    with history.open("a") as f:
        f.write(json.dumps({"action": "promote", "version": v2, "previous": v2, "at": time.time()}) + "\n")
    assert rollback(tmp_path, TASK) == v1
    assert current_version(tmp_path, TASK) == v1


@pytest.mark.parametrize(
    "command", [["registry", "rollback"], ["registry", "promote", "v1"], ["registry", "list"], ["distill"]]
)
def test_a_registry_path_that_is_a_file_is_one_line_not_a_traceback(tmp_path, command):
    from task_stack import INTENTS

    registry = tmp_path / "registry-file"
    registry.write_text("not a directory")
    config = tmp_path / "apprentice.yaml"
    config.write_text(
        yaml.safe_dump({
            "tasks": {TASK: {"teacher": "gpt-4o", "labels": INTENTS}}, "registry": {"path": str(registry)},
            "log": {"url": f"sqlite:///{tmp_path / 'log.db'}"},
        })
    )  # fmt: skip
    (tmp_path / "log.db").touch()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "router_models.cli", *command, "--task", TASK, "--config", str(config)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "registry-file" in proc.stderr and proc.stderr.startswith("error: ")


def test_registry_list_shows_a_version_it_cannot_read_and_a_current_that_names_nothing(tmp_path):
    from task_stack import INTENTS

    v1, v2 = _version(tmp_path, 1), _version(tmp_path, 2)
    promote(tmp_path, TASK, v2)
    (tmp_path / TASK / "versions" / v2 / "manifest.json").write_text("{ damaged")
    config = tmp_path / "apprentice.yaml"
    config.write_text(yaml.safe_dump({"tasks": {TASK: {"teacher": "gpt-4o", "labels": INTENTS}},
                                      "registry": {"path": str(tmp_path)}}))  # fmt: skip
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}

    def listed() -> list[str]:
        args = [sys.executable, "-m", "router_models.cli", "registry", "list", "--task", TASK, "--config", str(config)]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    first, second = listed()
    assert first.startswith(f"  {v1}  tfidf")
    assert second.startswith(f"* {v2}  unreadable manifest: ")  # the current version, and why it is broken
    (tmp_path / TASK / "current").write_text("20990101T000000Z-gone00\n")
    assert listed()[-1] == "! current names '20990101T000000Z-gone00', which is not a version here: gateways refuse it"


def test_prune_keeps_the_newest_the_current_and_what_rollback_can_reach(tmp_path):
    names = [_version(tmp_path, n) for n in range(1, 9)]  # eight versions, oldest first
    for name in (names[0], names[2], names[4]):
        promote(tmp_path, TASK, name)  # promoted in turn: the third is current, two rollback steps behind it
    dry = tmp_path / TASK / "dry-runs"
    for name in names[:4]:
        (dry / name).mkdir(parents=True)
    # keep=2: the two newest, the current one and the two versions rollback walks back to stay.
    doomed = [names[1], names[3], names[5]]
    assert prune(tmp_path, TASK, 2, dry_run=True) == doomed
    assert len(list_versions(tmp_path, TASK)) == 8  # a dry run deletes nothing
    assert prune(tmp_path, TASK, 2) == doomed
    assert [v.version for v in list_versions(tmp_path, TASK)] == [names[i] for i in (0, 2, 4, 6, 7)]
    assert sorted(p.name for p in dry.iterdir()) == names[2:4]  # the two newest dry-run reports
    assert not any(p.name.startswith(".") for p in (tmp_path / TASK / "versions").iterdir())
    assert current_version(tmp_path, TASK) == names[4]
    assert rollback(tmp_path, TASK) == names[2] and rollback(tmp_path, TASK) == names[0]
    with pytest.raises(RegistryError, match="at least 1"):
        prune(tmp_path, TASK, 0)


def test_the_prune_command_takes_keep_from_the_flag_or_the_config(tmp_path):
    from task_stack import INTENTS

    names = [_version(tmp_path, n) for n in range(1, 5)]
    promote(tmp_path, TASK, names[-1])
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}

    def cli(registry: dict, *args: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "apprentice.yaml"
        config.write_text(yaml.safe_dump({"tasks": {TASK: {"teacher": "gpt-4o", "labels": INTENTS}},
                                          "registry": {"path": str(tmp_path), **registry}}))  # fmt: skip
        command = [sys.executable, "-m", "router_models.cli", "registry", "prune", "--task", TASK, *args]
        return subprocess.run([*command, "--config", str(config)], capture_output=True, text=True, env=env, cwd=REPO)

    refused = cli({})
    assert refused.returncode == 2 and "--keep N, or set registry.keep_versions" in refused.stderr
    dry = cli({}, "--keep", "2", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip() == f"{TASK}: would delete 2 version(s): {names[0]} {names[1]}"
    done = cli({"keep_versions": 3})
    assert done.returncode == 0 and done.stdout.strip() == f"{TASK}: deleted 1 version(s): {names[0]}"
    assert [v.version for v in list_versions(tmp_path, TASK)] == names[1:]


def test_the_registry_lock_waits_for_a_holder_that_lets_go_and_no_longer(tmp_path):
    """Distill's write step waits for a promote or rollback that holds the registry's lock; a holder that
    keeps it past the wait is an error, not a hang."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with task_lock(tmp_path, TASK):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    t0 = time.monotonic()
    with pytest.raises(RegistryLockedError), task_lock(tmp_path, TASK, wait_s=0.3):
        pass
    assert time.monotonic() - t0 >= 0.3
    threading.Timer(0.3, release.set).start()
    with task_lock(tmp_path, TASK, wait_s=10):
        assert release.is_set()  # acquired only once the holder let go
    thread.join(5)


def test_stale_temporaries_that_vanish_while_being_looked_at_are_no_error(tmp_path, monkeypatch):
    (tmp_path / TASK / "versions").mkdir(parents=True)
    gone = tmp_path / TASK / "versions" / ".tmp-prune-gone-1"
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter([gone]))  # listed, then deleted by a prune
    assert remove_stale_temporaries(tmp_path, TASK) == 0


def test_a_current_pointer_no_file_system_can_open_scores_as_no_current_version(tmp_path):
    from router_models.distill import _current_holdout

    (tmp_path / TASK / "versions").mkdir(parents=True)
    (tmp_path / TASK / "current").write_text("x" * 300 + "\n")  # ENAMETOOLONG as a path
    assert _current_holdout(tmp_path, TASK, [], 0.97) == ("x" * 300, None, None)
