"""The Prometheus rules and the Grafana dashboard in deploy/ query what the gateway exports: every metric name
and label they use exists in gateway/metrics.py (read from a live render), recorded series are recorded, and
promtool checks the rules, runs their unit tests (deploy/prometheus/rules.test.yml) and parses every query.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import _strings, _yaml

from gateway.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
# Set on every scrape target by Prometheus, not by the gateway.
TARGET_LABELS = {"job", "instance"}
METRIC_RE = re.compile(r"(?<![\w:])(apprentice_[a-z0-9_]+)")
RECORDED_RE = re.compile(r"(?<![\w:])([a-z_]+:apprentice_[a-z0-9_]+:[a-z0-9_]+)")
SELECTOR_RE = re.compile(r"(?<![\w:])([a-z_:]*apprentice_[a-z0-9_:]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
LABEL_REPLACE_DST_RE = re.compile(r'label_replace\(.*?,\s*"(\w+)",\s*"\$1"', re.S)


@pytest.fixture(autouse=True)
def _single_process_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(PROMETHEUS / "rules.yml")["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    # Template variables: Grafana's label_values(SELECTOR, LABEL), checked as the equivalent PromQL.
    for var in dashboard["templating"]["list"]:
        if var.get("definition"):
            parsed = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert parsed, var["definition"]
            exprs.append(f"count by ({parsed[2]}) ({parsed[1]})")
    return exprs


def _all_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in _rules()] + _dashboard_exprs()


def _metric_labels() -> dict[str, set[str]]:
    """Every series name the gateway exports, from a live render, with the label names it can carry."""
    metrics = Metrics()
    # Label names are not in the text of a metric nobody has observed yet; the collectors know them.
    labels = {c._name: set(c._labelnames) for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)}
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        own = labels.get(family.name, labels.get(f"{family.name}_total", set()))
        if family.type == "counter":
            names[f"{family.name}_total"] = own
        elif family.type == "histogram":
            names.update(
                {f"{family.name}_bucket": own | {"le"}, f"{family.name}_sum": own, f"{family.name}_count": own}
            )
        else:
            names[family.name] = own
    assert len(names) > 20, names
    return names


def test_dashboard_panels() -> None:
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "dashboard panel ids must be unique"
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["type"] == "row" or (panel["targets"] and panel["datasource"]), panel["title"]


def test_referenced_metric_names_exist_in_gateway_metrics() -> None:
    known = _metric_labels()
    sources = {
        "rules.yml": list(_strings(_yaml(PROMETHEUS / "rules.yml"))),
        "prometheus.yml": list(_strings(_yaml(PROMETHEUS / "prometheus.yml"))),
        "dashboard.json": list(_strings(json.loads(DASHBOARD.read_text(encoding="utf-8")))),
    }
    for source, strings in sources.items():
        unknown = {name for s in strings for name in METRIC_RE.findall(s)} - set(known)
        assert not unknown, f"{source} names metrics gateway/metrics.py does not export: {sorted(unknown)}"
    used = {name for e in _all_exprs() for name in METRIC_RE.findall(e)}
    assert {"apprentice_requests_total", "apprentice_log_records_total", "apprentice_router_score_bucket"} <= used


def test_recorded_series_used_are_recorded() -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    used = {name for e in _all_exprs() for name in RECORDED_RE.findall(e)}
    assert used - recorded == set(), f"used but never recorded: {sorted(used - recorded)}"
    for name in recorded:  # level:metric:operations, the level naming the labels the series keeps
        assert RECORDED_RE.fullmatch(name), name


def test_label_names_in_queries_exist_on_their_metrics() -> None:
    """A wrong label name is no error in PromQL, just an empty or collapsed series: catch it here."""
    known = _metric_labels()
    for expr in _all_exprs():
        allowed = set(TARGET_LABELS) | set(LABEL_REPLACE_DST_RE.findall(expr))
        for name in METRIC_RE.findall(expr):
            allowed |= known[name]
        for name in RECORDED_RE.findall(expr):
            allowed |= set(name.split(":")[0].split("_"))
        for series, matchers in SELECTOR_RE.findall(expr):
            own = set(series.split(":")[0].split("_")) if ":" in series else known[series]
            bad = set(MATCHER_RE.findall(matchers)) - own - TARGET_LABELS
            assert not bad, f"{series} has no label {sorted(bad)} in: {expr}"
        for group in GROUPING_RE.findall(expr):
            bad = {label.strip() for label in group.split(",") if label.strip()} - allowed
            assert not bad, f"grouping by unknown labels {sorted(bad)} in: {expr}"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _promtool()
    _run(promtool, "check", "rules", str(PROMETHEUS / "rules.yml"))
    _run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    _run(promtool, "test", "rules", str(PROMETHEUS / "rules.test.yml"))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = _promtool()
    grafana_vars = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$task": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr.replace("$1", ""), f"unknown Grafana variable in: {expr}"
        rules.append({"record": f"dashboard:query_{i}:check", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    _run(promtool, "check", "rules", str(path))


def test_a_dead_workers_live_gauges_are_forgotten_by_the_next_worker(tmp_path: Path) -> None:
    """uvicorn replaces a crashed worker, which never reached its own shutdown: its `livemax` specialist_info
    (a version it no longer serves) and `livesum` window gauges would stay in every scrape."""
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry, multiprocess

    from gateway.metrics import forget_dead_workers

    writer = (
        "from gateway.metrics import Metrics; import time, sys; m = Metrics();"
        "m.specialist_info.labels(task='intent', version=sys.argv[1]).set(1); print('set', flush=True);"
        "time.sleep(float(sys.argv[2]))"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", writer, "v-dead", "0"], env=env, check=True, cwd=Path(__file__).resolve().parents[1]
    )
    alive = subprocess.Popen(
        [sys.executable, "-c", writer, "v-alive", "60"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert alive.stdout is not None and alive.stdout.readline().strip() == "set"

        def versions() -> set[str]:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
            value = registry.get_sample_value
            return {
                v
                for v in ("v-dead", "v-alive")
                if value("apprentice_specialist_info", {"task": "intent", "version": v})
            }

        assert versions() == {"v-dead", "v-alive"}
        assert forget_dead_workers(str(tmp_path)) != [] and versions() == {"v-alive"}
        assert forget_dead_workers(str(tmp_path)) == []
    finally:
        alive.kill()
        alive.wait()
        if alive.stdout is not None:
            alive.stdout.close()


def test_a_shared_metrics_directory_loses_only_its_stale_metric_files(tmp_path: Path, monkeypatch) -> None:
    """PROMETHEUS_MULTIPROC_DIR set to a shared directory (or /tmp by mistake): the launch removes the previous
    run's metric files, which would be summed into this run's counters, and nothing else."""
    from gateway.server import _prepare_multiprocess_metrics

    (tmp_path / "other_app").mkdir()
    (tmp_path / "other_app" / "data.txt").write_text("kept")
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "gauge_livesum_123.db").write_bytes(b"stale")
    (tmp_path / "histogram_123.db").write_bytes(b"stale")
    (tmp_path / "inference.db").write_bytes(b"an inference log kept here")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _prepare_multiprocess_metrics(workers=2)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "inference.db", "notes.txt", "other_app", "other_app/data.txt",
    ]  # fmt: skip
