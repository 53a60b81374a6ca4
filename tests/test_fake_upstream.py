"""The fake upstream is a real OpenAI-compatible server: the `openai` client parses everything it sends."""

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from benchmarks.fake_upstream import FakeUpstreamProcess, launch

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstreamProcess]:
    with launch(models=["gpt-4o-mini", "other-model"], name="primary") as process:
        yield process


@pytest.fixture(scope="module")
def client(upstream: FakeUpstreamProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_are_listed_and_retrievable(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "other-model"]
    assert client.models.retrieve("other-model").id == "other-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_non_streaming_completion_has_content_and_usage(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_max_tokens_and_n_shape_the_answer(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, n=3, extra_headers={"x-fake-content": "a b c d"}
    )
    assert [c.message.content for c in resp.choices] == ["a b"] * 3
    assert {c.finish_reason for c in resp.choices} == {"length"}
    assert resp.usage is not None and resp.usage.completion_tokens == 6


def test_stream_with_usage_parses_in_openai_client(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "This is a fake answer from the fake upstream."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_logprobs_are_openai_shaped(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        logprobs=True,
        top_logprobs=5,
        extra_headers={"x-fake-content": "billing"},
    )
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["billing"]
    assert len(logprobs.content[0].top_logprobs) == 5
    assert logprobs.content[0].top_logprobs[0].token == "billing"
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].delta.content]
    assert all(lp is not None and lp.content and len(lp.content[0].top_logprobs) == 2 for lp in streamed)


def test_tools_get_a_tool_call_with_parseable_arguments(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "days"}
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True)
    )
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function)) == json.loads(
        call.function.arguments
    )


def test_response_format_json_answers_an_object(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert json.loads(resp.choices[0].message.content or "") == {}


def test_requests_are_recorded_and_resettable(upstream: FakeUpstreamProcess, client: openai.OpenAI) -> None:
    httpx.delete(upstream.url + "/_requests")
    client.chat.completions.create(model="other-model", messages=MESSAGES, seed=7, stop=["x"], user="u1")
    recorded = httpx.get(upstream.url + "/_requests").json()
    assert recorded == [{"model": "other-model", "messages": MESSAGES, "seed": 7, "stop": ["x"], "user": "u1"}]
    detail = httpx.get(upstream.url + "/_requests", params={"detail": "1"}).json()
    assert detail[0]["path"] == "/v1/chat/completions"
    assert detail[0]["headers"]["authorization"] == "Bearer unused"
    stats = httpx.get(upstream.url + "/_stats").json()
    assert stats["model:other-model"] >= 1
    httpx.delete(upstream.url + "/_requests")
    assert httpx.get(upstream.url + "/_requests").json() == []


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("status", "error_class"),
    [(400, openai.BadRequestError), (429, openai.RateLimitError), (500, openai.InternalServerError)],
)
def test_injected_status_raises_matching_openai_error(
    client: openai.OpenAI, status: int, error_class: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-fail": str(status)}
        )
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}


def test_fail_times_is_per_key_then_succeeds(upstream: FakeUpstreamProcess) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    url = upstream.url + "/v1/chat/completions"
    headers = {"x-fake-fail-times": "2", "x-fake-fault-key": f"k-{time.time_ns()}", "x-fake-retry-after": "1"}
    first = httpx.post(url, json=body, headers=headers)
    assert first.status_code == 429 and first.headers["retry-after"] == "1"
    assert httpx.post(url, json=body, headers=headers).status_code == 429
    assert httpx.post(url, json=body, headers=headers).status_code == 200
    # The same directives in `metadata` reach the fake when a gateway drops unknown headers.
    meta_key = f"m-{time.time_ns()}"
    meta = {"x-fake-fail": "503", "x-fake-fail-times": "1", "x-fake-fault-key": meta_key}
    assert httpx.post(url, json={**body, "metadata": meta}).status_code == 503
    assert httpx.post(url, json={**body, "metadata": meta}).status_code == 200


def test_delay_is_applied(upstream: FakeUpstreamProcess) -> None:
    start = time.perf_counter()
    resp = httpx.post(
        upstream.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES},
        headers={"x-fake-delay-ms": "200"},
    )
    assert resp.status_code == 200
    assert time.perf_counter() - start >= 0.2


def test_cut_stream_breaks_the_connection_without_done(upstream: FakeUpstreamProcess) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    lines: list[str] = []
    headers = {"x-fake-cut-stream-after": "2"}
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("POST", upstream.url + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        lines.extend(line for line in resp.iter_lines() if line)
    contents = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines]
    assert contents == ["", "This", " is"]


def test_disconnect_drops_the_connection(upstream: FakeUpstreamProcess) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(upstream.url + "/v1/models", headers={"x-fake-fail": "disconnect"})


def test_api_key_is_enforced_when_configured() -> None:
    with launch(api_key="sk-upstream") as keyed:
        with (
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError) as caught,
        ):
            bad.models.list()
        assert caught.value.code == "invalid_api_key"
        with openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-upstream", max_retries=0) as good:
            assert good.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices


def test_name_labels_answers_and_fail_on_targets_only_that_instance(upstream: FakeUpstreamProcess) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    url = upstream.url + "/v1/chat/completions"
    assert httpx.get(upstream.url + "/v1/models").json()["data"][0]["owned_by"] == "primary"
    ok = httpx.post(url, json=body, headers={"x-fake-fail": "500", "x-fake-fail-on": "backup"})
    assert ok.status_code == 200 and ok.headers["x-fake-upstream"] == "primary"
    assert (
        httpx.post(url, json=body, headers={"x-fake-fail": "500", "x-fake-fail-on": "backup,primary"}).status_code
        == 500
    )
