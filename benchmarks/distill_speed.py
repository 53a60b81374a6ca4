"""How long `apprentice distill` takes on 100k logged teacher answers (150 labels, soft labels), step by step.

    python -m benchmarks.distill_speed [--rows 100000] [--student tfidf] [--data PATH] [--out FILE]

Synthesises the log from CLINC150 (texts rewritten with fillers and word drops so that the rows are distinct
inputs, not repeats that dedupe would collapse; about 5% out-of-scope inputs the teacher declines), writes
it to a SQLite inference log through gateway.logstore, then runs the same `run_distill` the CLI runs,
reading from that log. Writes benchmarks/results/distill_speed.json and .md. Target: the whole distill
within 60 s for the TF-IDF student.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._machine import REPO_ROOT, machine_info, versions

RESULTS = REPO_ROOT / "benchmarks" / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"
TARGET_S = 60.0


def _write_log(url: str, records: list[Any]) -> float:
    from gateway.logstore import LogStore

    t0 = time.perf_counter()
    store = LogStore(url)
    try:
        store.migrate()
        for start in range(0, len(records), 5000):
            store.insert_many(records[start : start + 5000])
    finally:
        store.close()
    return time.perf_counter() - t0


def run(rows: int, student: str, data: Path, workdir: Path, seed: int = 0) -> dict[str, Any]:
    from gateway.settings import LogConfig, RegistryConfig, Settings, TaskConfig
    from router_models.datasets import load_dataset
    from router_models.distill import run_distill
    from router_models.synthetic import synthetic_records

    dataset = load_dataset(data)
    examples = [(e.text, e.label) for e in dataset]  # every split: more distinct sources
    records = synthetic_records(examples, dataset.labels, task="intent", n=rows, seed=seed, perturb=True)
    url = f"sqlite:///{workdir / 'inference.db'}"
    write_s = _write_log(url, records)
    settings = Settings(
        tasks={"intent": TaskConfig.model_validate(
            {"name": "intent", "teacher": "synthetic-teacher", "labels": dataset.labels, "student": student}
        )},
        registry=RegistryConfig(path=workdir / "registry"),
        log=LogConfig(url=url, spool_dir=workdir / "spool"),
    )  # fmt: skip
    t0, cpu0 = time.perf_counter(), time.process_time()
    outcome = run_distill(settings, "intent", since_s=None, dry_run=False, progress=True)
    total_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    report = json.loads(Path(outcome.report_dir or workdir, "report.json").read_text())
    return {
        "benchmark": "distill_speed",
        "dataset": dataset.name,
        "student": student,
        "rows": rows,
        "labels": len(dataset.labels),
        "unique_inputs": report["data"]["unique_inputs"],
        "declines": report["data"]["declines"],
        "log_write_s": round(write_s, 2),
        "distill_total_s": round(total_s, 2),
        # CPU seconds of this process (all threads): what the run costs whatever else shares the machine.
        "distill_cpu_s": round(cpu_s, 2),
        "target_s": TARGET_S,
        "within_target": total_s <= TARGET_S,
        "steps_s": report["timings_s"],
        "train_iterations": report["metrics"]["train_iterations"],
        "holdout": {k: v for k, v in report["holdout"]["candidate"].items() if k != "curve"},
        "tau": report["tau"],
        "promoted": outcome.promoted,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "machine": machine_info(),
        "versions": versions(("apprentice", "numpy", "scipy", "scikit-learn", "skl2onnx", "onnxruntime")),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# distill speed: {result['rows']} logged rows, {result['labels']} labels, {result['student']} student",
        "",
        f"Whole distill (read log .. promote): **{result['distill_total_s']} s** wall, {result['distill_cpu_s']} s CPU "
        f"(target {result['target_s']} s; machine load average at the start "
        f"{result['machine'].get('load_average_1m_at_start')}, at the end {result['load_average_1m_at_end']}, on "
        f"{result['machine'].get('logical_cores', '?')} CPUs shared with other work). Writing the synthetic log: "
        f"{result['log_write_s']} s (not part of distill).",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in result["steps_s"].items()],
        "",
        f"Holdout: coverage {result['holdout']['coverage']:.4f}, agreement on served "
        f"{result['holdout']['agreement_served']}, coverage at target {result['holdout']['coverage_at_target']:.4f}; "
        f"{result['unique_inputs']} unique inputs, {result['declines']} declines, "
        f"{result['train_iterations']} training iterations.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--student", choices=["tfidf", "minilm"], default="tfidf")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-speed-") as tmp:
        result = run(args.rows, args.student, args.data, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
