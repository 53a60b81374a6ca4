"""The FastAPI app: built by `create_app(settings)` (services made in the lifespan, never at import).

Routes only authenticate, read the body and map what the services return or raise to responses; every
error leaves through `error_response`, so clients always get OpenAI's envelope and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    ApiError,
    AuthenticationFailed,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    NotReady,
    PayloadTooLarge,
    PermissionDenied,
    error_response,
)
from gateway.inference_log import InferenceSink, MemorySink
from gateway.metrics import Metrics, forget_dead_workers, multiprocess_dir
from gateway.pricing import PriceBook
from gateway.protocol import parse_chat_request
from gateway.serving import Accounting, ModelTable, Passthrough, Timer
from gateway.settings import Settings
from gateway.tasks import TaskService
from gateway.upstream import TeacherClient

log = logging.getLogger("apprentice.app")
# How long a request for an unknown model waits for a model-discovery attempt it asked for, and how often
# requests may start one (a burst of them while the upstream is away must not become a burst of GET /models).
DISCOVERY_WAIT_S = 5.0
DISCOVERY_MIN_INTERVAL_S = 1.0


class Auth:
    """Bearer keys compared by digest. With no client keys configured every caller is a client."""

    def __init__(self, client_keys: frozenset[str], admin_keys: frozenset[str]) -> None:
        self._client = {self._digest(k) for k in client_keys}
        self._admin = {self._digest(k) for k in admin_keys}

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode()).digest()

    @staticmethod
    def _bearer(header: str | None) -> str | None:
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _matches(self, digest: bytes, keys: set[bytes]) -> bool:
        return any(hmac.compare_digest(digest, k) for k in keys)

    def client(self, header: str | None) -> bool:
        """Checks a client request; returns whether the caller holds an admin key (admins are clients too)."""
        token = self._bearer(header)
        digest = self._digest(token) if token else b""
        is_admin = bool(token) and self._matches(digest, self._admin)
        if self._client and not is_admin and not (token and self._matches(digest, self._client)):
            if token is None:
                raise AuthenticationFailed(
                    "You didn't provide an API key. Provide it in the Authorization header as 'Bearer KEY'."
                )
            raise AuthenticationFailed("Incorrect API key provided.")
        return is_admin

    def admin(self, header: str | None) -> None:
        if not self._admin:
            raise PermissionDenied("The admin API is disabled: configure auth.admin_keys to enable it.")
        token = self._bearer(header)
        if token is None:
            raise AuthenticationFailed("The admin API needs an admin key as 'Authorization: Bearer KEY'.")
        if not self._matches(self._digest(token), self._admin):
            raise AuthenticationFailed("Incorrect admin key provided.")


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    auth: Auth
    teacher: TeacherClient
    models: ModelTable
    passthrough: Passthrough
    tasks: TaskService
    sink: InferenceSink
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    # Model discovery (`discover_models` upstreams): a request for an unknown model while some upstream has
    # not listed its models yet sets `discovery_wanted` (the next attempt starts without waiting out its
    # back-off, but at most one every DISCOVERY_MIN_INTERVAL_S) and waits for `discovery_next`, the event of
    # the next attempt to start, set when that attempt has finished.
    discovery_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    discovery_next: asyncio.Event = field(default_factory=asyncio.Event)
    discovered: set[str] = field(default_factory=set)

    async def upstream_for(self, model: str) -> str:
        """The upstream serving `model`; while models are still being discovered, asks again before a 404."""
        try:
            return self.models.upstream_for(model)
        except ModelNotFound:
            if self.ready:
                raise
        round_done = self.discovery_next  # an attempt already under way may have started before we arrived
        self.discovery_wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCOVERY_WAIT_S):
                await round_done.wait()
        try:
            return self.models.upstream_for(model)
        except ModelNotFound:
            if self.ready:
                raise
        raise NotReady(
            f"The model list of upstream(s) {', '.join(self.discovering)} is not known yet (the upstream did not "
            "answer GET /models); this gateway cannot route the model yet. Retry shortly; /readyz says when."
        ) from None

    @property
    def ready(self) -> bool:
        """Every `discover_models` upstream has listed its models (the only readiness the core has)."""
        return not self.discovering

    @property
    def discovering(self) -> list[str]:
        return [n for n, up in self.settings.upstreams.items() if up.discover_models and n not in self.discovered]


async def _services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


HOT_PATH = "/v1/chat/completions"


class GatewayApp(FastAPI):
    """FastAPI, except that POST /v1/chat/completions skips its middleware stack.

    FastAPI wraps every request in six ASGI layers (server-error, exception and exit-stack middleware, body
    limit, telemetry, router); on the pass-through path they were about 15% of the gateway's Python time per
    request. The hot handler needs none of them: it reads its own body under its own limit and every error
    it raises is an ApiError. So `__call__` hands that one route straight to the handler, with the same
    error mapping the app's exception handlers give (and a logged 500 envelope for anything unexpected).
    The route is also registered on the router, so it is listed and other methods on it get 405 as before.
    Middleware added with `add_middleware` does not see this route, nor does FastAPI's own OpenTelemetry
    instrumentation: traces show the other routes only. Under a `root_path` the route takes the router.
    """

    hot_handler: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == HOT_PATH and scope["method"] == "POST" and self.hot_handler:
            scope["app"] = self
            request = Request(scope, receive)
            try:
                response = await self.hot_handler(request)
            except ClientDisconnect:
                return  # the client went away while sending its body: nobody to answer
            except ApiError as exc:
                response = error_response(exc)
            except Exception:
                log.exception("unexpected error serving %s", HOT_PATH)
                response = error_response(ApiError("The server had an error while processing your request."))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    *,
    transport: Any = None,
    sink: InferenceSink | None = None,
) -> GatewayApp:
    """The gateway app. `transport` (an httpx transport) and `sink` let tests replace the network and store."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = _build_services(settings, transport, sink)
        app.state.services = services
        directory = multiprocess_dir()
        if services.metrics.multiprocess and directory is not None:
            forgotten = forget_dead_workers(directory)
            if forgotten:
                log.warning("metrics: forgot the live gauges of workers that died: pids %s", forgotten)
        await services.sink.start()
        await services.tasks.start()
        services.background.append(asyncio.create_task(_discover_models(services)))
        try:
            yield
        finally:
            for task in services.background:
                task.cancel()
            await asyncio.gather(*services.background, return_exceptions=True)
            await services.tasks.aclose()
            await services.sink.aclose()
            await services.teacher.aclose()
            if services.metrics.multiprocess:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    app = GatewayApp(
        title="apprentice",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    _add_error_handlers(app)
    _add_routes(app, settings)
    return app


def _build_services(settings: Settings, transport: Any, sink: InferenceSink | None) -> Services:
    metrics = Metrics()
    auth = Auth(settings.auth.resolved("api_keys"), settings.auth.resolved("admin_keys"))
    teacher = TeacherClient(settings, metrics, transport=transport)
    prices = PriceBook(settings.pricing)
    accounting = Accounting(metrics, prices)
    if sink is None:
        sink = _make_sink(settings, metrics) if settings.tasks else MemorySink()
    models = ModelTable(settings)
    tasks = TaskService(settings, teacher, accounting, sink, models)
    return Services(
        settings=settings,
        metrics=metrics,
        auth=auth,
        teacher=teacher,
        models=models,
        passthrough=Passthrough(teacher, accounting),
        tasks=tasks,
        sink=sink,
    )


def _make_sink(settings: Settings, metrics: Metrics) -> InferenceSink:
    from gateway.logstore import create_sink
    from gateway.logstore_writer import LogWriter

    sink = create_sink(settings.log)
    if isinstance(sink, LogWriter):
        # Called from the event loop and from writer threads; prometheus counters are thread-safe.
        sink.on_count = lambda outcome, n: metrics.log_records.labels(outcome=outcome).inc(n)
        sink.on_depth = metrics.log_queue_depth.set
    return sink


async def _discover_models(services: Services) -> None:
    """Adds the models that `discover_models` upstreams list; retries until each has answered once.

    Attempts back off from 0.5 s to 10 s, but a request for an unknown model starts the next one without
    waiting out the back-off (no sooner than DISCOVERY_MIN_INTERVAL_S after the last; Services.upstream_for):
    with several workers each lists the models itself, and a worker that starts while the upstream is briefly
    away must not answer 404 for up to 10 s after it is back."""
    loop = asyncio.get_running_loop()
    delay = 0.5
    while True:
        started = loop.time()
        services.discovery_wanted.clear()  # requests from now on want the attempt after this one
        this_round, services.discovery_next = services.discovery_next, asyncio.Event()
        for name in services.discovering:
            try:
                models = await services.teacher.list_models(name)
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"; logged and retried
                log.warning("cannot list models of upstream %s yet: %r", name, exc)
                continue
            services.models.add(name, models)
            services.discovered.add(name)
            log.info("upstream %s serves %d models", name, len(models))
        this_round.set()
        if services.ready:
            services.discovery_next.set()  # nobody waits for an attempt that will never come
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await services.discovery_wanted.wait()
        delay = min(delay * 2, 10.0)
        await asyncio.sleep(max(0.0, started + DISCOVERY_MIN_INTERVAL_S - loop.time()))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(InvalidRequest(str(first.get("msg", "invalid request")), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err: ApiError = NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
            err.code = "unknown_url"
        else:
            err = ApiError(str(exc.detail), status=exc.status_code, type="invalid_request_error")
        return error_response(err)


def _model_card(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def _add_routes(app: GatewayApp, settings: Settings) -> None:
    limit = settings.server.max_body_bytes

    async def chat_completions(request: Request) -> Response:
        services: Services = request.app.state.services
        timer = Timer(time.perf_counter())
        is_admin = services.auth.client(request.headers.get("authorization"))
        body = await read_body(request, limit)
        raw, parsed = parse_chat_request(body)
        task = services.settings.tasks.get(parsed.model)
        if task is not None:
            force = request.headers.get("x-apprentice-force-route")
            return await services.tasks.handle(task, raw, parsed, timer, force=force, is_admin=is_admin)
        upstream = await services.upstream_for(parsed.model)
        return await services.passthrough.handle(upstream, raw, parsed, timer, body)

    # The hot path is a plain handler that GatewayApp calls directly: FastAPI's dependency solving, endpoint
    # wrapping and middleware cost CPU on every request and give it nothing.
    app.hot_handler = chat_completions
    app.router.add_route(HOT_PATH, chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def list_models(request: Request, services: ServicesDep) -> JSONResponse:
        services.auth.client(request.headers.get("authorization"))
        cards = [_model_card(name, "apprentice") for name in services.settings.tasks]
        cards += [_model_card(m, services.models.upstream_for(m)) for m in services.models.models()]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request, services: ServicesDep) -> JSONResponse:
        services.auth.client(request.headers.get("authorization"))
        if model_id in services.settings.tasks:
            return JSONResponse(_model_card(model_id, "apprentice"))
        if model_id in services.models.models():
            return JSONResponse(_model_card(model_id, services.models.upstream_for(model_id)))
        raise ModelNotFound(model_id)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(services: ServicesDep) -> JSONResponse:
        checks = {"upstream_models": services.ready, **services.tasks.readiness()}
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics(services: ServicesDep) -> Response:
        services.tasks.export_gauges()
        depth = getattr(services.sink, "queue_depth", None)
        if isinstance(depth, int):
            services.metrics.log_queue_depth.set(depth)
        return Response(services.metrics.render(), media_type=services.metrics.content_type)

    @app.get("/admin/tasks")
    async def admin_tasks(request: Request, services: ServicesDep) -> JSONResponse:
        services.auth.admin(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": services.tasks.describe()})

    @app.post("/admin/tasks/{task}/reload")
    async def admin_reload(task: str, request: Request, services: ServicesDep) -> JSONResponse:
        services.auth.admin(request.headers.get("authorization"))
        if task not in services.settings.tasks:
            raise NotFound(f"No task named {task!r} is configured.", param="task")
        return JSONResponse(await services.tasks.reload(task))
