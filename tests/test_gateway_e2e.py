"""The gateway as users run it: `apprentice serve` processes driven by the real `openai` client.

Pass-through (JSON and SSE, usage chunk only when asked, every parameter forwarded unchanged), response headers,
model listing in config and --upstream mode, health/readiness/metrics, the refusal to serve a public address
without keys, and several workers whose metrics add up.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import CLIENT_KEYS, CLIENT_KEYS_ENV, Stack, fault
from procs import (
    VENV_BIN,
    child_env,
    closed_port_url,
    metric_total,
    run_to_exit,
    scrape_metrics,
    start_fake_upstream,
    start_gateway,
)

from benchmarks.fake_upstream import request_id_prefix

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
FAKE_ANSWER = "This is a fake answer from the fake upstream."
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


def test_non_streaming_completion_with_gateway_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-apprentice-route"] == "teacher"
    assert raw.headers["x-apprentice-upstream"] == "main"
    overhead = float(raw.headers["x-apprentice-overhead-ms"])
    assert 0.0 <= overhead < 1000.0
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.content == FAKE_ANSWER
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == 9
    # What the upstream says about the request travels with the answer: its id (the SDK's `_request_id`, what
    # the provider's support asks for) and the rate-limit state of the key the gateway calls with.
    assert raw.headers["x-request-id"].startswith(request_id_prefix("primary"))
    assert resp._request_id == raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) < 10000
    assert "openai-processing-ms" in raw.headers
    again = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert again.headers["x-request-id"] != raw.headers["x-request-id"]


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, user=marker
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-apprentice-route"] == "teacher"
    assert raw.headers["x-request-id"].startswith(request_id_prefix("primary"))
    assert "x-ratelimit-remaining-requests" in raw.headers
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == FAKE_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices and c.usage is None for c in chunks)
    (sent,) = stack.recorded(stack.primary, user=marker)
    assert sent["stream"] is True and "stream_options" not in sent


def test_stream_with_include_usage_ends_with_the_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FAKE_ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_every_parameter_reaches_the_upstream_unchanged(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    sent = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Answer with a tool call."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object", "properties": {"t": {"type": "number"}}}},
        },
        "logprobs": True,
        "top_logprobs": 3,
        "n": 2,
        "seed": 42,
        "stop": ["\n\n", "END"],
        "temperature": 0.3,
        "max_completion_tokens": 50,
        "user": marker,
    }
    future = {"a_parameter_openai_adds_next_year": {"nested": [1, 2.5, None, "é"]}}
    resp = client.chat.completions.create(**sent, extra_body=future)
    (received,) = stack.recorded(stack.primary, user=marker)
    assert received == {**sent, **future}
    assert len(resp.choices) == 2
    calls = resp.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "fake"}


def test_a_cookie_an_upstream_sets_never_rides_on_later_requests(
    client: openai.OpenAI, stack: Stack, marker: str
) -> None:
    # One connection pool serves every caller: a cookie kept from one answer (a CDN's bot cookie, say) would
    # carry one caller's upstream state into the requests of others. The upstream is addressed by name
    # (localhost) because cookie jars refuse cookies from bare IP addresses.
    for _ in range(2):
        client.chat.completions.create(
            model="named-host-model",
            messages=MESSAGES,
            user=marker,
            metadata=fault(set_cookie="__cf_bm=abc123; Path=/"),
        )
    detailed = httpx.get(stack.primary.url + "/_requests", params={"detail": "1"}, timeout=10).json()
    received = [r for r in detailed if r["body"].get("user") == marker]
    assert len(received) == 2
    assert [r["headers"].get("cookie") for r in received] == [None, None]


def test_an_answer_compressed_against_our_asking_is_decoded(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    # The gateway asks for identity and forwards the answer's bytes; a server that gzips anyway must not reach
    # the client as gzip bytes labelled application/json.
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user=marker, metadata=fault(gzip=1))
    assert resp.choices[0].message.content
    (received,) = [
        r
        for r in httpx.get(stack.primary.url + "/_requests", params={"detail": "1"}, timeout=10).json()
        if r["body"].get("user") == marker
    ]
    assert received["headers"].get("accept-encoding") == "identity"
    assert received["headers"].get("user-agent", "").startswith("apprentice/")  # some CDNs refuse none


def test_response_format_json_object_streamed_is_passed_through(
    client: openai.OpenAI, stack: Stack, marker: str
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, response_format={"type": "json_object"}, stream=True, user=marker
        )
    )
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == {}
    (received,) = stack.recorded(stack.primary, user=marker)
    assert received == {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "response_format": {"type": "json_object"},
        "stream": True,
        "user": marker,
    }


def test_models_list_and_retrieve_in_config_mode(client: openai.OpenAI) -> None:
    listed = {m.id: m.owned_by for m in client.models.list()}
    assert listed == {
        "gpt-4o-mini": "main",
        "gpt-4o": "main",
        "fake-model": "main",
        "slow-model": "slow",
        "dead-model": "dead",
        "fallback-model": "flaky",
        "named-host-model": "named",
    }
    model = client.models.retrieve("gpt-4o")
    assert (model.id, model.object) == ("gpt-4o", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_upstream_mode_serves_exactly_what_the_upstream_lists(stack: Stack) -> None:
    upstream_ids = [m["id"] for m in httpx.get(stack.primary.url + "/v1/models").json()["data"]]
    # No client keys in this mode (loopback), but the openai client insists on some key.
    with openai.OpenAI(base_url=stack.upstream_gateway.url + "/v1", api_key="none", max_retries=0) as c:
        assert sorted(m.id for m in c.models.list()) == sorted(upstream_ids)
        assert c.models.retrieve("fake-model").id == "fake-model"
        resp = c.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert resp.choices[0].message.content == FAKE_ANSWER
        with pytest.raises(openai.NotFoundError) as caught:
            c.chat.completions.create(model="not-listed-upstream", messages=MESSAGES)
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("not-listed-upstream")


def test_upstream_mode_is_not_ready_until_the_upstream_lists_its_models(tmp_path: Path) -> None:
    upstream_url = closed_port_url()
    with start_gateway(["--upstream", upstream_url + "/v1"], cwd=tmp_path) as gateway:
        assert httpx.get(gateway.url + "/healthz").status_code == 200  # alive...
        ready = httpx.get(gateway.url + "/readyz")  # ...but it knows no model yet
        assert ready.status_code == 503
        assert ready.json() == {"status": "not_ready", "checks": {"upstream_models": False}}
        # A request meanwhile is not a 404: the gateway cannot know yet whether the model exists.
        early = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "late-model", "messages": MESSAGES})
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "not_ready"
        port = upstream_url.rsplit(":", 1)[1]
        # Let the discovery back-off grow to 8 s (6 failed attempts, the early request's included): the first
        # request after the upstream is back must not wait for the next scheduled attempt (it would give up
        # after DISCOVERY_WAIT_S = 5 s), as long as the fake upstream starts within 3 s.
        deadline = time.monotonic() + 30
        while gateway.output().count("cannot list models of upstream") < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        with start_fake_upstream("--port", port, "--models", "late-model", log_dir=tmp_path):
            body = {"model": "late-model", "messages": MESSAGES}
            resp = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=10)
            assert resp.status_code == 200, resp.text
            assert httpx.get(gateway.url + "/readyz").status_code == 200
            unknown = httpx.post(gateway.url + "/v1/chat/completions", json={**body, "model": "never-listed"})
            assert unknown.status_code == 404


def test_health_readiness_and_metrics_endpoints(client: openai.OpenAI, stack: Stack) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    base = stack.gateway.url
    health = httpx.get(base + "/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(base + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    metrics = httpx.get(base + "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for family in (
        "apprentice_requests_total",
        "apprentice_request_duration_seconds_bucket",
        "apprentice_gateway_overhead_seconds_bucket",
        "apprentice_upstream_duration_seconds_bucket",
        "apprentice_tokens_total",
    ):
        assert family in metrics.text, family


def test_metrics_count_requests_tokens_and_cost(client: openai.OpenAI, stack: Stack) -> None:
    before = scrape_metrics(stack.gateway.url)
    priced = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    unpriced = client.chat.completions.create(model="fake-model", messages=MESSAGES)
    after = scrape_metrics(stack.gateway.url)

    def delta(name: str, **labels: str) -> float:
        return metric_total(after, name, **labels) - metric_total(before, name, **labels)

    assert delta("apprentice_requests_total", model="gpt-4o", route="teacher", status="200") == 1
    assert priced.usage is not None and unpriced.usage is not None
    assert delta("apprentice_tokens_total", model="gpt-4o", kind="prompt") == priced.usage.prompt_tokens
    assert delta("apprentice_tokens_total", model="gpt-4o", kind="completion") == priced.usage.completion_tokens
    # The config prices gpt-4o at $1 per prompt token and nothing per completion token.
    assert delta("apprentice_cost_usd_total", model="gpt-4o") == pytest.approx(priced.usage.prompt_tokens)
    # fake-model has no price: counted as unknown, never as $0.
    assert delta("apprentice_cost_unknown_total", model="fake-model") == 1
    assert metric_total(after, "apprentice_cost_usd_total", model="fake-model") == 0
    assert not any(n == "apprentice_cost_usd_total" and ("model", "fake-model") in lbls for n, lbls in after)


def test_refuses_a_public_address_without_client_keys(tmp_path: Path) -> None:
    cmd = [str(VENV_BIN / "apprentice"), "serve", "--host", "0.0.0.0", "--port", "0", "--upstream", closed_port_url()]
    try:
        result = run_to_exit(cmd, cwd=tmp_path, timeout_s=60)
    except subprocess.TimeoutExpired:  # it is serving 0.0.0.0: the refusal is missing
        pytest.fail("apprentice serve bound 0.0.0.0 without client keys")
    assert result.returncode == 2, result.stdout
    assert "server.host" in result.stdout and "auth.api_keys" in result.stdout
    assert "--allow-unauthenticated" in result.stdout


def test_two_workers_serve_and_metrics_add_up_across_them(tmp_path: Path, stack: Stack) -> None:
    config = tmp_path / "workers.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {"api_keys": [f"env:{CLIENT_KEYS_ENV}"]},
                "upstreams": {"main": {"api_base": stack.primary.url + "/v1", "models": ["gpt-4o-mini"]}},
            }
        )
    )
    metrics_dir = tmp_path / "prometheus"
    env = child_env({CLIENT_KEYS_ENV: CLIENT_KEYS[0], "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    headers = {"authorization": f"Bearer {CLIENT_KEYS[0]}"}
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    with start_gateway(["--workers", "2"], config=config, env=env) as gateway:
        # The second worker may still be starting when the first answers /healthz.
        deadline = time.monotonic() + 30
        while len({p.name.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")}) < 2:
            assert time.monotonic() < deadline, f"only one worker started:\n{gateway.output()}"
            time.sleep(0.1)
        sent = 24
        # No keep-alive: a new connection each time, so the kernel spreads them over both workers.
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for _ in range(sent):
                resp = http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)
                assert resp.status_code == 200, resp.text
        # Every scrape, whichever worker answers it, reports the requests of both.
        for _ in range(6):
            samples = scrape_metrics(gateway.url)
            assert metric_total(samples, "apprentice_requests_total", model="gpt-4o-mini", status="200") == sent
