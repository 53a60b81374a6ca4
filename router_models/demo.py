"""`apprentice demo`: the whole flywheel offline on embedded defaults, then the trained specialist, serving.

Defaults: SQLite log, a local registry under .apprentice/demo, the reference teacher, CLINC150 from
../shared/data (or --data, or a download from its canonical address checked by sha256).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from router_models.datasets import ensure_clinc150
from router_models.flywheel import TASK, FlywheelConfig, FlywheelResult, check_workdir, run_flywheel
from router_models.flywheel_report import main_table, plot
from router_models.processes import apprentice_command, start, wait_ready

SHARED_DATA = Path("../shared/data")


def resolve_data(data: Path | None, workdir: Path) -> Path:
    """--data if given; else CLINC150 from ../shared/data; else a verified download into the workdir."""
    if data is not None:
        return data
    if (SHARED_DATA / "clinc150" / "data_full.json").is_file():
        return ensure_clinc150(SHARED_DATA)
    print("CLINC150 not found under ../shared/data; downloading it from its canonical address")
    return ensure_clinc150(workdir / "data")


def run_demo(
    *,
    data: Path | None,
    workdir: Path,
    days: int,
    student: str,
    serve: bool,
    traffic_limit: int | None,
    test_limit: int | None,
) -> None:
    check_workdir(workdir)  # before a download into it
    data_path = resolve_data(data, workdir)
    cfg = FlywheelConfig(
        data=data_path,
        workdir=workdir,
        days=days,
        student=student,
        traffic_limit=traffic_limit,
        test_limit=test_limit,
    )
    t0 = time.perf_counter()
    result = run_flywheel(cfg)
    print()
    print(main_table(result))
    png = workdir / "flywheel.png"
    plot(result, png)
    saving = 1 - result.cost_ratio if result.cost_ratio is not None else None
    print()
    print(summary_line(result))
    if saving is not None:
        print(
            f"cost: ${result.gateway_cost_usd:.4f} through apprentice vs ${result.all_teacher_cost_usd:.4f} "
            f"all-teacher ({saving:.0%} saved, teacher priced as {cfg.teacher_priced_as})"
        )
    print(f"plot: {png}   ({time.perf_counter() - t0:.0f} s)")
    if serve:
        _serve(cfg, data_path)


def summary_line(result: FlywheelResult) -> str:
    """The offload and out-of-scope recall in words; a share of no requests is said as such, never as 0%."""
    counts = result.test
    in_scope = (
        f"{result.offload_in_scope:.0%} of in-scope test requests were answered by the specialist"
        if counts["in_scope"] else "no in-scope test requests were sent"
    )  # fmt: skip
    oos = (
        f"{result.oos_escalation_recall:.0%} of out-of-scope requests still reached the teacher"
        if counts["oos"] else "the test sample held no out-of-scope requests"
    )  # fmt: skip
    return f"{in_scope}; {oos}."


def _serve(cfg: FlywheelConfig, data_path: Path) -> None:
    logs = cfg.workdir / "logs"
    teacher = start(
        "teacher-serve", apprentice_command("reference-teacher", "--data", str(data_path), "--port", "0"), logs
    )
    config = cfg.workdir / "apprentice.yaml"
    # The demo config names the first run's teacher port; point it at the new one.
    text = config.read_text()
    import re

    config.write_text(re.sub(r"http://127\.0\.0\.1:\d+/v1", teacher.url + "/v1", text))
    gateway = start("gateway-serve", apprentice_command("serve", "--config", str(config), "--port", "0"), logs)
    try:
        wait_ready(gateway.url)
        print()
        print(f"apprentice is serving the trained specialist: base_url={gateway.url}/v1  model={TASK}")
        print(
            "try:  curl -s "
            f"{gateway.url}/v1/chat/completions -H 'content-type: application/json' "
            f'-d \'{{"model": "{TASK}", "messages": [{{"role": "user", "content": '
            '"what is my credit limit"}]}\' -i'
        )
        print("Ctrl-C to stop.", flush=True)
        # sigwait is only sure to receive signals that are blocked: unblocked, SIGTERM's default action ended
        # the demo at once and left its gateway and teacher running. Blocked here, after the children started,
        # so that they keep the default dispositions.
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
    finally:
        gateway.stop()
        teacher.stop()
