"""The flywheel benchmark: does the cheap path take the routine traffic while agreement holds?

    python -m benchmarks.flywheel --data ../shared/data/clinc150/data_full.json [--days 3]
        [--student tfidf|minilm] [--agreement-confidence 0.9] [--decline-recall 0.9] [--seed 0]
        [--out benchmarks/results/flywheel_tfidf.json]

Real processes on 127.0.0.1 (the reference teacher, the gateway, `apprentice distill` per day); runs
unchanged on any dataset in the JSONL format ({"text","label","split"}, label "oos" = out of scope).
Writes JSON, a markdown table and a PNG of offload and agreement per day.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks._machine import machine_info, versions
from router_models.flywheel import FlywheelConfig, run_flywheel
from router_models.flywheel_report import main_table, plot

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CLINC150 JSON or JSONL dataset")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--student", choices=("tfidf", "minilm"), default="tfidf")
    parser.add_argument("--target-agreement", type=float, default=0.97)
    parser.add_argument(
        "--agreement-confidence", type=float, default=FlywheelConfig.agreement_confidence,
        help="probability that served agreement meets the target (0.5: about a guarantee in expectation)",
    )  # fmt: skip
    parser.add_argument(
        "--decline-recall", type=float, default=None,
        help="the task's decline_recall: the share of the teacher's declines tau must keep escalating (default none)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=FlywheelConfig.seed,
        help="which train examples the reference teacher learns from (the rest is traffic), and the order of "
        "traffic and test: another seed is another run of the same benchmark",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/flywheel_<student>.json)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the registry, log and configs here")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--no-system-prompt", action="store_true", help="send the bare user message (no instructions, no label list)"
    )
    parser.add_argument("--traffic-limit", type=int, default=None, help="smoke runs: replay at most this many")
    parser.add_argument("--test-limit", type=int, default=None, help="smoke runs: test on at most this many")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    if not 0.5 <= args.agreement_confidence < 1.0:
        parser.error("--agreement-confidence must be in [0.5, 1)")
    if args.seed < 0:
        parser.error("--seed must be 0 or more")
    if args.decline_recall is not None and not 0.0 < args.decline_recall < 1.0:
        parser.error("--decline-recall must be in (0, 1)")

    out = args.out or RESULTS / f"flywheel_{args.student}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="apprentice-flywheel-"))
    cfg = FlywheelConfig(
        data=args.data,
        workdir=workdir,
        days=args.days,
        student=args.student,
        target_agreement=args.target_agreement,
        agreement_confidence=args.agreement_confidence,
        concurrency=args.concurrency,
        system_prompt=not args.no_system_prompt,
        traffic_limit=args.traffic_limit,
        test_limit=args.test_limit,
        seed=args.seed,
        decline_recall=args.decline_recall,
    )
    t0 = time.perf_counter()
    result = run_flywheel(cfg)
    payload = {
        "machine": machine_info(),
        "versions": versions(("apprentice", "onnxruntime", "scikit-learn", "skl2onnx", "numpy", "uvicorn")),
        "seconds": round(time.perf_counter() - t0, 1),
        "seed": args.seed,
        "decline_recall": args.decline_recall,
        **result.as_dict(),
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    table = main_table(result)
    md = out.with_suffix(".md")
    md.write_text(
        f"# Flywheel: {result.dataset}, {result.student} student, {args.days} days, "
        f"target agreement {args.target_agreement} at confidence {args.agreement_confidence}, "
        f"seed {args.seed}{f', decline_recall {args.decline_recall}' if args.decline_recall else ''}\n\n{table}\n\n"
        f"Teacher: {result.teacher}. "
        f"Machine: {payload['machine'].get('cpu_model')}; run took {payload['seconds']} s.\n"
    )
    plot(result, out.with_suffix(".png"))
    print(table)
    print(f"wrote {out}, {md} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
