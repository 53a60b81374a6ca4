"""The `apprentice` command line: serving (gateway) and the offline flywheel (router_models).

The CLI lives on the offline side because it composes both halves; each command imports what it needs
when it runs, so `apprentice serve` never pays for scikit-learn and `apprentice distill` never for uvicorn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from gateway.settings import Settings

T = TypeVar("T")
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


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _os_error(exc: OSError) -> str:
    """One line for a file-system refusal (a read-only registry, a path that is a file, ...)."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _or_fail(call: Callable[[], T], refusal: type[Exception]) -> T:
    """`call()`, with its `refusal` (DistillError, RegistryError) and any OSError as one line and exit code 2."""
    try:
        return call()
    except refusal as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_error(exc))


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


def _settings(config: Path | None) -> Settings:
    from gateway.settings import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable") from exc


def _task(settings: Settings, task: str) -> None:
    if task not in settings.tasks:
        known = ", ".join(sorted(settings.tasks)) or "none (add tasks: to the config)"
        _fail(f"--task {task!r} is not a configured task; configured tasks: {known}")


@app.command()
def distill(
    task: Annotated[str, typer.Option(help="The task to distill (a key under tasks: in the config).")],
    config: ConfigOpt = None,
    since: Annotated[str | None, typer.Option(help="Only log records newer than this, e.g. 7d, 12h.")] = None,
    student: Annotated[str | None, typer.Option(help="tfidf or minilm (default: the task's student).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Train, calibrate and evaluate, but promote nothing.")] = False,
) -> None:
    """Log -> dataset -> train -> calibrate -> evaluate -> gate -> promote a new specialist version.

    Exit code 0 when a version was promoted or the gate kept the current one (the report says which)."""
    from gateway.durations import parse_duration
    from router_models.distill import DistillError, run_distill

    settings = _settings(config)
    _task(settings, task)
    if student is not None and student not in ("tfidf", "minilm"):
        _fail(f"--student must be tfidf or minilm, not {student!r}")
    try:
        since_s = parse_duration(since) if since else None
    except ValueError as exc:
        _fail(f"--since: {exc}")
    outcome = _or_fail(
        lambda: run_distill(settings, task, since_s=since_s, dry_run=dry_run, student=student), DistillError
    )
    verdict = "promoted" if outcome.promoted else "not promoted"
    typer.echo(f"{task}: {verdict} ({outcome.reason}); version {outcome.version}; report {outcome.report_dir}")


