"""Gateway overhead: the fake upstream direct, apprentice and the LiteLLM proxy, side by side in one run.

`python -m benchmarks.overhead [--duration 10] [--warmup 2] [--concurrency 1,16,64] [--out FILE]`
Every target relays to the same fake upstream (benchmarks.fake_upstream); load comes from wrk (or the asyncio
generator in benchmarks.loadgen) in a separate process. Writes JSON and a markdown table (default
benchmarks/results/overhead.{json,md}) and prints the table. CPU and RSS are those of the target's serving
process tree only. Later targets plug in through `main(extra_targets={name: factory})`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks._machine import (
    REPO_ROOT,
    RssSampler,
    free_port,
    machine_info,
    package_version,
    start_process,
    stop_process,
    tree_cpu_seconds,
    versions,
    wait_idle,
    wait_ready,
)
from benchmarks._overhead_report import compute_ratios, evaluate_targets, render_markdown
from benchmarks.fake_upstream import FakeUpstreamProcess, launch
from benchmarks.loadgen import LoadResult, find_wrk, run_asyncio_loadgen, run_wrk
from gateway import OFFLINE_ENV

MODEL = "bench-model"
UPSTREAM_KEY = "sk-bench-upstream"
CLIENT_KEY = "sk-bench-client"
LITELLM_SPEC = "litellm[proxy]==1.108.7"
LITELLM_VENV = REPO_ROOT / "benchmarks" / ".litellm-venv"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "overhead.json"
MAX_POINT_S = 60.0
PROMPT = "Hello! Could you tell me what the weather is usually like in Lisbon in early spring?"

LoadFn = Callable[[str, list[bytes], dict[str, str], int, float], LoadResult]


@dataclass
class BenchContext:
    """What a target factory gets: the shared fake upstream and a scratch directory for configs and logs."""

    upstream: FakeUpstreamProcess
    upstream_key: str
    model: str
    workdir: Path
    bodies: list[bytes]


@dataclass
class RunningTarget:
    """A target ready for load. `pid` roots the process tree whose CPU and RSS are measured."""

    name: str
    url: str  # the chat completions endpoint
    pid: int
    headers: dict[str, str]
    bodies: list[bytes]
    process: subprocess.Popen[bytes] | None = None  # owned by the benchmark and stopped after its runs
    info: dict[str, Any] = field(default_factory=dict)
    relays_upstream: bool = True  # False when the target answers without the upstream (the specialist)
    # Called after the load runs: extra numbers for the JSON, e.g. specialist_inference_p99_ms.
    collect_metrics: Callable[[], dict[str, float]] | None = None


TargetFactory = Callable[[BenchContext], RunningTarget]


def log(message: str) -> None:
    print(f"[overhead] {message}", file=sys.stderr, flush=True)


def start_direct(ctx: BenchContext) -> RunningTarget:
    headers = {"Authorization": f"Bearer {ctx.upstream_key}"}
    return RunningTarget("direct", ctx.upstream.url + "/v1/chat/completions", ctx.upstream.pid, headers, ctx.bodies)


def apprentice_command() -> list[str]:
    script = Path(sys.executable).parent / "apprentice"
    return [str(script)] if script.exists() else [sys.executable, "-m", "router_models.cli"]


def start_apprentice(ctx: BenchContext) -> RunningTarget:
    port = free_port()
    cmd = [*apprentice_command(), "serve", "--upstream", ctx.upstream.url + "/v1", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--client-key-env", "APPRENTICE_BENCH_CLIENT_KEYS", "--upstream-key-env", "APPRENTICE_BENCH_UPSTREAM_KEY"]
    env = {**OFFLINE_ENV, "APPRENTICE_BENCH_CLIENT_KEYS": CLIENT_KEY, "APPRENTICE_BENCH_UPSTREAM_KEY": ctx.upstream_key}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    workdir = ctx.workdir / "apprentice"
    workdir.mkdir()
    log_path = workdir / "apprentice.log"
    process = start_process(cmd, env, workdir, log_path)
    startup_s = wait_ready(f"http://127.0.0.1:{port}/healthz", process, 60, log_path)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    return RunningTarget("apprentice", url, process.pid, headers, ctx.bodies, process, {"startup_s": startup_s})


def litellm_python() -> Path:
    """The LiteLLM proxy's own venv (created and installed on first use; gitignored)."""
    python = LITELLM_VENV / "bin" / "python"
    wanted = LITELLM_SPEC.split("==")[1]
    if python.exists() and package_version("litellm", str(python)) == wanted:
        return python
    log(f"installing {LITELLM_SPEC} into {LITELLM_VENV} (about a minute)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", LITELLM_SPEC]
    subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
    return python


