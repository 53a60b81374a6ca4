"""Child processes for the flywheel and the demo: start, wait for the line that says where they listen, stop.

Only processes started here are ever signalled, by their own PID.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway import OFFLINE_ENV

_URL = re.compile(r"(?:READY|listening on) (http://[^\s]+)")


def terminate(process: subprocess.Popen[Any], timeout_s: float = 10.0) -> int:
    """SIGTERM this one process, SIGKILL it if it has not exited after `timeout_s`; returns its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class ProcessFailed(RuntimeError):
    """A child exited or stayed silent before it was ready; the message carries its last output."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    url: str
    log_path: Path
    lines: list[str] = field(default_factory=list)

    def stop(self, timeout_s: float = 10.0) -> None:
        terminate(self.process, timeout_s)


def apprentice_command(*args: str) -> list[str]:
    """`apprentice ARGS` run by this interpreter, so a venv that is not on PATH still works."""
    return [sys.executable, "-m", "router_models.cli", *args]


def start(
    name: str, command: Sequence[str], log_dir: Path, *, timeout_s: float = 180.0, env: dict[str, str] | None = None
) -> Child:
    """Starts `command`, waits for its READY/listening line, returns where it listens. Output goes to a log file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, bufsize=1
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    with log_path.open("w", encoding="utf-8") as log:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise ProcessFailed(f"{name} was not ready within {timeout_s:g}s; see {log_path}")
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    raise ProcessFailed(f"{name} exited with {process.returncode}:\n" + "".join(lines[-20:]))
                continue
            line = process.stdout.readline()
            if not line:
                process.wait(timeout=5)
                raise ProcessFailed(f"{name} exited with {process.returncode}:\n" + "".join(lines[-20:]))
            lines.append(line)
            log.write(line)
            found = _URL.search(line)
            if found:
                break
    # Keep draining its output into the log so the child never blocks on a full pipe.
    _drain_in_background(process, log_path)
    return Child(name, process, found.group(1), log_path, lines)


def _drain_in_background(process: subprocess.Popen[str], log_path: Path) -> None:
    import threading

    def pump() -> None:
        assert process.stdout is not None
        with log_path.open("a", encoding="utf-8") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()

    threading.Thread(target=pump, name=f"log-{process.pid}", daemon=True).start()


def wait_ready(url: str, *, path: str = "/readyz", timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise ProcessFailed(f"{url}{path} was not ready within {timeout_s:g}s (last error: {last!r})")