registry_app = typer.Typer(help="List, promote and roll back specialist versions.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("list")
def registry_list(
    task: Annotated[str, typer.Option(help="The task.")],
    config: ConfigOpt = None,
) -> None:
    """Versions of a task, oldest first; * marks the current one."""
    from router_models.registry import current_version, list_versions

    settings = _settings(config)
    _task(settings, task)
    try:
        versions = list_versions(settings.registry.path, task, include_unreadable=True)
        current = current_version(settings.registry.path, task)
    except OSError as exc:
        _fail(_os_error(exc))
    if not versions:
        typer.echo(f"{task}: no versions under {settings.registry.path / task}")
    for v in versions:
        mark = "*" if v.current else " "
        if v.problem is not None:
            typer.echo(f"{mark} {v.version}  unreadable manifest: {v.problem}")
            continue
        agreement = v.metrics.get("holdout_agreement_served")
        coverage = v.metrics.get("holdout_coverage")
        typer.echo(
            f"{mark} {v.version}  {v.student:7s} tau={v.tau:.4f}  "
            f"coverage={coverage}  agreement={agreement}  created={v.created_at}"
        )
    if current is not None and not any(v.current for v in versions):
        typer.echo(f"! current names {current!r}, which is not a version here: gateways refuse it")


def _gateway_check(settings: Settings, task: str) -> Callable[[Path], None]:
    """The gateway's own loader as the registry's version check: what it would refuse is never made current."""
    from gateway.specialist import Specialist, SpecialistLoadError
    from router_models.registry import RegistryError

    labels = list(settings.tasks[task].labels)

    def check(version_dir: Path) -> None:
        try:
            Specialist.load(version_dir, task=task, labels=labels)
        except SpecialistLoadError as exc:
            raise RegistryError(f"gateways would refuse version {version_dir.name}: {exc}") from exc

    return check


@registry_app.command("promote")
def registry_promote(
    task: Annotated[str, typer.Option(help="The task.")],
    version: Annotated[str, typer.Argument(help="The version to make current.")],
    config: ConfigOpt = None,
) -> None:
    """Point the task's `current` at VERSION (atomically); running gateways pick it up."""
    from router_models.registry import RegistryError, plain_version_name, promote

    settings = _settings(config)
    _task(settings, task)
    check = _gateway_check(settings, task)
    previous = _or_fail(lambda: promote(settings.registry.path, task, version, check=check), RegistryError)
    version = plain_version_name(version)  # what promote wrote (tab completion may have added a "/")
    if previous == version:
        typer.echo(f"{task}: {version} is already current; nothing changed")
        return
    typer.echo(f"{task}: current is now {version} (was {previous})")


@registry_app.command("prune")
def registry_prune(
    task: Annotated[str, typer.Option(help="The task.")],
    keep: Annotated[
        int | None,
        typer.Option(min=1, help="Versions to keep (default: registry.keep_versions in the config)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be deleted.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Delete old versions: all but the KEEP newest, the current one and the KEEP it can roll back to."""
    from router_models.registry import RegistryError, prune

    settings = _settings(config)
    _task(settings, task)
    keep = keep if keep is not None else settings.registry.keep_versions
    if keep is None:
        _fail("give --keep N, or set registry.keep_versions in the config")
    removed = _or_fail(lambda: prune(settings.registry.path, task, keep, dry_run=dry_run), RegistryError)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{task}: {verb} {len(removed)} version(s){': ' + ' '.join(removed) if removed else ''}")


@registry_app.command("rollback")
def registry_rollback(
    task: Annotated[str, typer.Option(help="The task.")],
    config: ConfigOpt = None,
) -> None:
    """Return the task's `current` to the version it replaced."""
    from router_models.registry import RegistryError, rollback

    settings = _settings(config)
    _task(settings, task)
    check = _gateway_check(settings, task)
    version = _or_fail(lambda: rollback(settings.registry.path, task, check=check), RegistryError)
    typer.echo(f"{task}: rolled back; current is now {version}")


log_app = typer.Typer(help="The inference log.", no_args_is_help=True)
app.add_typer(log_app, name="log")


@log_app.command("prune")
def log_prune(
    older_than: Annotated[str, typer.Option(help="Delete records older than this, e.g. 30d, 12h.")],
    config: ConfigOpt = None,
) -> None:
    """Delete inference-log records older than a duration."""
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.durations import parse_duration
    from gateway.logstore import prune_log
    from gateway.logstore_writer import brief

    settings = _settings(config)
    try:
        parse_duration(older_than)
    except ValueError as exc:
        _fail(f"--older-than: {exc}")
    try:
        removed = prune_log(settings.log.url, older_than)
    except (ValueError, OSError) as exc:
        _fail(f"log.url: {exc}")
    except SQLAlchemyError as exc:
        _fail(f"cannot prune the inference log: {brief(exc)}")
    typer.echo(f"removed {removed} records older than {older_than}")


@app.command("reference-teacher")
def reference_teacher(
    data: Annotated[Path, typer.Option(help="CLINC150 JSON or JSONL {text,label,split} dataset.")],
    port: Annotated[int, typer.Option(help="Port (0 = any free port; the READY line names it).")] = 0,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(min=0.0, help="Added latency per answer, like a remote LLM.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Which part of the train split the teacher learns from.")] = 0,
) -> None:
    """Serve the reference teacher: an offline OpenAI-compatible stand-in for a frontier LLM (not an LLM)."""
    from router_models.datasets import DatasetError
    from router_models.reference_teacher_server import serve_reference_teacher

    try:
        serve_reference_teacher(data, host, port, latency_ms, seed=seed)
    except (DatasetError, OSError) as exc:  # a missing dataset; the address in use, not this machine's, ...
        _fail(str(exc))


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="Dataset (default: CLINC150 from ../shared/data, else downloaded).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days of traffic, each followed by a distill.")] = 3,
    student: Annotated[str, typer.Option(help="tfidf or minilm.")] = "tfidf",
    workdir: Annotated[Path, typer.Option(help="Registry, log, configs and plot go here.")] = Path(".apprentice/demo"),
    serve: Annotated[bool, typer.Option(help="Keep serving the trained specialist until Ctrl-C.")] = True,
    traffic_limit: Annotated[int | None, typer.Option(min=1, help="Replay at most this many requests.")] = None,
    test_limit: Annotated[int | None, typer.Option(min=1, help="Test on at most this many requests.")] = None,
) -> None:
    """The whole flywheel offline: reference teacher, gateway, distill each day, then serve the specialist."""
    from router_models.datasets import DatasetError
    from router_models.demo import run_demo
    from router_models.flywheel import StepFailed, WorkdirError

    if student not in ("tfidf", "minilm"):
        _fail(f"--student must be tfidf or minilm, not {student!r}")
    try:
        run_demo(
            data=data, workdir=workdir, days=days, student=student, serve=serve,
            traffic_limit=traffic_limit, test_limit=test_limit,
        )  # fmt: skip
    except (DatasetError, WorkdirError, StepFailed) as exc:  # StepFailed: e.g. distill on too little traffic
        _fail(str(exc))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
