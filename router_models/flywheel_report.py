"""The flywheel's summary: the markdown table the benchmark and the demo print, and the per-day plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router_models.flywheel import FlywheelResult


def main_table(result: FlywheelResult) -> str:
    """The markdown summary both the benchmark and the demo print."""
    lines = [
        "| day | requests | offload (in-scope) | specialist accuracy | holdout coverage | holdout agreement "
        "| promoted |",
        "|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for d in result.days:
        lines.append(
            f"| {d['day']} | {d['requests']} | {d['offload_in_scope']:.3f} | {_fmt(d['specialist_accuracy_in_scope'])} "
            f"| {_fmt(d['holdout_coverage'])} | {_fmt(d['holdout_agreement'])} | {d['promoted']} |"
        )
    lines += [
        "",
        "| test split | value |",
        "|---|---:|",
        f"| teacher accuracy (in-scope) | {result.teacher_accuracy_in_scope:.4f} |",
        f"| system accuracy (in-scope) | {result.system_accuracy_in_scope:.4f} |",
        f"| offload (in-scope) | {result.offload_in_scope:.4f} |",
        f"| agreement with the teacher on offloaded requests | {_fmt(result.agreement_offloaded)} |",
        f"| out-of-scope escalation recall | {result.oos_escalation_recall:.4f} |",
        f"| cost ratio (gateway / all-teacher) | {_fmt(result.cost_ratio)} |",
    ]
    if result.best_tau_on_test is not None:
        lines += ["", _diagnostic(result.best_tau_on_test, result.target_agreement)]
    return "\n".join(lines)


def _diagnostic(best: dict[str, Any], target: float) -> str:
    """The served version scored offline on the test split (`flywheel._serving_version_on_test`), in words."""
    if best.get("tau") is not None:
        text = (
            f"Diagnostic, not a result: with a tau chosen on the test split itself ({best['tau']:.3f}; distill chose "
            f"{best['tau_distill_chose']:.3f}), the same version would serve {best['offload_in_scope']:.4f} of "
            f"in-scope inputs at agreement {best['agreement_offloaded']:.4f}."
        )
    else:
        text = f"Diagnostic, not a result: no tau chosen on the test split itself gives the served version {target}"
        text += " agreement."
    if best.get("offload_in_scope_oos_set_aside") is not None:
        text += (
            f" With every out-of-scope input escalated (a perfect OOD detector) it would serve "
            f"{best['offload_in_scope_oos_set_aside']:.4f}: the in-scope ranking's own limit."
        )
    if best.get("ood_auroc") is not None:
        auroc = best["ood_auroc"]
        text += f" Its OOD score separates out-of-scope inputs from in-scope ones with ROC area {auroc:.4f}."
    return text


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot(result: FlywheelResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [d["day"] for d in result.days]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(days, [d["offload_in_scope"] for d in result.days], "o-", label="offload on the day's traffic")
    acc = [d["specialist_accuracy_in_scope"] for d in result.days]
    ax.plot(days, [a if a is not None else float("nan") for a in acc], "s-", label="specialist accuracy")
    hold = [d["holdout_agreement"] for d in result.days]
    ax.plot(days, [h if h is not None else float("nan") for h in hold], "^--", label="holdout agreement (distill)")
    ax.axhline(result.target_agreement, color="grey", ls=":", label=f"target agreement {result.target_agreement}")
    ax.scatter([days[-1] + 0.5], [result.offload_in_scope], marker="*", s=150, color="C0", label="test offload")
    if result.agreement_offloaded is not None:
        ax.scatter([days[-1] + 0.5], [result.agreement_offloaded], marker="*", s=150, color="C2",
                   label="test agreement (offloaded)")  # fmt: skip
    ax.set_xticks([*days, days[-1] + 0.5], [*(str(d) for d in days), "test"])
    ax.set_xlabel("day (distill after each), then the test split")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"apprentice flywheel on {result.dataset} ({result.student} student)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
