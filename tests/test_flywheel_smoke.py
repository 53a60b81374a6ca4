"""Issue 5 at smoke size: the flywheel benchmark end to end and `apprentice demo --no-serve`, on a small JSONL
dataset cut from CLINC150 (real processes: reference teacher, gateway, `apprentice distill`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from procs import REPO_ROOT, child_env, start

from router_models.flywheel import best_tau_on_test, ood_auroc, serving_diagnostics

CLINC150 = REPO_ROOT.parent / "shared" / "data" / "clinc150" / "data_full.json"
LABELS = 8
SERVING = re.compile(r"serving the trained specialist: base_url=(http://\S+)")
MESSAGES = [{"role": "user", "content": "what is my credit limit"}]


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 intents: 40 train / 10 val / 12 test each, plus out-of-scope examples in every split."""
    data = json.loads(CLINC150.read_text())
    labels = sorted({label for _, label in data["train"]})[:: 150 // LABELS][:LABELS]
    rows = []
    for split, per_label, oos_split, oos_n in (("train", 40, "oos_train", 20), ("val", 10, "oos_val", 10),
                                               ("test", 12, "oos_test", 24)):  # fmt: skip
        for label in labels:
            rows += [{"text": t, "label": label, "split": split} for t, lab in data[split] if lab == label][:per_label]
        rows += [{"text": t, "label": "oos", "split": split} for t, _ in data[oos_split][:oos_n]]
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=child_env({"PYTHONPATH": str(REPO_ROOT)}), capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.e2e
@pytest.mark.slow
def test_flywheel_benchmark_runs_end_to_end(small_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "flywheel.json"
    proc = _run(
        ["-m", "benchmarks.flywheel", "--data", str(small_jsonl), "--days", "2", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--concurrency", "4", "--agreement-confidence", "0.8"],
        REPO_ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("dataset", "teacher", "student", "target_agreement", "agreement_confidence", "requests",
                "teacher_accuracy_in_scope",
                "system_accuracy_in_scope", "offload_in_scope", "agreement_offloaded", "oos_escalation_recall",
                "cost_ratio", "days", "machine", "versions"):  # fmt: skip
        assert key in result, key
    assert [d["day"] for d in result["days"]] == [1, 2]
    # The confidence reaches the task config distill reads (test_distill_e2e checks that distill uses it).
    assert result["agreement_confidence"] == 0.8
    config = yaml.safe_load((tmp_path / "work" / "apprentice.yaml").read_text())
    assert config["tasks"]["intent"]["agreement_confidence"] == 0.8
    # Day 1 has no specialist yet: everything goes to the teacher; distill then promotes a first version.
    assert result["days"][0]["offload_in_scope"] == 0.0
    assert result["days"][0]["promoted"] is True
    test_rows = LABELS * 12 + 24
    train_traffic = result["requests"] - test_rows
    assert train_traffic == sum(d["requests"] for d in result["days"])
    assert result["test"]["in_scope"] == LABELS * 12 and result["test"]["oos"] == 24
    for key in ("teacher_accuracy_in_scope", "system_accuracy_in_scope", "offload_in_scope", "oos_escalation_recall"):
        assert 0.0 <= result[key] <= 1.0
    # The teacher is priced as a real model, so the all-teacher cost is known and the ratio is finite.
    assert result["all_teacher_cost_usd"] > 0 and result["cost_ratio"] is not None
    # Requests carry the instructions and the label list as a system prompt, as an LLM classifier needs; the
    # teacher counts those tokens, so a request costs about the same whatever its label.
    assert result["test"]["system_prompt_chars"] > 0
    assert result["test"]["mean_prompt_tokens"] > result["test"]["system_prompt_chars"] / 4
    # The served version, scored offline: the diagnostic names it, and on 8 easy intents some tau reaches the
    # target (at the least, the inputs the specialist is surest of agree).
    best = result["best_tau_on_test"]
    assert best is not None and best["version"] == result["days"][-1]["version"]
    assert 0.0 < best["offload_in_scope"] <= 1.0 and best["agreement_offloaded"] >= result["target_agreement"]
    # Beside it, the in-scope ranking's own limit and the OOD score's ROC area, in the JSON and the table.
    assert 0.0 < best["offload_in_scope_oos_set_aside"] <= 1.0
    assert 0.0 <= best["ood_auroc"] <= 1.0
    assert "perfect OOD detector" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".md").read_text().count("|") > 20
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_no_serve_runs_and_reports_the_saving(small_jsonl: Path, tmp_path: Path) -> None:
    proc = _run(
        ["-m", "router_models.cli", "demo", "--data", str(small_jsonl), "--days", "1", "--no-serve",
         "--workdir", str(tmp_path / "demo")],
        tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| day |" in proc.stdout
    assert "out-of-scope escalation recall" in proc.stdout
    assert "saved" in proc.stdout
    assert (tmp_path / "demo" / "flywheel.png").is_file()
    assert (tmp_path / "demo" / "registry" / "intent" / "current").is_file()


def _a_gateways_own_directory(root: Path) -> list[Path]:
    (root / "registry" / "intent").mkdir(parents=True)
    (root / "logs").mkdir()
    kept = [
        root / "registry" / "intent" / "current",
        root / "inference.db",
        root / "apprentice.yaml",
        root / "logs" / "x",
    ]
    for path in kept:
        path.write_text("a gateway's own\n")
    return kept


@pytest.mark.parametrize("data", ["missing.jsonl", "the small dataset"])
def test_the_demo_never_clears_a_directory_it_did_not_fill(small_jsonl: Path, tmp_path: Path, data: str) -> None:
    """Pointed at a gateway's own registry and log by mistake, the demo refuses and deletes nothing, whether
    its --data is good or not (a bad --data once failed only after the workdir had been cleared)."""
    workdir = tmp_path / "work"
    kept = _a_gateways_own_directory(workdir)
    path = small_jsonl if data == "the small dataset" else tmp_path / data
    proc = _run(
        ["-m", "router_models.cli", "demo", "--data", str(path), "--days", "1", "--no-serve",
         "--workdir", str(workdir)],
        tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert ("not from a flywheel run" if path == small_jsonl else "missing.jsonl") in proc.stderr
    assert all(p.read_text() == "a gateway's own\n" for p in kept)


def test_a_directory_with_only_a_logs_folder_is_not_the_flywheels_either(tmp_path: Path) -> None:
    from router_models.flywheel import WorkdirError, _fresh

    (tmp_path / "project" / "logs").mkdir(parents=True)
    (tmp_path / "project" / "logs" / "app.log").write_text("kept\n")
    with pytest.raises(WorkdirError, match="logs, not from a flywheel run"):
        _fresh(tmp_path / "project")
    assert (tmp_path / "project" / "logs" / "app.log").read_text() == "kept\n"


def test_a_workdir_that_is_a_file_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    from router_models.demo import run_demo
    from router_models.flywheel import WorkdirError, _fresh

    path = tmp_path / "notes.txt"
    path.write_text("kept\n")
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        _fresh(path)
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        run_demo(data=None, workdir=path, days=1, student="tfidf", serve=False, traffic_limit=1, test_limit=1)
    assert path.read_text() == "kept\n"


def test_a_flywheel_workdir_is_cleared_for_the_next_run(small_jsonl: Path, tmp_path: Path) -> None:
    """A run's own workdir, marked by it, is cleared before the next run reads anything into it."""
    from router_models.flywheel import MARKER, _fresh

    workdir = tmp_path / "work"
    _fresh(workdir)
    assert (workdir / MARKER).is_file()
    _a_gateways_own_directory(workdir)
    _fresh(workdir)
    assert not (workdir / "registry").exists() and not (workdir / "inference.db").exists()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_demo_serves_until_a_signal_then_stops_its_servers(
    small_jsonl: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    cmd = [sys.executable, "-m", "router_models.cli", "demo", "--data", str(small_jsonl), "--days", "1",
           "--workdir", str(tmp_path / "demo")]  # fmt: skip
    env = child_env({"PYTHONPATH": str(REPO_ROOT)})
    with start(cmd, ready=SERVING, env=env, cwd=tmp_path, timeout_s=600, log_dir=tmp_path, name="demo") as demo:
        answer = httpx.post(demo.url + "/chat/completions", json={"model": "intent", "messages": MESSAGES}, timeout=20)
        assert answer.status_code == 200
        # Only the demo's own PID is signalled (a terminal's Ctrl-C would reach its children too).
        os.kill(demo.pid, stop_signal)
        assert demo.popen.wait(timeout=30) == 0, demo.output()[-3000:]
    with pytest.raises(httpx.ConnectError):  # the gateway it started is gone with it
        httpx.get(demo.url.removesuffix("/v1") + "/healthz", timeout=5)


def test_best_tau_on_test_takes_the_longest_prefix_that_keeps_the_target() -> None:
    # Scores descending: agree, agree, (oos) disagree, agree, agree, disagree; the last is not eligible.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95])
    eligible = np.array([True, True, True, True, True, True, False])
    agree = np.array([True, True, False, True, True, False, True])
    in_scope = np.array([True, True, False, True, True, True, True])
    best = best_tau_on_test(scores, eligible, agree, in_scope, target=0.75)
    # Serving down to 0.5 agrees on 4 of 5; down to 0.4, on 4 of 6 (below target).
    assert best == {"tau": 0.5, "offload_in_scope": 4 / 6, "agreement_offloaded": 0.8, "oos_escalation_recall": 0.0}
    strict = best_tau_on_test(scores, eligible, agree, in_scope, target=0.9)
    assert strict is not None and strict["tau"] == 0.8 and strict["oos_escalation_recall"] == 1.0
    # A tau cannot split tied scores: the tie at 0.8 holds a disagreement, so only 0.9 reaches 1.0.
    tied = best_tau_on_test(np.array([0.9, 0.8, 0.8]), np.ones(3, bool), np.array([True, True, False]),
                            np.ones(3, bool), target=1.0)  # fmt: skip
    assert tied is not None and tied["tau"] == 0.9
    assert best_tau_on_test(scores, eligible, np.zeros(7, bool), in_scope, target=0.5) is None


def test_setting_out_of_scope_inputs_aside_shows_the_in_scope_rankings_own_limit() -> None:
    # Descending scores: two agreeing in-scope inputs, an out-of-scope leak (a disagreement), two more agreeing
    # in-scope inputs; the last in-scope input is over the OOD threshold.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95])
    ood = np.array([0.1, 0.2, 0.9, 0.3, 0.4, 2.0])
    agree = np.array([True, True, False, True, True, True])
    in_scope = np.array([True, True, False, True, True, True])
    out = serving_diagnostics(scores, ood, 1.0, agree, in_scope, target=1.0)
    # With the leak, only the first two can be served at agreement 1.0; set aside, all four eligible ones.
    assert out["offload_in_scope"] == 2 / 5 and out["offload_in_scope_oos_set_aside"] == 4 / 5
    # The leak's OOD score is above four of the five in-scope ones.
    assert out["ood_auroc"] == 4 / 5
    # No tau reaches the target at all: the best-tau keys are None, the other two are still given.
    never = serving_diagnostics(scores, ood, 1.0, np.zeros(6, bool), in_scope, target=0.5)
    assert never["tau"] is None and never["offload_in_scope_oos_set_aside"] is None and never["ood_auroc"] == 4 / 5


def test_ood_auroc_is_the_share_of_out_of_scope_in_scope_pairs_ranked_right_ties_half() -> None:
    out_of_scope = np.array([False, False, True, True])
    assert ood_auroc(np.array([0.1, 0.2, 0.3, 0.4]), out_of_scope) == 1.0
    assert ood_auroc(np.array([0.3, 0.4, 0.1, 0.2]), out_of_scope) == 0.0
    # Pairs (out, in): (0.2, 0.2) a tie, (0.2, 0.1), (0.5, 0.2), (0.5, 0.1) ranked right: 3.5 of 4.
    assert ood_auroc(np.array([0.2, 0.1, 0.2, 0.5]), out_of_scope) == 0.875
    assert ood_auroc(np.array([0.1, 0.2]), np.array([False, False])) is None


def test_the_summary_says_when_no_tau_reaches_the_target_and_still_gives_the_other_diagnostics() -> None:
    from router_models.flywheel import FlywheelResult
    from router_models.flywheel_report import main_table

    result = FlywheelResult(
        dataset="d", teacher="t", student="tfidf", target_agreement=0.97, agreement_confidence=0.9, requests=10,
        teacher_accuracy_in_scope=0.9, system_accuracy_in_scope=0.9, offload_in_scope=0.5, agreement_offloaded=0.96,
        oos_escalation_recall=0.9, cost_ratio=0.5, gateway_cost_usd=1.0, all_teacher_cost_usd=2.0,
        best_tau_on_test={
            "version": "v", "tau_distill_chose": 0.9, "tau": None, "offload_in_scope": None,
            "agreement_offloaded": None, "oos_escalation_recall": None,
            "offload_in_scope_oos_set_aside": 0.8123, "ood_auroc": 0.9234,
        },
    )  # fmt: skip
    table = main_table(result)
    assert "no tau chosen on the test split itself gives the served version 0.97 agreement" in table
    assert "it would serve 0.8123" in table and "ROC area 0.9234" in table


@pytest.mark.parametrize(
    ("in_scope", "oos", "expected"),
    [
        (40, 10, "50% of in-scope test requests were answered by the specialist; 90% of out-of-scope requests"),
        (40, 0, "50% of in-scope test requests were answered by the specialist; the test sample held no out-of"),
        (0, 10, "no in-scope test requests were sent; 90% of out-of-scope requests"),
    ],
)
def test_the_demo_never_states_a_share_of_no_requests_as_0_percent(in_scope: int, oos: int, expected: str) -> None:
    from router_models.demo import summary_line
    from router_models.flywheel import FlywheelResult

    result = FlywheelResult(
        dataset="d", teacher="t", student="tfidf", target_agreement=0.97, agreement_confidence=0.9, requests=10,
        teacher_accuracy_in_scope=0.9, system_accuracy_in_scope=0.9, offload_in_scope=0.5, agreement_offloaded=0.96,
        oos_escalation_recall=0.9 if oos else 0.0, cost_ratio=0.5, gateway_cost_usd=1.0, all_teacher_cost_usd=2.0,
        test={"in_scope": in_scope, "oos": oos},
    )  # fmt: skip
    assert summary_line(result).startswith(expected)


class _Captured(Exception):
    """Raised in place of a flywheel run, carrying the config the benchmark built."""


def test_the_benchmarks_seed_reaches_the_flywheel_and_a_negative_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmarks.flywheel as bench
    from router_models.flywheel import FlywheelConfig, _config_yaml

    def capture(cfg: FlywheelConfig) -> None:
        raise _Captured(cfg)

    monkeypatch.setattr(bench, "run_flywheel", capture)
    args = ["--data", str(CLINC150), "--out", str(tmp_path / "f.json"), "--workdir", str(tmp_path / "w")]
    with pytest.raises(_Captured) as caught:
        bench.main([*args, "--seed", "3"])
    assert caught.value.args[0].seed == 3
    with pytest.raises(_Captured) as caught:
        bench.main(args)
    assert caught.value.args[0].seed == FlywheelConfig.seed == 0
    assert caught.value.args[0].decline_recall is None
    with pytest.raises(_Captured) as caught:
        bench.main([*args, "--decline-recall", "0.9"])
    cfg = caught.value.args[0]
    assert cfg.decline_recall == 0.9
    # ... and reaches the task config distill reads.
    assert _config_yaml(cfg, "http://127.0.0.1:9", ["a", "b"])["tasks"]["intent"]["decline_recall"] == 0.9
    with pytest.raises(SystemExit):
        bench.main([*args, "--decline-recall", "1.5"])
    assert "--decline-recall must be in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        bench.main([*args, "--seed", "-1"])
    assert refused.value.code == 2
    assert "--seed must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()
