"""The registry writer: write a version completely, then move the task's `current` pointer atomically.

Layout (the contract with `gateway.registry`, which only reads):
    <registry>/<task>/versions/<version>/model.onnx, manifest.json, report.*, (tokenizer.json)
    <registry>/<task>/current         the version name; replaced with a temp file + os.replace
    <registry>/<task>/history.jsonl   {time, version, previous, action} per promotion or rollback
    <registry>/<task>/.lock           fcntl lock held while the registry changes (write, promote, rollback, prune)
    <registry>/<task>/.distill.lock   fcntl lock held by a distill run from start to end: one run at a time,
                                      while promote and rollback stay free during its hours of training

A version directory is assembled under a hidden temporary name and renamed into place, so `versions/`
never shows a half-written version, and `current` is only ever pointed at a directory whose model.onnx
matches the manifest's sha256.

Exceptions: RegistryError, and its subclasses RegistryLockedError (another run holds the task's lock) and
VersionNotFoundError.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.manifest import Manifest

CURRENT = "current"
HISTORY = "history.jsonl"
LOCK = ".lock"
DISTILL_LOCK = ".distill.lock"
VERSIONS = "versions"
log = logging.getLogger("apprentice.registry")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


class RegistryLockedError(RegistryError):
    """Another distill, promote or rollback holds the task's lock."""


class VersionNotFoundError(RegistryError):
    """No complete version of that name exists for the task."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    path: Path
    created_at: str
    student: str
    current: bool
    tau: float
    metrics: dict[str, Any] = field(default_factory=dict)
    # Why the version's manifest cannot be read (only listed with `include_unreadable`), else None.
    problem: str | None = None


def version_name(model_sha256: str, now: datetime | None = None) -> str:
    """UTC "YYYYMMDDTHHMMSSZ-<6 hex of the model sha>": sorts by time, differs when the model does."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{model_sha256[:6]}"


def task_dir(registry_dir: Path, task: str) -> Path:
    return Path(registry_dir) / task


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def task_lock(registry_dir: Path, task: str, *, name: str = LOCK, wait_s: float = 0.0) -> Iterator[None]:
    """Hold <registry>/<task>/`name` exclusively (LOCK: the registry changes; DISTILL_LOCK: a distill run);
    if another process holds it, wait up to `wait_s` seconds, then fail."""
    directory = task_dir(registry_dir, task)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
                raise RegistryLockedError(
                    f"task {task!r} is locked by another run ({holder}); lock file {path}. "
                    "Wait for it to finish; the lock is released automatically when that process exits."
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}".encode(), 0)
        yield
    finally:
        # Closing the descriptor releases the flock (also when the process dies).
        os.close(fd)


# A deeper check of a version before `current` may point at it: the CLI passes the gateway's own loader, so
# that a version every gateway would refuse (labels that differ from the config, a graph that does not run)
# is never promoted. It raises RegistryError to refuse.
VersionCheck = Callable[[Path], None]


def _verify(version_dir: Path, task: str, check: VersionCheck | None = None) -> Manifest:
    """The version's manifest, once the version is complete, is for `task`, is named as its directory, and its
    model has the manifest's sha256 (and `check` accepts it); else RegistryError."""
    manifest_path = version_dir / "manifest.json"
    model_path = version_dir / "model.onnx"
    if not manifest_path.is_file() or not model_path.is_file():
        raise VersionNotFoundError(f"{version_dir} is not a complete version (model.onnx + manifest.json)")
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()[:3]
        raise RegistryError(f"{manifest_path} is not a valid manifest: {' '.join(first)}") from exc
    if manifest.task != task:
        raise RegistryError(f"{manifest_path} is for task {manifest.task!r}, not {task!r}")
    if manifest.version != version_dir.name:
        raise RegistryError(
            f"{manifest_path} names version {manifest.version!r}, but its directory is {version_dir.name!r}; "
            "gateways refuse such a version (promote it under the name its manifest gives, or write a new one)"
        )
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    if digest != manifest.model_sha256:
        raise RegistryError(f"{model_path} has sha256 {digest}, manifest says {manifest.model_sha256}")
    if check is not None:
        check(version_dir)
    return manifest