def start_litellm(ctx: BenchContext) -> RunningTarget:
    python = litellm_python()
    port = free_port()
    workdir = ctx.workdir / "litellm"
    workdir.mkdir()
    master_key = "sk-litellm-" + os.urandom(12).hex()
    # A known price keeps LiteLLM on its ordinary cost-tracking path rather than its unknown-model one.
    config = f"""model_list:
  - model_name: {ctx.model}
    litellm_params:
      model: openai/{ctx.model}
      api_base: {ctx.upstream.url}/v1
      api_key: {ctx.upstream_key}
    model_info:
      input_cost_per_token: 0.00000015
      output_cost_per_token: 0.0000006
general_settings:
  master_key: {master_key}
litellm_settings:
  telemetry: false
"""
    (workdir / "config.yaml").write_text(config)
    cmd = [str(python.parent / "litellm"), "--config", "config.yaml", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--num_workers", "1"]
    log_path = workdir / "litellm.log"
    process = start_process(cmd, OFFLINE_ENV, workdir, log_path)
    startup_s = wait_ready(f"http://127.0.0.1:{port}/health/liveliness", process, 300, log_path)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    info = {"startup_s": startup_s}
    headers = {"Authorization": f"Bearer {master_key}"}
    return RunningTarget("litellm-proxy", url, process.pid, headers, ctx.bodies, process, info)


def start_specialist(ctx: BenchContext) -> RunningTarget:
    from benchmarks._specialist_target import start_specialist as start

    return start(ctx)


BUILTIN_TARGETS: dict[str, TargetFactory] = {
    "direct": start_direct,
    "apprentice": start_apprentice,
    "apprentice-specialist": start_specialist,
    "litellm-proxy": start_litellm,
}


def _upstream_hits(upstream: FakeUpstreamProcess) -> int:
    hits: int = httpx.get(upstream.url + "/_stats").json().get("chat_completions", 0)
    return hits


def smoke_check(target: RunningTarget, upstream: FakeUpstreamProcess) -> None:
    """One request must succeed as a chat.completion and, for a relaying target, reach the upstream."""
    before = _upstream_hits(upstream)
    headers = {**target.headers, "content-type": "application/json"}
    resp = httpx.post(target.url, content=target.bodies[0], headers=headers, timeout=30)
    if resp.status_code != 200 or resp.json().get("object") != "chat.completion":
        raise RuntimeError(f"smoke request failed: {resp.status_code} {resp.text[:500]}")
    if target.relays_upstream and _upstream_hits(upstream) <= before:
        raise RuntimeError("the smoke request did not reach the upstream")
    if not target.relays_upstream and resp.headers.get("x-apprentice-route") != "specialist":
        raise RuntimeError(f"the smoke request was not served by the specialist: {dict(resp.headers)}")


def measure(
    target: RunningTarget,
    upstream: FakeUpstreamProcess,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    load: LoadFn,
) -> dict[str, Any]:
    """One point. Closed-loop load leaves `concurrency` requests in flight when it stops, so the target is
    let go idle before each CPU reading, and CPU is divided by the requests the target actually processed
    (the upstream's hit count for relaying targets), not only those whose answers the load generator read."""
    args = (target.url, target.bodies, target.headers, concurrency)
    if warmup_s > 0:
        load(*args, warmup_s)
    run_s = duration_s
    while True:
        wait_idle(target.pid)
        cpu_before, hits_before = tree_cpu_seconds(target.pid), _upstream_hits(upstream)
        with RssSampler(target.pid) as rss:
            result = load(*args, run_s)
        # A target slower than the run itself completes nothing: give it time for a few rounds per connection.
        if result.requests >= 2 * concurrency or run_s >= MAX_POINT_S:
            break
        log(f"{target.name} c={concurrency}: {result.requests} requests in {run_s:g} s, measuring longer")
        run_s = min(run_s * 3, MAX_POINT_S)
    wait_idle(target.pid)
    cpu_s = tree_cpu_seconds(target.pid) - cpu_before
    served = max(result.requests, _upstream_hits(upstream) - hits_before if target.relays_upstream else 0)
    return {
        "target": target.name,
        "concurrency": concurrency,
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p90_ms": round(result.p90_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "cpu_ms_per_request": round(cpu_s * 1000 / served, 3) if served else None,
        "rss_mb": round(rss.max_bytes / 2**20, 1),
        "errors": result.errors,
        "requests": result.requests,
        "duration_s": round(result.duration_s, 2),
    }


def choose_load(kind: str) -> tuple[LoadFn, str]:
    wrk = find_wrk() if kind in ("auto", "wrk") else None
    if wrk is not None:
        version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
        return (lambda *args: run_wrk(wrk, *args)), version.split(" Copyright")[0]
    if kind == "wrk":
        raise RuntimeError("wrk is not installed and could not be installed")
    return run_asyncio_loadgen, "benchmarks.loadgen (asyncio)"


@contextmanager
def running(factory: TargetFactory, ctx: BenchContext) -> Iterator[RunningTarget]:
    target = factory(ctx)
    try:
        yield target
    finally:
        if target.process is not None:
            stop_process(target.process)


def request_bodies(model: str) -> list[bytes]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": PROMPT}]
    return [json.dumps({"model": model, "messages": messages, "max_tokens": 64, "temperature": 0}).encode()]


def run(
    *,
    duration_s: float,
    warmup_s: float,
    concurrencies: list[int],
    target_names: list[str],
    factories: Mapping[str, TargetFactory],
    load_kind: str = "auto",
    upstream_latency_ms: float = 0.0,
) -> dict[str, Any]:
    load, load_name = choose_load(load_kind)
    report: dict[str, Any] = {"machine": machine_info(), "versions": versions()}
    report["versions"]["litellm-proxy"] = None
    report["versions"]["load_generator"] = load_name
    report["settings"] = {
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "concurrency": concurrencies,
        "upstream_latency_ms": upstream_latency_ms,
        "request": "non-streaming chat completion, pass-through",
    }
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    target_metrics: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    with (
        # Recording every body would grow the fake's memory and CPU over a long run.
        launch(latency_ms=upstream_latency_ms, api_key=UPSTREAM_KEY, models=[MODEL], record_limit=0) as upstream,
        tempfile.TemporaryDirectory(prefix="apprentice-overhead-") as tmp,
        ExitStack() as stack,
    ):
        ctx = BenchContext(upstream, UPSTREAM_KEY, MODEL, Path(tmp), request_bodies(MODEL))
        targets: list[RunningTarget] = []
        for name in target_names:
            log(f"starting {name}")
            try:
                target = stack.enter_context(running(factories[name], ctx))
                smoke_check(target, upstream)
            except Exception as exc:  # noqa: BLE001 - one target failing must not lose the others' numbers
                failures[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed: {failures[name]}")
                continue
            info[name] = target.info
            targets.append(target)
        # Targets take turns at each concurrency, so a shared machine's changing load hits them alike.
        for concurrency in concurrencies:
            for target in targets:
                row = measure(target, upstream, concurrency, duration_s, warmup_s, load)
                log(f"{target.name} c={concurrency}: {row}")
                rows.append(row)
        for target in targets:
            if target.collect_metrics is not None:
                target_metrics[target.name] = target.collect_metrics()
    rows.sort(key=lambda r: (target_names.index(r["target"]), r["concurrency"]))
    if "litellm-proxy" in target_names and (LITELLM_VENV / "bin" / "python").exists():
        report["versions"]["litellm-proxy"] = package_version("litellm", str(LITELLM_VENV / "bin" / "python"))
    report["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    report["targets"] = info
    report["results"] = rows
    report["ratios"] = compute_ratios(rows)
    report["target_metrics"] = target_metrics
    report["checks"] = evaluate_targets(rows, report["ratios"], target_metrics)
    report["failures"] = failures
    return report


def main(argv: list[str] | None = None, extra_targets: Mapping[str, TargetFactory] | None = None) -> None:
    factories = {**BUILTIN_TARGETS, **(extra_targets or {})}
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target and concurrency")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    parser.add_argument("--targets", default=",".join(factories), help=f"subset of {','.join(factories)}")
    parser.add_argument("--load-generator", choices=["auto", "wrk", "asyncio"], default="auto")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON path; the .md goes beside it")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(factories))
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(factories)}")
    report = run(
        duration_s=args.duration,
        warmup_s=args.warmup,
        concurrencies=[int(c) for c in args.concurrency.split(",")],
        target_names=names,
        factories=factories,
        load_kind=args.load_generator,
        upstream_latency_ms=args.upstream_latency_ms,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
