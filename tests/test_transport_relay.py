"""AiohttpTransport.relay, the non-streaming path every OpenAI-compatible upstream call takes in production,
against a real aiohttp server on 127.0.0.1: content encodings, error answers, headers and cookies.
(The unit tests of the teacher client inject httpx.MockTransport, which takes the httpx path instead.)"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from yarl import URL

from gateway.transport import AiohttpTransport, client_timeout

ANSWER = {"id": "c1", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3}}
BODY = json.dumps(ANSWER).encode()
TIMEOUT = client_timeout(connect_s=2.0, read_s=2.0, pool_s=2.0)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


async def _answer(request: web.Request) -> web.Response:
    seen.append(dict(request.headers))
    kind = request.match_info["kind"]
    if kind == "gzip":
        return web.Response(body=gzip.compress(BODY), headers={"content-encoding": "gzip"})
    if kind == "deflate":
        return web.Response(body=zlib.compress(BODY), headers={"content-encoding": "deflate"})
    if kind == "raw-deflate":
        return web.Response(body=_raw_deflate(BODY), headers={"content-encoding": "deflate"})
    if kind == "br":
        return web.Response(body=b"\x0b\x02\x80", headers={"content-encoding": "br"})
    if kind == "bad-gzip":
        return web.Response(body=b"not gzip", headers={"content-encoding": "gzip"})
    if kind == "429-empty-gzip":
        return web.Response(status=429, headers={"content-encoding": "gzip", "retry-after": "7"})
    if kind == "cookie":
        return web.Response(body=BODY, headers={"set-cookie": "__cf_bm=abc; Path=/"})
    return web.Response(body=BODY)


seen: list[dict[str, str]] = []


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{kind}", _answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    seen.clear()
    try:
        # A host name, not an IP: cookie jars refuse cookies from bare addresses.
        yield f"http://localhost:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    t = AiohttpTransport()
    try:
        yield t
    finally:
        await t.aclose()


async def _relay(transport: AiohttpTransport, server: str, kind: str) -> tuple[int, dict[str, str], bytes]:
    reply = await transport.relay(URL(f"{server}/{kind}"), {"user-agent": "apprentice/test"}, b"{}", TIMEOUT)
    return reply.status, dict(reply.headers), reply.content


@pytest.mark.parametrize("kind", ["plain", "gzip", "deflate", "raw-deflate"])
async def test_answers_arrive_decoded_whatever_the_server_compressed(
    server: str, transport: AiohttpTransport, kind: str
) -> None:
    status, _, content = await _relay(transport, server, kind)
    assert (status, json.loads(content)) == (200, ANSWER)


@pytest.mark.parametrize("kind", ["br", "bad-gzip"])
async def test_an_answer_that_cannot_be_decoded_is_a_clear_transport_error(
    server: str, transport: AiohttpTransport, kind: str
) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match=r"content-encoding 'br'|does not decode"):
        await _relay(transport, server, kind)


async def test_an_error_answer_keeps_its_status_and_retry_after_even_with_an_empty_encoded_body(
    server: str, transport: AiohttpTransport
) -> None:
    status, headers, content = await _relay(transport, server, "429-empty-gzip")
    assert (status, headers.get("Retry-After"), content) == (429, "7", b"")


async def test_requests_carry_our_headers_and_never_a_cookie_from_an_earlier_answer(
    server: str, transport: AiohttpTransport
) -> None:
    await _relay(transport, server, "cookie")
    await _relay(transport, server, "plain")
    assert [h.get("Cookie") for h in seen] == [None, None]
    assert seen[1]["User-Agent"] == "apprentice/test"
