"""Start, wait for and stop real server processes on 127.0.0.1 for end-to-end tests and benchmarks.

Everything binds 127.0.0.1 on an ephemeral port (`--port 0`): the port is read back from what the process
prints, so two test runs never race for a port. Children get an offline environment (no price-map or model-hub
downloads) and lose any APPRENTICE_* variable of the parent, so a developer's shell cannot change a test. Each
process writes stdout and stderr to a log file (never a pipe that could fill up and block it); `Proc.output()`
reads it for assertions and failure messages. Processes are ended by their PID only: SIGTERM, then SIGKILL.

    with start_fake_upstream() as upstream:                       # waits for "READY http://127.0.0.1:PORT"
        with start_gateway(["--upstream", upstream.url + "/v1"]) as gateway:  # waits for GET /healthz == 200
            httpx.get(gateway.url + "/v1/models")

Helpers for what tests ask those processes: `scrape_metrics` (Prometheus text to {(name, labels): value}),
`metric_total` (a sum over matching series), `closed_port_url` and `refusing_port` (loopback URLs that refuse).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway import OFFLINE_ENV
from router_models.processes import terminate

REPO_ROOT = Path(__file__).resolve().parents[1]
# The console scripts of the virtual environment running the tests (never a global `apprentice`).
VENV_BIN = Path(sys.executable).parent
READY_LINE = re.compile(r"READY (http://\S+)")
# `apprentice serve` prints the address it bound (the real port when asked for port 0) before workers start.
GATEWAY_LINE = re.compile(r"apprentice listening on (http://\S+)")


def child_env(extra: Mapping[str, str] | None = None, *, keep_apprentice: bool = False) -> dict[str, str]:
    """The parent's environment, offline, without APPRENTICE_* (unless kept) or PROMETHEUS_MULTIPROC_DIR (a
    multi-worker child must get its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if keep_apprentice or not k.startswith("APPRENTICE_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(OFFLINE_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class StartError(RuntimeError):
    """A process exited or stayed silent before it was ready; the message carries its output."""


class Proc:
    """A started child process: `url` is what it announced, `log_path` holds everything it printed."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, url: str = "") -> None:
        self.popen = popen
        self.log_path = log_path
        self.url = url

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM this PID, SIGKILL it if it has not exited after `timeout_s`; returns the exit code."""
        return terminate(self.popen, timeout_s)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _log_file(name: str, log_dir: Path | None) -> Path:
    directory = log_dir or Path(tempfile.mkdtemp(prefix="apprentice-proc-"))
    directory.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
    os.close(fd)
    return Path(path)


def start(
    cmd: Sequence[str],
    *,
    ready: re.Pattern[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 30.0,
    log_dir: Path | None = None,
    name: str = "proc",
) -> Proc:
    """Run `cmd` and wait until its output matches `ready`; group 1 of the match becomes `Proc.url`.

    `env` is the complete child environment (default: `child_env()`). The output goes to a file in `log_dir`
    (a fresh temporary folder if None; pass the test's tmp_path to keep it with the test). Raises StartError
    with the output if the process exits first or does not print the line within `timeout_s`.
    """
    log_path = _log_file(name, log_dir)
    with log_path.open("wb") as sink:
        popen = subprocess.Popen(
            list(cmd),
            cwd=cwd or REPO_ROOT,
            env=dict(env) if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    proc = Proc(popen, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = ready.search(proc.output())
        if found:
            proc.url = found.group(1) if found.groups() else ""
            return proc
        if not proc.alive():
            raise StartError(f"{name} exited with code {popen.returncode} before it was ready:\n{proc.output()}")
        time.sleep(0.05)
    proc.stop()
    raise StartError(f"{name} printed nothing matching {ready.pattern!r} within {timeout_s:g}s:\n{proc.output()}")


def wait_http_ok(url: str, *, proc: Proc | None = None, timeout_s: float = 30.0) -> None:
    """Poll GET `url` until it answers 200; fails early with the output if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0) as http:  # one client: building one costs more than a loopback request
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise StartError(f"the process exited with code {proc.popen.returncode}:\n{proc.output()}")
            try:
                resp = http.get(url)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.05)
    output = proc.output() if proc is not None else ""
    raise StartError(f"GET {url} did not answer 200 within {timeout_s:g}s (last: {last})\n{output}")


def start_fake_upstream(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
    log_dir: Path | None = None,
) -> Proc:
    """`python -m benchmarks.fake_upstream --port 0 ARGS...`; `url` is its base URL (append /v1 for clients).

    ARGS may repeat --port (argparse keeps the last) to reuse a port a test reserved with `closed_port_url()`.
    """
    cmd = [sys.executable, "-m", "benchmarks.fake_upstream", "--port", "0", *args]
    return start(cmd, ready=READY_LINE, env=env, timeout_s=timeout_s, log_dir=log_dir, name="fake-upstream")


def start_gateway(
    args: Sequence[str] = (),
    *,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 60.0,
    log_dir: Path | None = None,
) -> Proc:
    """`apprentice serve [--config FILE] --port 0 ARGS...`, ready once GET /healthz answers 200.

    Pass `--host`/`--port` in `args` to override (the last flag wins); `cwd` defaults to the config's folder so
    relative paths in it (registry, log database) stay inside the test's temporary directory.
    """
    cmd = [str(VENV_BIN / "apprentice"), "serve", "--port", "0"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    where = cwd or (config.parent if config is not None else None)
    proc = start(cmd, ready=GATEWAY_LINE, env=env, cwd=where, timeout_s=timeout_s, log_dir=log_dir, name="gateway")
    try:
        wait_http_ok(proc.url + "/healthz", proc=proc, timeout_s=timeout_s)
    except StartError:
        proc.stop()
        raise
    return proc


def run_to_exit(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a command that is expected to end by itself (e.g. a refused start); output is stdout + stderr."""
    return subprocess.run(
        list(cmd),
        cwd=cwd or REPO_ROOT,
        env=dict(env) if env is not None else child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def closed_port_url() -> str:
    """http://127.0.0.1:PORT where nothing listens (the port was just free; connecting gets refused). Another
    process may take the port later: for a refusal that must last, use `refusing_port()`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def refusing_port() -> Iterator[str]:
    """http://127.0.0.1:PORT that refuses every connection while the block runs: the port is bound (so nobody
    else can take it) but never listened on, so connecting gets ECONNREFUSED."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


MetricKey = tuple[str, frozenset[tuple[str, str]]]


def scrape_metrics(base_url: str, *, headers: Mapping[str, str] | None = None) -> dict[MetricKey, float]:
    """GET {base_url}/metrics parsed: {(sample name, frozenset of label pairs): value}."""
    resp = httpx.get(base_url + "/metrics", headers=dict(headers or {}), timeout=10.0)
    resp.raise_for_status()
    samples: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_total(samples: Mapping[MetricKey, float], name: str, **labels: str) -> float:
    """The sum of every sample called `name` whose labels include `labels` (0.0 if none)."""
    wanted = set(labels.items())
    return sum(value for (n, lbls), value in samples.items() if n == name and wanted <= lbls)


def stop_all(procs: Iterable[Proc]) -> None:
    """Stop several processes (each by its own PID), in order."""
    for proc in procs:
        proc.stop()
