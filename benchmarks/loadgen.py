"""Closed-loop HTTP load from a separate process: wrk when available, else this module's asyncio generator.

Both report the same numbers (requests completed, errors, latency percentiles). The asyncio generator runs as
`python -m benchmarks.loadgen --url URL --concurrency C --duration S --body-file F [--header 'K: V']...`
and prints one line `LOADGEN {json}`. It speaks just enough HTTP/1.1 (keep-alive, content-length and
chunked bodies) to stay cheap on CPU, since it shares the machine with the servers it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass(slots=True)
class LoadResult:
    requests: int  # responses received, whatever their status
    errors: int  # non-2xx responses + socket errors + timeouts
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# Requests are formatted once per thread in init(), so wrk spends no Lua time per request.
_WRK_SCRIPT = """
local reqs, idx = {}, 0
init = function(args)
  wrk.method = "POST"
  %(headers)s
  for line in io.lines(%(body_file)s) do
    if #line > 0 then reqs[#reqs + 1] = wrk.format(nil, nil, nil, line) end
  end
end
request = function()
  idx = idx %% #reqs + 1
  return reqs[idx]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, ' ..
    '"p50_us": %%.1f, "p90_us": %%.1f, "p99_us": %%.1f}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def find_wrk(install: bool = True) -> str | None:
    """wrk's path; installs Debian's package when missing and allowed (needs root and apt-get)."""
    found = shutil.which("wrk")
    if found or not install or shutil.which("apt-get") is None:
        return found
    install_cmd = ["apt-get", "install", "-y", "-qq", "wrk"]
    subprocess.run(install_cmd, capture_output=True, check=False, timeout=600)
    if shutil.which("wrk") is None:  # the package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False, timeout=600)
        subprocess.run(install_cmd, capture_output=True, check=False, timeout=600)
    return shutil.which("wrk")


def run_wrk(
    wrk: str, url: str, bodies: list[bytes], headers: dict[str, str], concurrency: int, duration_s: float
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="apprentice-wrk-") as tmp:
        body_file = Path(tmp) / "bodies.jsonl"
        body_file.write_bytes(b"\n".join(bodies) + b"\n")
        lines = [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
        script = Path(tmp) / "load.lua"
        script.write_text(_WRK_SCRIPT % {"headers": "\n  ".join(lines), "body_file": _lua_string(str(body_file))})
        cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "30s"]
        out = subprocess.run([*cmd, "-s", str(script), url], capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    data = json.loads(line.removeprefix("WRKJSON "))
    return LoadResult(
        requests=data["requests"],
        errors=data["errors"],
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def run_asyncio_loadgen(
    url: str, bodies: list[bytes], headers: dict[str, str], concurrency: int, duration_s: float
) -> LoadResult:
    """Run this module as a separate process, so the load never shares an interpreter with a target."""
    with tempfile.TemporaryDirectory(prefix="apprentice-load-") as tmp:
        body_file = Path(tmp) / "bodies.jsonl"
        body_file.write_bytes(b"\n".join(bodies) + b"\n")
        cmd = [sys.executable, "-m", "benchmarks.loadgen", "--url", url, "--concurrency", str(concurrency)]
        cmd += ["--duration", str(duration_s), "--body-file", str(body_file)]
        for key, value in headers.items():
            cmd += ["--header", f"{key}: {value}"]
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("LOADGEN ")), None)
    if line is None:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-1000:]}")
    return LoadResult(**json.loads(line.removeprefix("LOADGEN ")))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()  # body ends when the server closes
        raise ConnectionResetError("connection closed after response")
    if fields.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return status


async def _worker(
    host: str, port: int, requests: list[bytes], deadline: float, latencies: list[float], errors: list[int]
) -> None:
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    index = 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            writer.write(requests[index % len(requests)])
            index += 1
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 300:
                errors[0] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            errors[0] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)  # do not spin on a refusing server
    if writer is not None:
        writer.close()


async def generate_load(
    url: str, bodies: list[bytes], headers: dict[str, str], concurrency: int, duration_s: float
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [f"{head}content-length: {len(b)}\r\n\r\n".encode("latin-1") + b for b in bodies]
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter()
    deadline = start + duration_s
    await asyncio.gather(
        *(_worker(host, port, requests[i:] + requests[:i], deadline, latencies, errors) for i in range(concurrency))
    )
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return LoadResult(
        requests=len(latencies),
        errors=errors[0],
        duration_s=elapsed,
        p50_ms=_percentile(ordered, 50) * 1000,
        p90_ms=_percentile(ordered, 90) * 1000,
        p99_ms=_percentile(ordered, 99) * 1000,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--body-file", type=Path, required=True, help="one JSON request body per line")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    args = parser.parse_args(argv)
    bodies = [line for line in args.body_file.read_bytes().splitlines() if line.strip()]
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    result = asyncio.run(generate_load(args.url, bodies, headers, args.concurrency, args.duration))
    print("LOADGEN " + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
