"""Shared by the benchmarks: machine and package versions, process-tree CPU and RSS, starting and ending servers."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = ("apprentice", "uvicorn", "httpx", "onnxruntime", "fastapi", "pydantic", "numpy")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS and Python; the load average says whether the machine was shared at the time."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def package_version(name: str, python: str | None = None) -> str | None:
    """A distribution's version in this interpreter, or in another one (e.g. a separate venv)."""
    if python is None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    code = f"import importlib.metadata as m\ntry: print(m.version({name!r}))\nexcept Exception: print('')"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() or None


def git_revision() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Versions of the packages a result depends on; apprentice falls back to the source tree's version."""
    found = {name: package_version(name) for name in packages}
    if "apprentice" in found and found["apprentice"] is None:
        sys.path.insert(0, str(REPO_ROOT))
        try:
            import gateway

            found["apprentice"] = f"{gateway.__version__} (source tree)"
        finally:
            sys.path.remove(str(REPO_ROOT))
    found["apprentice_git"] = git_revision()
    return found


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (those alive now)."""
    total = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def wait_idle(pid: int, busy_fraction: float = 0.05, max_wait_s: float = 30.0) -> bool:
    """Wait until a process tree uses under `busy_fraction` of a core (True), or `max_wait_s` passes."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(0.25)
        if tree_cpu_seconds(pid) - before < busy_fraction * 0.25:
            return True
    return False


class RssSampler:
    """Samples a process tree's RSS in a thread while a measurement runs; `max_bytes` is the peak seen."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.max_bytes = max(self.max_bytes, tree_rss_bytes(self.pid))
            except psutil.NoSuchProcess:
                return
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_process(cmd: list[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as sink:
        # A new session keeps a Ctrl-C on the benchmark from reaching the targets before cleanup does.
        return subprocess.Popen(
            cmd, cwd=cwd, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """End a started target and its children, each by PID."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for pid in [process.pid, *(c.pid for c in children)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in children:
        try:
            child.wait(timeout=5)
        except psutil.TimeoutExpired:
            child.kill()
        except psutil.NoSuchProcess:
            continue


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> float:
    """Seconds until `url` answers 200; fails early if the process exits."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"exited with code {process.returncode} before it was ready:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"not ready within {timeout_s:.0f} s: {log_path.read_text(errors='replace')[-3000:]}")
