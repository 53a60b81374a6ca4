"""Shared end-to-end fixtures: two fake OpenAI upstreams and gateways in front of them, started once per session.

The config-mode `gateway` has one upstream per failure mode, all on loopback:
    main    -> fake "primary"   gpt-4o-mini, gpt-4o, fake-model (fast retries, retry-after honoured up to 5 s)
    slow    -> fake "primary"   slow-model (first byte within 0.5 s; retries allowed, timeouts are not retried)
    dead    -> a refusing port  dead-model (connection refused; one retry)
    flaky   -> fake "primary"   fallback-model (one retry, then falls back to `backup`)
    named   -> fake "primary"   named-host-model, addressed as localhost (cookie jars refuse bare IPs)
    backup  -> fake "backup"
The upstream-mode `upstream_gateway` (`apprentice serve --upstream`) serves what "primary" lists, without auth.
Faults are asked of the fakes through the request's `metadata` (the gateway forwards the body, not headers);
`fault()` builds it. Tests that read metrics compare before/after values: the processes are shared.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
import yaml
from procs import Proc, child_env, refusing_port, start_fake_upstream, start_gateway, wait_http_ok

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.chat_models.augmented.json"
CLIENT_KEYS_ENV = "GW_TEST_CLIENT_KEYS"
CLIENT_KEYS = ("sk-test-alpha", "sk-test-beta")
GATEWAY_MODELS = [
    "gpt-4o-mini", "gpt-4o", "fake-model", "slow-model", "dead-model", "fallback-model", "named-host-model"
]  # fmt: skip
SLOW_FIRST_BYTE_S = 0.5
MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_CAP_S = 5


def spec_models() -> list[str]:
    """The model ids OpenAI's spec enumerates, so schemathesis' picks are models the upstream serves."""
    try:
        spec = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
    except OSError:
        return []
    models: list[str] = []
    for branch in spec["components"]["schemas"].get("ModelIdsShared", {}).get("anyOf", []):
        models += [m for m in branch.get("enum", []) if isinstance(m, str)]
    return models


def fault(**directives: str | int | float) -> dict[str, str]:
    """`metadata` asking the fake upstream for a fault: fault(fail=500, fail_times=1) -> x-fake-fail... keys.

    A `fail_times` fault gets a fresh `fault_key` so that it counts only this test's requests.
    """
    meta = {"x-fake-" + k.replace("_", "-"): str(v) for k, v in directives.items()}
    if "x-fake-fail-times" in meta:
        meta.setdefault("x-fake-fault-key", uuid.uuid4().hex)
    return meta


@dataclass(frozen=True)
class Stack:
    """The processes of one session: fakes (primary, backup) and the gateways in front of them."""

    primary: Proc
    backup: Proc
    gateway: Proc
    upstream_gateway: Proc
    dead_url: str

    def recorded(self, fake: Proc, **match: Any) -> list[dict[str, Any]]:
        """Bodies the fake received whose top-level fields equal `match` (e.g. user="marker")."""
        bodies: list[dict[str, Any]] = httpx.get(fake.url + "/_requests", timeout=10).json()
        return [b for b in bodies if all(b.get(k) == v for k, v in match.items())]


def _gateway_config(tmp: Path, primary: str, backup: str, dead: str) -> Path:
    fast_retry = {
        "max_retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
        "max_retry_after_s": RETRY_AFTER_CAP_S,
    }
    config = {
        "server": {"host": "127.0.0.1", "max_body_bytes": MAX_BODY_BYTES},
        "auth": {"api_keys": [f"env:{CLIENT_KEYS_ENV}"]},
        "upstreams": {
            "main": {
                "api_base": primary + "/v1",
                "models": ["gpt-4o-mini", "gpt-4o", "fake-model"],
                "retry": fast_retry,
            },
            "slow": {
                "api_base": primary + "/v1",
                "models": ["slow-model"],
                "timeouts": {"first_byte_s": SLOW_FIRST_BYTE_S},
                # Retries are allowed, so a test can see that a timeout is not retried.
                "retry": {"max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
            },
            "dead": {
                "api_base": dead + "/v1",
                "models": ["dead-model"],
                "timeouts": {"connect_s": 2},
                "retry": {"max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
            },
            "flaky": {
                "api_base": primary + "/v1",
                "models": ["fallback-model"],
                "retry": {"max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
                "fallbacks": ["backup"],
            },
            "backup": {"api_base": backup + "/v1"},
            "named": {"api_base": primary.replace("127.0.0.1", "localhost") + "/v1", "models": ["named-host-model"]},
        },
        # gpt-4o at exactly $1 per prompt token: the cost metric must then equal the prompt tokens.
        "pricing": {"models": {"gpt-4o": {"input_per_mtok": 1_000_000, "output_per_mtok": 0}}},
        "log": {"url": "memory://"},
    }
    path = tmp / "apprentice.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    # Everything entered here is stopped (by PID) in reverse order, also when a later start fails.
    with contextlib.ExitStack() as held:
        dead = held.enter_context(refusing_port())
        models = ",".join(dict.fromkeys(GATEWAY_MODELS + spec_models()))
        primary = held.enter_context(start_fake_upstream("--models", models, "--name", "primary", log_dir=tmp))
        backup = held.enter_context(start_fake_upstream("--models", models, "--name", "backup", log_dir=tmp))
        config = _gateway_config(tmp, primary.url, backup.url, dead)
        env = child_env({CLIENT_KEYS_ENV: ",".join(CLIENT_KEYS)})
        gateway = held.enter_context(start_gateway(config=config, env=env, log_dir=tmp))
        upstream_gateway = held.enter_context(start_gateway(["--upstream", primary.url + "/v1"], cwd=tmp, log_dir=tmp))
        # --upstream mode learns its models from the upstream after start-up; /readyz says when.
        wait_http_ok(upstream_gateway.url + "/readyz", proc=upstream_gateway)
        yield Stack(primary, backup, gateway, upstream_gateway, dead)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    """An OpenAI client of the config-mode gateway with a valid key and no client-side retries."""
    with openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=CLIENT_KEYS[0], max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture
def marker() -> str:
    """A unique `user` value: finds this test's requests among everything the shared fake recorded."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A log URL on the local PostgreSQL in a schema of its own, dropped afterwards; skipped where no server is
    reachable (a laptop without one; CI has one)."""
    from logstore_helpers import PG_DSN

    try:
        psycopg.connect(PG_DSN).close()
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 (database test) unreachable: {str(exc).strip()}")
    name = f"apprentice_test_{secrets.token_hex(4)}"
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/test?schema={name}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
