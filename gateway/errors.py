"""Every error a client can see, and the one function that turns them into OpenAI's envelope.

    ApiError                      status, type, code, param: what the client gets
    ├── InvalidRequest            400 invalid_request_error (malformed JSON, schema violations; param = field)
    ├── AuthenticationFailed      401 invalid_api_key
    ├── PermissionDenied          403 (admin endpoints with a client key)
    ├── NotFound / ModelNotFound  404 (model_not_found for unknown models)
    ├── PayloadTooLarge           413
    ├── UpstreamStatusError       the upstream's own 4xx/429 as it said it; 502 for its 401/403 and its 5xx
    ├── UpstreamUnavailable       502 (connection refused, reset, a stream cut short)
    ├── UpstreamBadAnswer         502 (a 200 that is not a chat completion, on a task's path)
    └── UpstreamTimeout           504 (connect, first byte or total deadline)

The body is always `{"error": {"message", "type", "param", "code"}}`; `code` is a string or null, never an int.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


class ApiError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ApiError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class NotReady(ApiError):
    """The gateway cannot route the request yet (the upstream's model list is not known)."""

    status = 503
    type = "server_error"
    code = "not_ready"


class UpstreamError(ApiError):
    """Base of everything that went wrong on the teacher side; `upstream` names the last one tried."""

    upstream: str = ""


# An upstream's 401 / 403 is about the gateway's own credentials or account, not the client's request: passed
# through, the client's SDK would raise AuthenticationError and blame the client's key.
UPSTREAM_AUTH_STATUS = frozenset({401, 403})


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status. 4xx pass through as the upstream said them, except 401 / 403
    (the gateway's credentials): those, like 5xx after retries, are a 502."""

    def __init__(self, upstream: str, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        detail = _upstream_error_fields(body)
        message = detail.get("message") or body[:500].decode("utf-8", "replace") or f"HTTP {status}"
        auth = status in UPSTREAM_AUTH_STATUS
        passthrough = 400 <= status < 500 and not auth
        if auth:
            message = f"upstream {upstream} refused the gateway's credentials (HTTP {status}): {message}"
        elif not passthrough:
            message = f"upstream {upstream} failed with HTTP {status}: {message}"
        super().__init__(
            message,
            param=detail.get("param") if passthrough else None,
            code=detail.get("code") if passthrough else "upstream_auth_failed" if auth else "upstream_error",
            status=status if passthrough else 502,
            type=(detail.get("type") or "invalid_request_error") if passthrough else "upstream_error",
            headers=headers,
        )
        self.upstream = upstream
        self.upstream_status = status


class _UpstreamFailure(UpstreamError):
    """An upstream failure the gateway describes itself: "upstream NAME <failure>: <detail>"."""

    type = "upstream_error"
    failure = ""

    def __init__(self, upstream: str, detail: str) -> None:
        super().__init__(f"upstream {upstream} {self.failure}: {detail}")
        self.upstream = upstream


class UpstreamUnavailable(_UpstreamFailure):
    status = 502
    code = "upstream_unavailable"
    failure = "is unreachable"


class UpstreamBadAnswer(_UpstreamFailure):
    """The upstream said 200 but sent something that is not a chat completion (an HTML error page, a list)."""

    status = 502
    code = "upstream_bad_response"
    failure = "answered with something that is not a chat completion"


class UpstreamTimeout(_UpstreamFailure):
    status = 504
    code = "upstream_timeout"
    failure = "timed out"


def _upstream_error_fields(body: bytes) -> dict[str, str | None]:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(err, dict):
        return {"message": str(err)} if err else {}
    out: dict[str, str | None] = {}
    for key in ("message", "type", "param", "code"):
        value = err.get(key)
        out[key] = None if value is None else str(value)
    return out


def error_response(exc: ApiError) -> Response:
    return Response(
        content=json.dumps(exc.body()),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


def sse_error_event(exc: ApiError) -> bytes:
    """The event that ends a stream which broke after it had started: never a silent truncation."""
    # The leading blank line ends an event the upstream left unterminated (its `data:` line would otherwise
    # merge with this one into unparseable JSON); after a complete event it is an empty line SSE ignores.
    return b"\ndata: " + json.dumps(exc.body()).encode() + b"\n\n"