def write_version(registry_dir: Path, task: str, files: Mapping[str, bytes | Path], manifest: Manifest) -> Path:
    """Write model.onnx, the other `files` (name -> bytes or a file to copy) and manifest.json (last) into
    a hidden temporary directory, fsync, then rename it to versions/<manifest.version>. Returns that path."""
    if manifest.task != task:
        raise RegistryError(f"manifest is for task {manifest.task!r}, not {task!r}")
    if "model.onnx" not in files:
        raise RegistryError("a version needs model.onnx")
    if "manifest.json" in files:
        raise RegistryError("manifest.json is written from the manifest argument")
    versions = task_dir(registry_dir, task) / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / manifest.version
    if final.exists():
        raise RegistryError(f"version {manifest.version} already exists at {final}")
    tmp = versions / f".tmp-{manifest.version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, content in files.items():
            if Path(name).name != name or name.startswith("."):
                raise RegistryError(f"file name {name!r} must be a plain name")
            data = content if isinstance(content, bytes) else Path(content).read_bytes()
            _write_file(tmp / name, data)
        digest = hashlib.sha256((tmp / "model.onnx").read_bytes()).hexdigest()
        if digest != manifest.model_sha256:
            raise RegistryError(f"model.onnx has sha256 {digest}, manifest says {manifest.model_sha256}")
        _write_file(tmp / "manifest.json", manifest.model_dump_json(indent=2).encode())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(versions)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def current_version(registry_dir: Path, task: str) -> str | None:
    """The version `current` names, or None if the task has never been promoted."""
    try:
        name = (task_dir(registry_dir, task) / CURRENT).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return name or None


def _history(registry_dir: Path, task: str) -> list[dict[str, Any]]:
    path = task_dir(registry_dir, task) / HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entries.append(json.loads(line))
    return entries


def registry_mark(registry_dir: Path, task: str) -> tuple[str | None, int]:
    """(the version `current` names, how many promotions and rollbacks the history holds): changes with every
    promote and rollback, also one that returns to the same version."""
    path = task_dir(registry_dir, task) / HISTORY
    try:
        with open(path, "rb") as fh:
            entries = sum(1 for line in fh if line.strip())
    except FileNotFoundError:
        entries = 0
    return current_version(registry_dir, task), entries


