"""The flywheel, end to end through real processes: the reference teacher, the gateway, `apprentice distill`.

Day d replays a slice of the train-split traffic (in-scope and out-of-scope) through the gateway with the
`openai` client, then runs `apprentice distill`. After the last day the whole test split goes through the
gateway. Each test input is also asked of the teacher directly (outside the gateway, not counted as gateway
cost) so that agreement and the all-teacher cost are measured, not assumed. Used by `benchmarks.flywheel`
and `apprentice demo`.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.pricing import PriceBook
from gateway.settings import PricingConfig, TaskConfig
from router_models.datasets import Dataset, Example, load_dataset
from router_models.processes import Child, apprentice_command, start, wait_ready
from router_models.reference_teacher import MODEL_ID, traffic_examples

TASK = "intent"
ADMIN_KEY = "flywheel-admin"
Progress = Callable[[str], None]


@dataclass
class FlywheelConfig:
    data: Path
    workdir: Path
    days: int = 3
    student: str = "tfidf"
    target_agreement: float = 0.97
    # The task's agreement_confidence: the probability that a version's served agreement meets the target.
    # 0.5 is about the guarantee in expectation that distill gave before.
    agreement_confidence: float = TaskConfig.model_fields["agreement_confidence"].default
    # The task's decline_recall (None: the task's default, no floor).
    decline_recall: float | None = None
    # Higher than the 0.02 default: distill weighs each shadow record by 1/rate, and a few days of traffic need
    # enough of them to estimate agreement on what the specialist serves.
    shadow_rate: float = 0.05
    # The real model the teacher is priced as (litellm's price map), so costs are in real dollars.
    teacher_priced_as: str = "gpt-4o"
    teacher_latency_ms: float = 0.0
    seed: int = 0
    concurrency: int = 8
    # Send the instructions and the label list as a system message, as an application classifying with an LLM
    # must (the teacher cannot answer with labels it was never told). The task input the gateway routes on is
    # still the last user message; the system prompt only makes prompt tokens, and so cost, realistic.
    system_prompt: bool = True
    # Caps for smoke runs: None replays all traffic / the whole test split.
    traffic_limit: int | None = None
    test_limit: int | None = None


@dataclass
class Answer:
    text: str
    label: str
    route: str
    reason: str
    content: str
    version: str | None


@dataclass
class FlywheelResult:
    dataset: str
    teacher: str
    student: str
    target_agreement: float
    agreement_confidence: float
    requests: int
    teacher_accuracy_in_scope: float
    system_accuracy_in_scope: float
    offload_in_scope: float
    agreement_offloaded: float | None
    oos_escalation_recall: float
    cost_ratio: float | None
    gateway_cost_usd: float
    all_teacher_cost_usd: float
    days: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)
    # A diagnostic, not a result: the best the serving version could do with a tau chosen on the test split
    # itself (`best_tau_on_test`). Beside the real figures it tells the student's limit from calibration's.
    best_tau_on_test: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def system_prompt(labels: Sequence[str]) -> str:
    """The instructions an application would send to an LLM classifying its messages into `labels`."""
    return (
        "Classify the user's message into exactly one of the following intents. Answer with the intent name "
        "only. If the message fits none of them, say that you cannot help.\nIntents: " + ", ".join(labels)
    )


def _messages(text: str, system: str | None) -> list[Any]:
    """The chat messages for one input (Any: the openai client's message TypedDicts are imported lazily)."""
    user = {"role": "user", "content": text}
    return [{"role": "system", "content": system}, user] if system else [user]


def _config_yaml(cfg: FlywheelConfig, teacher_url: str, labels: list[str]) -> dict[str, Any]:
    return {
        "upstreams": {"teacher": {"api_base": teacher_url + "/v1", "models": [MODEL_ID]}},
        "tasks": {
            TASK: {
                "teacher": MODEL_ID,
                "labels": labels,
                "target_agreement": cfg.target_agreement,
                "agreement_confidence": cfg.agreement_confidence,
                "decline_recall": cfg.decline_recall,
                "shadow_rate": cfg.shadow_rate,
                "student": cfg.student,
            }
        },
        "auth": {"admin_keys": [ADMIN_KEY]},
        "registry": {"path": str(cfg.workdir / "registry"), "poll_interval_s": 0.5},
        "log": {"url": f"sqlite:///{cfg.workdir / 'inference.db'}", "spool_dir": str(cfg.workdir / "spool")},
        "pricing": {"aliases": {MODEL_ID: cfg.teacher_priced_as}},
    }


async def _replay(
    base_url: str, examples: Sequence[Example], concurrency: int, progress: Progress, system: str | None
) -> list[Answer]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=2, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(example: Example) -> Answer:
        nonlocal done
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model=TASK, messages=_messages(example.text, system)
            )
        completion = raw.parse()
        done += 1
        if done % 500 == 0:
            progress(f"  {done}/{len(examples)} requests")
        h = raw.headers
        return Answer(
            example.text,
            example.label,
            h.get("x-apprentice-route", "?"),
            h.get("x-apprentice-reason", "?"),
            completion.choices[0].message.content or "",
            h.get("x-apprentice-specialist-version"),
        )

    try:
        return list(await asyncio.gather(*(one(e) for e in examples)))
    finally:
        await client.close()


