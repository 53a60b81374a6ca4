"""The `apprentice-specialist` target of benchmarks.overhead: the gateway answering every request in-process.

A CLINC150-sized specialist (150 labels, TF-IDF word 1-2 grams, trained on the train split) with a router
that serves every input (tau 0), so the load measures the specialist path alone; shadow traffic is off. The
request bodies are CLINC150 test inputs. `specialist_inference_p99_ms` is measured in-process on the same
artifact: router plus ONNX inference for one input, as the gateway runs it per request.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks._machine import REPO_ROOT, free_port, start_process, wait_ready
from benchmarks.overhead import CLIENT_KEY, OFFLINE_ENV, BenchContext, RunningTarget, apprentice_command

TASK = "clinc150"
CLINC150 = REPO_ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"


def _train(registry: Path) -> tuple[Path, list[str], list[str]]:
    from gateway.manifest import RouterSpec
    from router_models.export import write_tfidf_version

    data = json.loads(CLINC150.read_text())
    texts = [t for t, _ in data["train"]]
    labels = sorted({label for _, label in data["train"]})
    serve_all = RouterSpec(features=["max_prob"], weights=[1.0], bias=0.0, ood_threshold=1e9)
    version_dir = write_tfidf_version(
        registry, TASK, texts, [label for _, label in data["train"]], labels, tau=0.0, router=serve_all
    )
    return version_dir, labels, [t for t, _ in data["test"]]


def _inference_latency(version_dir: Path, labels: list[str], texts: list[str]) -> dict[str, float]:
    from gateway.specialist import Specialist

    specialist = Specialist.load(version_dir, task=TASK, labels=labels)
    for text in texts[:200]:
        specialist.decide(text, top_k=0)
    samples = []
    for text in texts:
        t0 = time.perf_counter()
        specialist.decide(text, top_k=0)
        samples.append((time.perf_counter() - t0) * 1000)
    return {
        "specialist_inference_p50_ms": round(float(np.percentile(samples, 50)), 4),
        "specialist_inference_p99_ms": round(float(np.percentile(samples, 99)), 4),
        "specialist_inference_samples": float(len(samples)),
    }


def start_specialist(ctx: BenchContext) -> RunningTarget:
    workdir = ctx.workdir / "apprentice-specialist"
    workdir.mkdir()
    version_dir, labels, test_texts = _train(workdir / "registry")
    config = {
        "upstreams": {"bench": {"api_base": ctx.upstream.url + "/v1", "api_key": "env:APPRENTICE_BENCH_UPSTREAM_KEY",
                                "models": [ctx.model]}},
        "tasks": {TASK: {"teacher": ctx.model, "labels": labels, "shadow_rate": 0.0}},
        "auth": {"api_keys": ["env:APPRENTICE_BENCH_CLIENT_KEYS"]},
        "registry": {"path": str(workdir / "registry")},
        "log": {"url": f"sqlite:///{workdir / 'inference.db'}", "spool_dir": str(workdir / "spool")},
    }  # fmt: skip
    config_path = workdir / "apprentice.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [*apprentice_command(), "serve", "--config", str(config_path), "--port", str(port)]
    env = {**OFFLINE_ENV, "APPRENTICE_BENCH_CLIENT_KEYS": CLIENT_KEY, "APPRENTICE_BENCH_UPSTREAM_KEY": ctx.upstream_key}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    log_path = workdir / "apprentice.log"
    process = start_process(cmd, env, workdir, log_path)
    startup_s = wait_ready(f"http://127.0.0.1:{port}/readyz", process, 120, log_path)
    bodies = [
        json.dumps({"model": TASK, "messages": [{"role": "user", "content": text}]}).encode()
        for text in test_texts[:2000]
    ]
    return RunningTarget(
        "apprentice-specialist",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        process.pid,
        {"Authorization": f"Bearer {CLIENT_KEY}"},
        bodies,
        process,
        {"startup_s": startup_s, "labels": len(labels), "version": version_dir.name},
        relays_upstream=False,
        collect_metrics=lambda: _inference_latency(version_dir, labels, test_texts),
    )
