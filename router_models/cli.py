"""The `apprentice` command line: serving (gateway) and the offline flywheel (router_models).

The CLI lives on the offline side because it composes both halves; each command imports what it needs
when it runs, so `apprentice serve` never pays for scikit-learn and `apprentice distill` never for uvicorn.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="apprentice",
    help="A cost/quality model-routing gateway: a distilled specialist answers what it can, the teacher the rest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.", exists=False)]


@app.callback()
def _root() -> None:
    """apprentice: an OpenAI-compatible gateway that distills narrow tasks into a cheap specialist."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes.")] = None,
    upstream: Annotated[
        str | None, typer.Option(help="No config: pass every model this OpenAI-compatible base URL lists.")
    ] = None,
    upstream_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the upstream's API key.")
    ] = None,
    client_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding client keys, comma-separated.")
    ] = None,
    allow_unauthenticated: Annotated[
        bool, typer.Option(help="Serve a non-loopback address without client keys.")
    ] = False,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs CPU).")] = False,
) -> None:
    """Run the OpenAI-compatible gateway."""
    from gateway.server import ServeArgs
    from gateway.server import serve as run_server
    from gateway.settings import ConfigError

    args = ServeArgs(
        config=str(config) if config else None,
        host=host,
        port=port,
        workers=workers,
        upstream=upstream,
        upstream_key_env=upstream_key_env,
        client_key_env=client_key_env,
        allow_unauthenticated=allow_unauthenticated,
    )
    try:
        run_server(args, access_log=access_log)
    except ConfigError as exc:
        _fail(str(exc))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
