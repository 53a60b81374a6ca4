"""The overhead benchmark's verdicts: ratios between targets, the issues' targets met or not, and markdown."""

from __future__ import annotations

from typing import Any

BASELINE = "litellm-proxy"
DIRECT = "direct"
SPECIALIST = "apprentice-specialist"


def _row(rows: list[dict[str, Any]], target: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["target"] == target and r["concurrency"] == concurrency), None)


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 4) if num is not None and den else None


def compute_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each gateway against LiteLLM at c16 (throughput, CPU) and against the direct path at c1 (added p50)."""
    ratios: dict[str, float | None] = {}
    lit16, direct1, direct16 = _row(rows, BASELINE, 16), _row(rows, DIRECT, 1), _row(rows, DIRECT, 16)
    for name in dict.fromkeys(r["target"] for r in rows):
        if name == DIRECT:
            continue
        c1, c16 = _row(rows, name, 1), _row(rows, name, 16)
        if c1 is not None and direct1 is not None:
            ratios[f"{name}_added_p50_ms_c1"] = round(c1["p50_ms"] - direct1["p50_ms"], 3)
        if c16 is not None and direct16 is not None:
            ratios[f"{name}_rps_vs_direct_c16"] = _ratio(c16["rps"], direct16["rps"])
        if name != BASELINE and c16 is not None and lit16 is not None:
            ratios[f"{name}_rps_vs_litellm_c16"] = _ratio(c16["rps"], lit16["rps"])
            ratios[f"litellm_cpu_per_request_vs_{name}_c16"] = _ratio(
                lit16["cpu_ms_per_request"], c16["cpu_ms_per_request"]
            )
    return ratios


def _check(issue: int, target: str, measured: float | None, threshold: float, at_least: bool) -> dict[str, Any]:
    met = None if measured is None else (measured >= threshold if at_least else measured <= threshold)
    return {"issue": issue, "target": target, "measured": measured, "threshold": threshold, "met": met}


def _errors(rows: list[dict[str, Any]], target: str) -> int | None:
    mine = [r["errors"] for r in rows if r["target"] == target]
    return sum(mine) if mine else None


def evaluate_targets(
    rows: list[dict[str, Any]], ratios: dict[str, float | None], target_metrics: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """The targets issue 2 (gateway core) and issue 3 (specialist path) set for this benchmark."""
    rss = [r["rss_mb"] for r in rows if r["target"] == "apprentice"]
    checks = [
        _check(2, "apprentice rps at c16 >= 10x litellm-proxy", ratios.get("apprentice_rps_vs_litellm_c16"), 10, True),
        _check(2, "added p50 at c1 (apprentice - direct) <= 1 ms", ratios.get("apprentice_added_p50_ms_c1"), 1, False),
        _check(2, "apprentice RSS <= 150 MB", max(rss) if rss else None, 150, False),
        _check(2, "apprentice errors at every concurrency == 0", _errors(rows, "apprentice"), 0, False),
    ]
    if any(r["target"] == SPECIALIST for r in rows):
        specialist = target_metrics.get(SPECIALIST, {})
        checks += [
            _check(
                3,
                "specialist rps at c16 >= 20x litellm-proxy",
                ratios.get(f"{SPECIALIST}_rps_vs_litellm_c16"),
                20,
                True,
            ),
            _check(3, "router + ONNX inference p99 <= 1 ms", specialist.get("specialist_inference_p99_ms"), 1, False),
            _check(3, "specialist errors at every concurrency == 0", _errors(rows, SPECIALIST), 0, False),
        ]
    return checks


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def results_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| target | concurrency | rps | p50 ms | p90 ms | p99 ms | CPU ms/request | RSS MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ("concurrency", "rps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_request", "rss_mb", "errors")
    for row in rows:
        lines.append(f"| {row['target']} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    machine, versions, settings = report["machine"], report["versions"], report["settings"]
    parts = [
        "# Gateway overhead: pass-through against one fake upstream",
        "",
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, {machine['memory_gb']} GB, "
        f"{machine['os']}, Python {machine['python']} (1-minute load average at start: "
        f"{machine['load_average_1m_at_start']}; the machine may be shared).",
        f"Load: {versions.get('load_generator')}, closed loop, {settings['duration_s']:g} s per point after "
        f"{settings['warmup_s']:g} s of warm-up; {settings['request']}; upstream latency "
        f"{settings['upstream_latency_ms']:g} ms. CPU and RSS: the target's serving process tree only.",
        f"Reproduce: `python -m benchmarks.overhead --duration {settings['duration_s']:g}`.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "load_generator") + ".",
        "",
        results_table(report["results"]),
        "",
        "## Ratios",
        "",
        *[f"- `{k}`: {_fmt(v)}" for k, v in report["ratios"].items()],
        "",
        "## Targets",
        "",
        "| issue | target | measured | met |",
        "|---:|---|---:|---|",
        *[
            f"| {c['issue']} | {c['target']} | {_fmt(c['measured'])} | "
            f"{'n/a' if c['met'] is None else ('yes' if c['met'] else 'NO')} |"
            for c in report["checks"]
        ],
    ]
    for name, metrics in report.get("target_metrics", {}).items():
        parts += ["", f"{name}: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in metrics.items())]
    for name, why in report.get("failures", {}).items():
        parts += ["", f"**{name} failed**: {why.splitlines()[0] if why else ''}"]
    return "\n".join(parts) + "\n"
