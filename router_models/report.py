"""The distill report of one candidate version: report.json, report.md and report.png (agreement vs coverage).

The JSON is the machine-readable record (benchmarks read it); the markdown is what an operator reads; the
plot shows the holdout agreement of the specialist when it serves the top share of traffic by router score,
with the calibrated tau and the target marked, and the current version's curve beside it when there is one.
"""

from __future__ import annotations

import io
import json
from typing import Any


def report_files(report: dict[str, Any]) -> dict[str, bytes]:
    """{"report.json", "report.md", "report.png"} as bytes, ready for `registry.write_version`."""
    return {
        "report.json": json.dumps(report, indent=2, sort_keys=False, default=str).encode(),
        "report.md": markdown(report).encode(),
        "report.png": plot_png(report),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    cand = report["holdout"]["candidate"]
    cur = report["holdout"].get("current")
    lines = [
        f"# distill report: {report['task']} {report['version']}",
        "",
        f"**{'Promoted' if report['promoted'] else 'Not promoted'}**: {report['reason']}",
        "",
        f"- student: {report['student']}; target agreement {report['target_agreement']}; "
        f"tau {_fmt(report['tau'])}; temperature {_fmt(report['temperature'])}; "
        f"OOD threshold {_fmt(report['router']['ood_threshold'])} "
        f"(energy mix {_fmt(report['metrics']['energy_mix'])})",
        f"- data: {report['data']['records']} records, {report['data']['unique_inputs']} unique inputs, "
        f"{report['data']['declines']} declines; split train {report['data']['train']} / router fit "
        f"{report['data']['router_fit']} / conformal {report['data']['conformal']} / holdout "
        f"{report['data']['holdout']}",
        f"- window: {report['data'].get('since') or 'all'} .. {report['data'].get('until')}",
        f"- ONNX parity: max abs diff {report['parity_max_abs_diff']:.1e} on {report['parity_inputs']} inputs",
        "",
        "## Holdout (newest records, the same for both versions)",
        "",
        "| metric | candidate | current |",
        "|---|---|---|",
    ]
    keys = ["coverage", "agreement_served", "coverage_at_target", "accuracy_labelled", "declines_served", "n"]
    for key in keys:
        lines.append(f"| {key} | {_fmt(cand.get(key))} | {_fmt(cur.get(key)) if cur else '-'} |")
    conformal = report["conformal"]
    lines += [
        "",
        "## tau (calibration split)",
        "",
        f"served {conformal['served']} of {conformal['n']} with {conformal['errors']} disagreements; upper bound on "
        f"disagreement at confidence {_fmt(report.get('agreement_confidence'))} (Clopper-Pearson on the effective "
        f"sample, shadow records weighted 1/shadow_rate) = {_fmt(conformal['bound'])} <= "
        f"{_fmt(1 - report['target_agreement'])}",
        "",
        conformal.get("reason") or "",
        "",
        "## Timings (s)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {step} | {seconds:.2f} |" for step, seconds in report["timings_s"].items()],
        "",
    ]
    return "\n".join(lines)


def plot_png(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        cand = report["holdout"]["candidate"]
        cur = report["holdout"].get("current")
        if cand["curve"]:
            xs, ys = zip(*cand["curve"], strict=True)
            ax.plot(xs, ys, label=f"candidate {report['version']}", color="tab:blue")
        if cur and cur.get("curve"):
            xs, ys = zip(*cur["curve"], strict=True)
            ax.plot(xs, ys, label=f"current {report.get('current_version')}", color="tab:gray", linestyle="--")
        ax.axhline(report["target_agreement"], color="tab:red", linewidth=0.8, label="target agreement")
        if cand["agreement_served"] is not None:
            ax.scatter(
                [cand["coverage"]],
                [cand["agreement_served"]],
                color="tab:blue",
                zorder=3,
                label=f"at tau = {report['tau']:.3f}",
            )
        ax.axvline(cand["coverage"], color="tab:blue", linewidth=0.6, linestyle=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(max(0.0, min(0.8, report["target_agreement"] - 0.2)), 1.005)
        ax.set_xlabel("coverage (share of holdout traffic the specialist serves)")
        ax.set_ylabel("agreement with the teacher on served")
        ax.set_title(f"{report['task']} {report['student']}: agreement vs coverage (holdout)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