def _set_current(registry_dir: Path, task: str, version: str, action: str) -> str | None:
    directory = task_dir(registry_dir, task)
    previous = current_version(registry_dir, task)
    tmp = directory / f".{CURRENT}.{os.getpid()}.tmp"
    _write_file(tmp, f"{version}\n".encode())
    os.replace(tmp, directory / CURRENT)
    _fsync_dir(directory)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": version,
        "previous": previous,
        "action": action,
    }
    with open(directory / HISTORY, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return previous


def plain_version_name(version: str) -> str:
    """A version name as an operator may type it, made plain: tab completion's trailing "/", or "./NAME", name
    the same directory, but `current` must hold the plain name, the only form gateways accept. Read as written,
    not resolved, so a version symlinked into versions/ stays one. The result may still hold a path ("../x")."""
    return os.path.normpath(version)


def _version_dir(registry_dir: Path, task: str, version: str) -> tuple[str, Path]:
    """(the version's plain name, its directory); a name with a path in it ("../x", "a/b") is refused."""
    versions = task_dir(registry_dir, task) / VERSIONS
    name = plain_version_name(version)
    if os.sep in name or name.startswith("."):
        raise VersionNotFoundError(f"{version!r} is not a version name of task {task!r} (a directory of {versions})")
    version_dir = versions / name
    if not version_dir.is_dir():
        raise VersionNotFoundError(f"task {task!r} has no version {version!r} under {versions}")
    return name, version_dir


def promote(
    registry_dir: Path, task: str, version: str, *, lock: bool = True, check: VersionCheck | None = None
) -> str | None:
    """Point `current` at a complete, verified version; returns the version it replaced.

    `lock=False` is for a caller that already holds `task_lock` (distill)."""
    version, version_dir = _version_dir(registry_dir, task, version)
    with task_lock(registry_dir, task) if lock else contextlib.nullcontext():
        _verify(version_dir, task, check)
        if current_version(registry_dir, task) == version:
            return version  # already current: no history entry, or a rollback would "return" to it
        return _set_current(registry_dir, task, version, "promote")


def _promotion_stack(registry_dir: Path, task: str) -> list[str]:
    """Replay the history: a promotion pushes, a rollback pops; the top is the current version."""
    stack: list[str] = []
    for entry in _history(registry_dir, task):
        if entry.get("action") == "rollback":
            if stack:
                stack.pop()
        elif isinstance(entry.get("version"), str):
            stack.append(entry["version"])
    return stack


def rollback(registry_dir: Path, task: str, *, lock: bool = True, check: VersionCheck | None = None) -> str:
    """Return `current` to the version it replaced (repeatable: each call goes one promotion further back).

    Returns the version now current. Falls back to the newest complete version older than the current one
    when the history does not say."""
    with task_lock(registry_dir, task) if lock else contextlib.nullcontext():
        current = current_version(registry_dir, task)
        if current is None:
            raise RegistryError(f"task {task!r} has no current version to roll back from")
        stack = _promotion_stack(registry_dir, task)
        while stack and stack[-1] != current:
            stack.pop()
        # Never the current version itself: a history may hold it twice in a row (written before promote made
        # re-promoting it a no-op), and "rolling back" to it would change nothing. A history line may say "V/".
        candidates = [v for v in dict.fromkeys(plain_version_name(v) for v in stack[:-1][::-1]) if v != current]
        if not candidates:
            older = [v.version for v in list_versions(registry_dir, task) if v.version < current]
            candidates = older[::-1]
        for target in candidates:
            try:
                target, target_dir = _version_dir(registry_dir, task, target)
                _verify(target_dir, task, check)
            except RegistryError as exc:
                log.warning("rollback of %s skips %s: %s", task, target, exc)
                continue
            _set_current(registry_dir, task, target, "rollback")
            return target
        raise RegistryError(f"task {task!r} has no earlier complete version than {current!r}")


def _version_names(versions: Path) -> list[str]:
    """The version directories' names, oldest first (hidden temporary directories are not versions)."""
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_versions(registry_dir: Path, task: str, *, include_unreadable: bool = False) -> list[VersionInfo]:
    """Complete versions of a task, oldest first (hidden temporary directories are not versions). With
    `include_unreadable`, directories whose manifest cannot be read are listed too, with the `problem`."""
    versions = task_dir(registry_dir, task) / VERSIONS
    if not versions.is_dir():
        return []
    current = current_version(registry_dir, task)
    out = []
    for path in (versions / name for name in _version_names(versions)):
        try:
            manifest = Manifest.model_validate_json((path / "manifest.json").read_bytes())
        except (OSError, ValueError) as exc:
            if include_unreadable:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                out.append(VersionInfo(path.name, path, "", "", path.name == current, math.nan, problem=why))
            continue
        out.append(
            VersionInfo(
                version=path.name,
                path=path,
                created_at=manifest.created_at,
                student=manifest.student,
                current=path.name == current,
                tau=manifest.tau,
                metrics=dict(manifest.metrics),
            )
        )
    return out


def prune(registry_dir: Path, task: str, keep: int, *, lock: bool = True, dry_run: bool = False) -> list[str]:
    """Delete the task's versions beyond the `keep` newest, never the current one nor the last `keep` steps
    `rollback` can walk back to; returns the names removed (or that would be, with `dry_run`), oldest first.
    Dry-run reports beyond the `keep` newest go too. Each directory is renamed to a hidden temporary name
    before it is deleted, so a crash mid-way leaves nothing that looks like a version (the next distill
    removes the rest)."""
    if keep < 1:
        raise RegistryError(f"keep must be at least 1, not {keep}")
    directory = task_dir(registry_dir, task)
    with task_lock(registry_dir, task) if lock else contextlib.nullcontext():
        names = _version_names(directory / VERSIONS)
        stack = _promotion_stack(registry_dir, task)
        protected = set(names[-keep:]) | set(stack[-(keep + 1) :]) | {current_version(registry_dir, task)}
        doomed = [name for name in names if name not in protected]
        dry_runs = directory / "dry-runs"
        old_reports = sorted(p for p in dry_runs.iterdir() if p.is_dir())[:-keep] if dry_runs.is_dir() else []
        if dry_run:
            return doomed
        for path in [directory / VERSIONS / name for name in doomed] + old_reports:
            hidden = path.parent / f".tmp-prune-{path.name}-{os.getpid()}"
            os.rename(path, hidden)
            shutil.rmtree(hidden, ignore_errors=True)
        if doomed:
            log.info("registry %s: pruned %d version(s) of %s, kept %d", registry_dir, len(doomed), task, keep)
        return doomed


def remove_stale_temporaries(registry_dir: Path, task: str, older_than_s: float = 3600.0) -> int:
    """Delete temporary version directories left by crashed writers; returns how many were removed."""
    versions = task_dir(registry_dir, task) / VERSIONS
    removed = 0
    if versions.is_dir():
        for path in versions.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):  # a prune may be deleting it right now
                if time.time() - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
    return removed