async def _ask_teacher(
    teacher_url: str, texts: Sequence[str], concurrency: int, system: str | None
) -> list[tuple[str, int, int]]:
    """(answer, prompt_tokens, completion_tokens) straight from the teacher, for each text."""
    import openai

    client = openai.AsyncOpenAI(base_url=teacher_url + "/v1", api_key="unused", max_retries=2, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def one(text: str) -> tuple[str, int, int]:
        async with gate:
            c = await client.chat.completions.create(model=MODEL_ID, messages=_messages(text, system))
        usage = c.usage
        return (
            c.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    try:
        return list(await asyncio.gather(*(one(t) for t in texts)))
    finally:
        await client.close()


def _scrape_costs(gateway_url: str) -> dict[str, float]:
    """apprentice_cost_usd_total summed per route (teacher, shadow, specialist)."""
    text = httpx.get(gateway_url + "/metrics", timeout=10).text
    by_route: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "apprentice_cost_usd":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    route = sample.labels.get("route", "?")
                    by_route[route] = by_route.get(route, 0.0) + sample.value
    return by_route


def _current_version(gateway_url: str) -> str | None:
    resp = httpx.get(gateway_url + "/admin/tasks", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    resp.raise_for_status()
    version: str | None = resp.json()["data"][0]["specialist_version"]
    return version


def _wait_for_version(gateway_url: str, version: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _current_version(gateway_url) == version:
            return
        time.sleep(0.2)
    raise StepFailed(f"the gateway did not load version {version} within {timeout_s:g}s")


def _distill(cfg: FlywheelConfig, config_path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        apprentice_command("distill", "--task", TASK, "--config", str(config_path), "--student", cfg.student),
        capture_output=True,
        text=True,
        env={**_env()},
        check=False,
    )
    seconds = time.perf_counter() - t0
    (cfg.workdir / "logs").mkdir(exist_ok=True)
    with (cfg.workdir / "logs" / "distill.log").open("a", encoding="utf-8") as log:
        log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StepFailed(f"apprentice distill failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = _latest_report(cfg.workdir / "registry" / TASK)
    return {"seconds": round(seconds, 1), "output": proc.stdout.strip().splitlines()[-1:], "report": report}


def _latest_report(task_dir: Path) -> dict[str, Any]:
    reports = sorted(task_dir.glob("**/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return {}
    data: dict[str, Any] = json.loads(reports[-1].read_text())
    return data


def _env() -> dict[str, str]:
    import os

    from gateway import OFFLINE_ENV

    return {**os.environ, **OFFLINE_ENV}


def best_tau_on_test(
    scores: npt.NDArray[np.float64],
    eligible: npt.NDArray[np.bool_],
    agree: npt.NDArray[np.bool_],
    in_scope: npt.NDArray[np.bool_],
    target: float,
) -> dict[str, Any] | None:
    """The most in-scope offload any tau reaches with agreement >= `target` on what it serves.

    A tau serves the eligible inputs (OOD score under the threshold) whose router score is at least tau: a
    prefix of them in descending score, ending where the score drops. Returns that prefix's tau, in-scope
    offload, agreement and out-of-scope escalation recall, or None when no tau reaches the target."""
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-scores[order], kind="stable")]
    if order.size == 0:
        return None
    ranked = scores[order]
    served = np.arange(1, order.size + 1)
    agreeing = np.cumsum(agree[order])
    served_in_scope = np.cumsum(in_scope[order])
    cut = np.append(ranked[1:] < ranked[:-1], True)  # a tau can only stop where the score drops
    ok = cut & (agreeing >= target * served)
    if not ok.any():
        return None
    best = int(np.flatnonzero(ok)[np.argmax(served_in_scope[ok])])
    n_oos = int((~in_scope).sum())
    served_oos = int(served[best] - served_in_scope[best])
    return {
        "tau": float(ranked[best]),
        "offload_in_scope": float(served_in_scope[best] / max(int(in_scope.sum()), 1)),
        "agreement_offloaded": float(agreeing[best] / served[best]),
        "oos_escalation_recall": 1.0 - served_oos / n_oos if n_oos else None,
    }


def ood_auroc(ood: npt.NDArray[np.float64], out_of_scope: npt.NDArray[np.bool_]) -> float | None:
    """The chance that an out-of-scope input's OOD score is above an in-scope input's, ties counted half
    (the Mann-Whitney form of the ROC area): how well the OOD score alone separates the two, at any threshold.
    None without both kinds."""
    from scipy.stats import rankdata

    n_out, n_in = int(out_of_scope.sum()), int((~out_of_scope).sum())
    if n_out == 0 or n_in == 0:
        return None
    ranks = rankdata(ood)  # ties get their average rank
    return float((ranks[out_of_scope].sum() - n_out * (n_out + 1) / 2) / (n_out * n_in))


def serving_diagnostics(
    scores: npt.NDArray[np.float64],
    ood: npt.NDArray[np.float64],
    ood_threshold: float,
    agree: npt.NDArray[np.bool_],
    in_scope: npt.NDArray[np.bool_],
    target: float,
) -> dict[str, Any]:
    """What separates a served version's limits on the test split: `best_tau_on_test` (its keys None where no
    tau reaches `target`); the in-scope offload at `target` with out-of-scope inputs set aside (every one
    escalated, as a perfect OOD detector would), the in-scope ranking's own limit; and the OOD score's ROC area
    against out-of-scope inputs."""
    eligible = ood <= ood_threshold
    best = best_tau_on_test(scores, eligible, agree, in_scope, target)
    alone = best_tau_on_test(scores[in_scope], eligible[in_scope], agree[in_scope], in_scope[in_scope], target)
    none = dict.fromkeys(("tau", "offload_in_scope", "agreement_offloaded", "oos_escalation_recall"))
    return {
        **(best or none),
        "offload_in_scope_oos_set_aside": None if alone is None else alone["offload_in_scope"],
        "ood_auroc": ood_auroc(ood, ~in_scope),
    }


def _serving_version_on_test(
    cfg: FlywheelConfig, texts: list[str], teacher_answers: list[str], in_scope: list[bool]
) -> dict[str, Any]:
    """`serving_diagnostics` for the version the gateway served the test split with, scored offline through
    its own ONNX graph, temperature and router, against the teacher's direct answers."""
    from gateway.router import apply_temperature, router_scores
    from router_models.export import load_version
    from router_models.registry import current_version, task_dir

    registry = cfg.workdir / "registry"
    manifest, runner = load_version(task_dir(registry, TASK) / "versions" / str(current_version(registry, TASK)))
    probs, ood = runner.predict(texts)
    scores = router_scores(apply_temperature(probs, manifest.temperature), ood, manifest.router)
    agree = np.array(manifest.labels)[probs.argmax(axis=1)] == np.array(teacher_answers)
    diagnostics = serving_diagnostics(
        scores, ood.astype(np.float64), manifest.router.ood_threshold, agree, np.array(in_scope, dtype=bool),
        cfg.target_agreement,
    )  # fmt: skip
    return {"version": manifest.version, "tau_distill_chose": manifest.tau, **diagnostics}


def _share(num: int, den: int) -> float:
    return num / den if den else 0.0


class StepFailed(RuntimeError):
    """A step of the loop (distill, a version the gateway did not load) failed; the message says which and why."""


class WorkdirError(ValueError):
    """The workdir holds a registry or log that a flywheel run did not create: it is not the flywheel's to clear."""


MARKER = ".apprentice-flywheel"  # written into every workdir a flywheel run has cleared and filled


def check_workdir(workdir: Path) -> None:
    """A workdir that exists must be a directory: WorkdirError otherwise."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir {workdir} is a file, not a directory")


def _fresh(workdir: Path) -> None:
    """The flywheel owns its workdir: every run starts with an empty registry and log. A workdir it did not
    fill (no marker, and not the layout of a run from before the marker) is refused, never cleared: pointed at a
    gateway's own directory by mistake, the demo would delete its registry and log."""
    import shutil

    check_workdir(workdir)
    owned = (workdir / MARKER).is_file() or (workdir / "logs" / "teacher.log").is_file()
    found = [p.name for p in (workdir / n for n in ("registry", "spool", "logs", "inference.db")) if p.exists()]
    if found and not owned:
        raise WorkdirError(
            f"workdir {workdir} already holds {', '.join(found)}, not from a flywheel run; "
            "give an empty or new directory (the flywheel clears its workdir)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("apprentice flywheel workdir: cleared at the start of every run\n")
    for name in ("registry", "spool", "logs"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for db in workdir.glob("inference.db*"):
        db.unlink()


def run_flywheel(cfg: FlywheelConfig, progress: Progress = print) -> FlywheelResult:
    dataset: Dataset = load_dataset(cfg.data)  # a bad --data path fails before anything is cleared
    _fresh(cfg.workdir)
    traffic = traffic_examples(dataset, cfg.seed)
    random.Random(cfg.seed).shuffle(traffic)
    if cfg.traffic_limit is not None:
        traffic = traffic[: cfg.traffic_limit]
    test = list(dataset.split("test"))
    random.Random(cfg.seed + 1).shuffle(test)
    if cfg.test_limit is not None:
        test = test[: cfg.test_limit]
    system = system_prompt(dataset.labels) if cfg.system_prompt else None
    logs = cfg.workdir / "logs"
    children: list[Child] = []
    try:
        progress(f"starting the reference teacher on {dataset.name} ({len(dataset.labels)} labels)")
        teacher = start(
            "teacher",
            apprentice_command(
                "reference-teacher", "--data", str(cfg.data), "--port", "0", "--seed", str(cfg.seed),
                "--latency-ms", str(cfg.teacher_latency_ms),
            ),
            logs,
        )  # fmt: skip
        children.append(teacher)
        config_path = cfg.workdir / "apprentice.yaml"
        config_path.write_text(yaml.safe_dump(_config_yaml(cfg, teacher.url, dataset.labels), sort_keys=False))
        gateway = start("gateway", apprentice_command("serve", "--config", str(config_path), "--port", "0"), logs)
        children.append(gateway)
        wait_ready(gateway.url)
        progress(f"gateway on {gateway.url}, teacher on {teacher.url}")

        days: list[dict[str, Any]] = []
        per_day = -(-len(traffic) // cfg.days)
        for day in range(1, cfg.days + 1):
            batch = traffic[(day - 1) * per_day : day * per_day]
            progress(f"day {day}: replaying {len(batch)} requests")
            t0 = time.perf_counter()
            answers = asyncio.run(_replay(gateway.url, batch, cfg.concurrency, progress, system))
            replay_s = time.perf_counter() - t0
            in_scope = [a for a in answers if a.label != "oos"]
            served = [a for a in in_scope if a.route == "specialist"]
            progress(f"day {day}: distilling")
            distilled = _distill(cfg, config_path)
            version = (cfg.workdir / "registry" / TASK / "current").read_text().strip()
            _wait_for_version(gateway.url, version)
            report = distilled["report"]
            days.append(
                {
                    "day": day,
                    "requests": len(answers),
                    "offload_in_scope": _share(len(served), len(in_scope)),
                    "specialist_accuracy_in_scope": _share(sum(a.content == a.label for a in served), len(served))
                    if served else None,
                    "replay_seconds": round(replay_s, 1),
                    "distill_seconds": distilled["seconds"],
                    "promoted": report.get("promoted"),
                    "version": version,
                    "holdout_coverage": report.get("metrics", {}).get("holdout_coverage"),
                    "holdout_agreement": report.get("metrics", {}).get("holdout_agreement_served"),
                }
            )  # fmt: skip
            progress(f"day {day}: {json.dumps(days[-1])}")

        progress(f"test: sending {len(test)} requests through the gateway and to the teacher directly")
        cost_before = _scrape_costs(gateway.url)
        answers = asyncio.run(_replay(gateway.url, test, cfg.concurrency, progress, system))
        time.sleep(1.0)  # shadow calls finish in the background; their cost is the gateway's too
        cost_after = _scrape_costs(gateway.url)
        cost_by_route = {r: cost_after[r] - cost_before.get(r, 0.0) for r in sorted(cost_after)}
        gateway_cost = sum(cost_by_route.values())
        direct = asyncio.run(_ask_teacher(teacher.url, [e.text for e in test], cfg.concurrency, system))
        diagnostic = _serving_version_on_test(
            cfg, [e.text for e in test], [d[0] for d in direct], [e.label != "oos" for e in test]
        )
    finally:
        for child in reversed(children):
            child.stop()

    prices = PriceBook(PricingConfig())
    price = prices.price(cfg.teacher_priced_as)
    all_teacher_cost = sum(price.cost(p, c) for _, p, c in direct) if price else 0.0
    in_scope = [(a, d) for a, d in zip(answers, direct, strict=True) if a.label != "oos"]
    oos = [a for a in answers if a.label == "oos"]
    offloaded = [(a, d) for a, d in zip(answers, direct, strict=True) if a.route == "specialist"]
    served_in_scope = [a for a, _ in in_scope if a.route == "specialist"]
    result = FlywheelResult(
        dataset=dataset.name,
        teacher=f"{MODEL_ID} (priced as {cfg.teacher_priced_as})",
        student=cfg.student,
        target_agreement=cfg.target_agreement,
        agreement_confidence=cfg.agreement_confidence,
        requests=len(traffic) + len(test),
        teacher_accuracy_in_scope=_share(sum(d[0] == a.label for a, d in in_scope), len(in_scope)),
        system_accuracy_in_scope=_share(sum(a.content == a.label for a, _ in in_scope), len(in_scope)),
        offload_in_scope=_share(len(served_in_scope), len(in_scope)),
        agreement_offloaded=_share(sum(a.content == d[0] for a, d in offloaded), len(offloaded)) if offloaded else None,
        oos_escalation_recall=_share(sum(a.route == "teacher" for a in oos), len(oos)),
        cost_ratio=gateway_cost / all_teacher_cost if all_teacher_cost > 0 else None,
        gateway_cost_usd=gateway_cost,
        all_teacher_cost_usd=all_teacher_cost,
        days=days,
        test={
            "in_scope": len(in_scope),
            "oos": len(oos),
            "offloaded": len(offloaded),
            "reasons": {r: sum(a.reason == r for a in answers) for r in sorted({a.reason for a in answers})},
            "cost_usd_by_route": cost_by_route,
            "system_prompt_chars": len(system or ""),
            "mean_prompt_tokens": _share(sum(p for _, p, _ in direct), len(direct)),
        },
        best_tau_on_test=diagnostic,
    )
    return result


if __name__ == "__main__":  # pragma: no cover - use benchmarks.flywheel or `apprentice demo`
    sys.exit("run python -m benchmarks.flywheel or apprentice demo")
