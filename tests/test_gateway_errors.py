"""Every error a client can meet comes back in OpenAI's envelope with OpenAI's status, and the `openai` client
raises the matching exception class: 400 (param names the field, never 422), 401, 404, 413, the upstream's own
4xx as it said it, 502 unreachable, 504 timed out. The first tests check the request parser on its own.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import CLIENT_KEYS, MAX_BODY_BYTES, SLOW_FIRST_BYTE_S, Stack, fault

from gateway import jsoncodec
from gateway.errors import InvalidRequest
from gateway.protocol import parse_chat_request

MESSAGES = [{"role": "user", "content": "hello"}]
BASE: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}

# (fields merged into a valid request, the `param` OpenAI names for them)
SCHEMA_VIOLATIONS: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [*MESSAGES, {"role": "user", "content": 5}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages[0].content[0].type"),
    ({"model": ""}, "model"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"response_format": "json"}, "response_format"),
    ({"stop": 5}, "stop"),
    ({"stop": ["ok", 5]}, "stop[1]"),
    # No coercion: what the gateway acts on must be what it forwards (OpenAI refuses these too).
    ({"stream": "yes"}, "stream"),
    ({"n": 2.5}, "n"),
    ({"n": True}, "n"),
    ({"temperature": "0.5"}, "temperature"),
]


def _body(fields: dict[str, Any]) -> bytes:
    return json.dumps({**BASE, **fields}).encode()


# -- the parser alone ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), SCHEMA_VIOLATIONS)
def test_parser_names_the_offending_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(_body(fields))
    assert caught.value.param == param
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    assert param in caught.value.message


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_parser_reports_a_missing_required_field(missing: str) -> None:
    body = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(json.dumps(body).encode())
    assert caught.value.param == missing
    assert caught.value.message == f"Missing required parameter: '{missing}'."


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"a string"', b"null"])
def test_parser_rejects_what_is_not_a_json_object(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(body)
    assert caught.value.param is None and caught.value.status == 400


def test_parser_accepts_what_json_schema_calls_an_integer() -> None:
    _, parsed = parse_chat_request(_body({"n": 2.0, "top_logprobs": 5.0, "seed": 7}))
    assert (parsed.n, parsed.top_logprobs, parsed.seed) == (2, 5, 7)


def test_parser_keeps_unknown_fields_and_the_raw_body_as_sent() -> None:
    sent = {**BASE, "tools": [{"type": "function", "function": {"name": "f"}}], "brand_new_param": [1, {"a": None}]}
    raw, parsed = parse_chat_request(json.dumps(sent).encode())
    assert raw == sent
    assert parsed.model == "gpt-4o-mini" and parsed.tools == sent["tools"]


def test_parser_accepts_what_the_standard_json_module_does() -> None:
    # A lone surrogate escape (a string cut mid-emoji by a JavaScript client) and a UTF-8 BOM are refused by
    # orjson, the fast parser, and were accepted before it: they still are.
    cut = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    raw, parsed = parse_chat_request(cut)
    assert raw["messages"][0]["content"] == "hi \ud83d"
    assert jsoncodec.loads(jsoncodec.dumps(raw)) == raw  # and it can be sent on to a teacher
    _, parsed = parse_chat_request(b"\xef\xbb\xbf" + _body({}))
    assert parsed.model == BASE["model"]


# -- through the running gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {CLIENT_KEYS[0]}"}
    with httpx.Client(base_url=stack.gateway.url, headers=headers, timeout=20) as c:
        yield c


def _message(exc: openai.APIStatusError) -> str:
    """The envelope's message as the gateway wrote it (the exception's own message adds "Error code: N - ")."""
    assert isinstance(exc.body, dict)
    return str(exc.body["message"])


def _envelope(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    return error


@pytest.mark.e2e
@pytest.mark.parametrize("body", [b'{"model": "gpt-4o-mini", "messages": [', b"[]"])
def test_malformed_json_is_400(http: httpx.Client, body: bytes) -> None:
    resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert _envelope(resp)["type"] == "invalid_request_error"


@pytest.mark.e2e
def test_a_request_that_is_not_valid_http_gets_the_envelope_too(stack: Stack) -> None:
    # uvicorn answers these itself, before any app code runs (schemathesis found this header set).
    url = httpx.URL(stack.gateway.url)
    raw = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nBQ;: y\r\ntransfer-encoding: ]K-CY3hN_249\r\n\r\n"
    with socket.create_connection((url.host, url.port), timeout=10) as conn:
        conn.sendall(raw)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert "not valid HTTP" in error["message"]


@pytest.mark.e2e
@pytest.mark.parametrize(("fields", "param"), SCHEMA_VIOLATIONS[:6] + SCHEMA_VIOLATIONS[-4:])
def test_schema_violation_is_400_naming_the_param(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    request = {**BASE, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=request.pop("model"), messages=request.pop("messages"), extra_body=request)
    assert caught.value.status_code == 400  # never FastAPI's 422
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


@pytest.mark.e2e
def test_missing_model_is_400_naming_it(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert resp.status_code == 400
    assert _envelope(resp)["param"] == "model"


@pytest.mark.e2e
def test_missing_or_wrong_client_key_is_401(stack: Stack) -> None:
    url = stack.gateway.url
    for headers in ({}, {"authorization": "Bearer"}, {"authorization": "Basic c2stdGVzdA=="}):
        resp = httpx.post(url + "/v1/chat/completions", json=BASE, headers=headers)
        assert resp.status_code == 401
        assert _envelope(resp)["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    # Every key of the comma-separated list is accepted.
    for key in CLIENT_KEYS:
        resp = httpx.post(url + "/v1/chat/completions", json=BASE, headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200


@pytest.mark.e2e
def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nonexistent", messages=MESSAGES)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "`gpt-nonexistent`" in _message(caught.value)


@pytest.mark.e2e
def test_unknown_url_is_404_in_the_envelope(http: httpx.Client) -> None:
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert _envelope(resp)["code"] == "unknown_url"


@pytest.mark.e2e
def test_body_too_large_is_413(client: openai.OpenAI, http: httpx.Client) -> None:
    big = [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=big)
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is enforced while reading
        yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"y" * 4096
        yield b'"}]}'

    resp = http.post("/v1/chat/completions", content=chunks())
    assert resp.status_code == 413
    assert _envelope(resp)["code"] == "request_too_large"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
    ],
)
def test_upstream_4xx_passes_through_as_it_said(
    client: openai.OpenAI, stack: Stack, marker: str, status: int, error_class: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            metadata=fault(fail=status),
            user=marker,
        )
    assert caught.value.status_code == status
    assert _message(caught.value) == f"Injected failure ({status})."
    # The upstream's verdict on the request is final: asked once, neither retried nor sent elsewhere.
    assert len(stack.recorded(stack.primary, user=marker)) == 1


@pytest.mark.e2e
@pytest.mark.parametrize("status", [401, 403])
def test_an_upstream_refusing_the_gateways_key_is_a_502_not_the_clients_401(
    client: openai.OpenAI, stack: Stack, marker: str, status: int
) -> None:
    """The client's key was fine; the gateway's own upstream credentials were not. Passed through, the SDK raised
    AuthenticationError and blamed the client's key."""
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, metadata=fault(fail=status), user=marker)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
    assert "refused the gateway's credentials" in _message(caught.value)


@pytest.mark.e2e
def test_unreachable_upstream_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="dead-model", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert _message(caught.value).startswith("upstream dead is unreachable: ")


@pytest.mark.e2e
def test_timed_out_upstream_is_504_within_the_first_byte_deadline(client: openai.OpenAI) -> None:
    start = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="slow-model",
            messages=MESSAGES,
            metadata=fault(delay_ms=4000),
        )
    elapsed = time.perf_counter() - start
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert _message(caught.value) == f"upstream slow timed out: no response within {SLOW_FIRST_BYTE_S:g}s"
    assert SLOW_FIRST_BYTE_S <= elapsed < 3.5
