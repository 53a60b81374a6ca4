"""`apprentice serve`: builds and checks the settings, then runs the app on uvicorn (uvloop, httptools).

Workers are separate processes that rebuild the same settings from `APPRENTICE_SERVE_ARGS` (the CLI's
arguments, never secrets: keys are named by environment variable), so every worker validates them again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from gateway import OFFLINE_ENV
from gateway.settings import LOOPBACK_HOSTS, ConfigError, Settings, load_settings

ARGS_ENV = "APPRENTICE_SERVE_ARGS"


@dataclass(frozen=True)
class ServeArgs:
    config: str | None = None
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    upstream: str | None = None
    upstream_key_env: str | None = None
    client_key_env: str | None = None
    allow_unauthenticated: bool = False


def build_settings(args: ServeArgs) -> Settings:
    """The settings `apprentice serve` runs with; ConfigError names what is wrong."""
    overrides: dict[str, Any] = {}
    if args.upstream is not None:
        if args.config is not None:
            raise ConfigError("--upstream and --config cannot be combined: --upstream is the no-config mode")
        upstream: dict[str, Any] = {"api_base": args.upstream.rstrip("/"), "discover_models": True}
        if args.upstream_key_env:
            upstream["api_key"] = f"env:{args.upstream_key_env}"
        overrides["upstreams"] = {"upstream": upstream}
    if args.client_key_env:
        if not os.environ.get(args.client_key_env):
            raise ConfigError(f"--client-key-env: environment variable {args.client_key_env} is not set or empty")
        overrides["auth"] = {"api_keys": [f"env:{args.client_key_env}"]}
    flags = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "allow_unauthenticated": args.allow_unauthenticated or None,
    }
    # Passed through load_settings (merged into the file's `server` section) so flags are validated like the
    # file: `--workers 0` or `--port 70000` fail naming server.workers / server.port.
    overrides["server"] = {k: v for k, v in flags.items() if v is not None}
    settings = load_settings(Path(args.config) if args.config else None, **overrides)
    check_secrets(settings)
    check_bind(settings)
    check_teachers(settings)
    return settings


def check_teachers(settings: Settings) -> None:
    """Every task's teacher must be a model some upstream serves: otherwise each request of the task would get a
    404 naming a model its client never sent, while /readyz said ready. (Distill and the registry commands load
    the same file and need no upstreams, so this is checked where the gateway starts.)"""
    open_ended = settings.default_upstream is not None or any(
        "*" in up.models or up.discover_models for up in settings.upstreams.values()
    )
    served = settings.upstream_models()
    for name, task in settings.tasks.items():
        if not open_ended and task.teacher not in served:
            known = ", ".join(sorted(served)) or "none"
            raise ConfigError(
                f"tasks.{name}.teacher: no upstream serves {task.teacher!r} (models listed: {known}); add it to "
                "an upstream's models, or set default_upstream"
            )


def check_secrets(settings: Settings) -> None:
    """Reads every secret reference now: a missing one fails before binding, naming its key, and not as a
    traceback in each worker's start-up after the address was already announced."""
    for name, upstream in settings.upstreams.items():
        upstream.resolved_key(name)
    settings.auth.resolved("api_keys")
    settings.auth.resolved("admin_keys")


def check_bind(settings: Settings) -> None:
    """No client key and a non-loopback address: refuse, unless the operator said so explicitly."""
    host = settings.server.host
    if host in LOOPBACK_HOSTS or settings.server.allow_unauthenticated:
        return
    if not settings.auth.resolved("api_keys"):
        raise ConfigError(
            f"server.host: refusing to serve {host} without client keys (auth.api_keys or --client-key-env); "
            "pass --allow-unauthenticated to do it anyway"
        )


def app_factory() -> FastAPI:
    """What each uvicorn worker calls: the same settings the parent checked, then the app."""
    from gateway.app import create_app

    args = ServeArgs(**json.loads(os.environ.get(ARGS_ENV, "{}")))
    return create_app(build_settings(args))


def _prepare_multiprocess_metrics(workers: int) -> None:
    """Several workers need a shared metrics directory; one set by the operator is honoured even for one.

    Either way its metric files are removed at launch: files of a previous run would be summed into this one's
    counters. Only those, by prometheus_client's names: the directory may be shared, or set to /tmp by mistake,
    and an inference log is a `.db` file too.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for kind in ("counter", "gauge", "histogram", "summary"):
            for stale in Path(directory).glob(f"{kind}_*.db"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
    elif workers > 1:
        directory = tempfile.mkdtemp(prefix="apprentice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    else:
        return
    os.makedirs(directory, exist_ok=True)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # A name that does not resolve, or an address this machine does not have, is the host's fault.
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"server.host: cannot listen on {host}: {exc.strerror}") from exc
        raise ConfigError(f"server.port: cannot bind {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(args: ServeArgs, *, access_log: bool = False, log_level: str = "info") -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    settings = build_settings(args)  # fail fast, before any worker starts
    _prepare_multiprocess_metrics(settings.server.workers)
    os.environ[ARGS_ENV] = json.dumps(asdict(args))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream request at INFO: a log line per request is CPU the hot path does not need.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import uvicorn

    from gateway.http_protocol import GatewayHttpProtocol

    sock = bind_socket(settings.server.host, settings.server.port)
    host, port = sock.getsockname()[:2]
    # Port 0 asks the kernel for a free port; this line is how a caller learns which one it got.
    print(f"apprentice listening on http://{_url_host(host)}:{port}", flush=True)
    config = uvicorn.Config(
        "gateway.server:app_factory",
        factory=True,
        workers=settings.server.workers,
        loop="uvloop",
        http=GatewayHttpProtocol,
        access_log=access_log,
        log_level=log_level,
        timeout_graceful_shutdown=10,
    )
    # The bound socket object itself goes to uvicorn: `fd=` would rebuild it as AF_UNIX, and uvloop then never
    # sets TCP_NODELAY, so every response body waits ~40 ms for the client's delayed ACK.
    if settings.server.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
