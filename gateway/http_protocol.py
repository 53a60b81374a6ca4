"""uvicorn's httptools protocol, with its one non-ASGI answer in OpenAI's error envelope.

A request that does not parse as HTTP (a header name with a `;`, a bogus transfer-encoding, ...) never
reaches the app: uvicorn answers it itself with `400 Invalid HTTP request received.` as text/plain. Clients
of an OpenAI-compatible gateway expect every error as `{"error": {...}}` in JSON, so this answer is too.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import InvalidRequest


class GatewayHttpProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(InvalidRequest(f"{msg.rstrip('.')}: the request is not valid HTTP/1.1.").body()).encode()
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.transport.close()
