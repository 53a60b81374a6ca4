"""`apprentice serve` through Typer's CliRunner: a bad config or flag exits with code 2 and a message naming
the key, before anything is bound; good flags reach the server with the settings they asked for.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gateway import server
from gateway.server import bind_socket  # the real one: the fixture below replaces server.bind_socket
from gateway.settings import ConfigError
from router_models.cli import app

runner = CliRunner()


class WouldServe(Exception):
    """Raised instead of binding: these tests must never start a server in the test process."""


@pytest.fixture(autouse=True)
def _never_bind(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    binds: list[tuple[str, int]] = []

    def refuse(host: str, port: int) -> socket.socket:
        binds.append((host, port))
        raise WouldServe(f"{host}:{port}")

    monkeypatch.setattr(server, "bind_socket", refuse)
    # serve() exports its arguments for the workers; keep that out of the test process afterwards.
    monkeypatch.setenv(server.ARGS_ENV, "{}")
    for name in list(os.environ):
        if name.startswith("APPRENTICE_") and name != server.ARGS_ENV:
            monkeypatch.delenv(name)
    yield binds


def _config(tmp_path: Path, config: object) -> str:
    path = tmp_path / "apprentice.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


UPSTREAMS = {"main": {"api_base": "http://127.0.0.1:9/v1", "models": ["gpt-4o-mini"]}}


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"server": {"prot": 9000}}, ["server.prot", "Extra inputs are not permitted"]),
        ({"server": {"port": "eighty"}}, ["server.port"]),
        ({"upstreams": {"main": {"api_base": "127.0.0.1:9"}}}, ["upstreams.main", "api_base must start with http"]),
        ({"upstreams": UPSTREAMS, "default_upstream": "other"}, ["default_upstream", "'other'"]),
        ({"auth": {"api_keys": ["env:CLI_TEST_UNSET_KEYS"]}}, ["auth.api_keys[0]", "CLI_TEST_UNSET_KEYS"]),
        (
            {"upstreams": {"main": {**UPSTREAMS["main"], "api_key": "env:CLI_TEST_UNSET_KEY"}}},
            ["upstreams.main.api_key", "CLI_TEST_UNSET_KEY"],
        ),
    ],
)
def test_a_bad_config_exits_2_naming_the_key(
    tmp_path: Path, config: dict[str, object], names: list[str], _never_bind: list[tuple[str, int]]
) -> None:
    result = runner.invoke(app, ["serve", "--config", _config(tmp_path, config)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ")
    for name in names:
        assert name in result.output
    assert _never_bind == []


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--config", "{tmp}/absent.yaml"], {}, ["does not exist"]),
        (["--config", "{tmp}/c.yaml", "--upstream", "http://127.0.0.1:9/v1"], {}, ["--upstream and --config"]),
        (["--upstream", "127.0.0.1:9"], {}, ["api_base must start with http"]),
        (["--upstream", "http://127.0.0.1:9/v1", "--client-key-env", "CLI_TEST_UNSET"], {}, ["--client-key-env"]),
        (
            ["--upstream", "http://127.0.0.1:9/v1", "--upstream-key-env", "CLI_TEST_UNSET"],
            {},
            ["upstreams.upstream.api_key", "CLI_TEST_UNSET"],
        ),
        (
            ["--upstream", "http://127.0.0.1:9/v1", "--host", "0.0.0.0"],
            {},
            ["server.host", "auth.api_keys", "--allow-unauthenticated"],
        ),
        (["--upstream", "http://127.0.0.1:9/v1"], {"APPRENTICE_SERVER__WORKERS": "0"}, ["server.workers"]),
        # Flags are validated like the file.
        (["--upstream", "http://127.0.0.1:9/v1", "--workers", "0"], {}, ["server.workers"]),
        (["--upstream", "http://127.0.0.1:9/v1", "--port", "70000"], {}, ["server.port"]),
    ],
)
def test_bad_flags_exit_2_naming_what_is_wrong(
    tmp_path: Path, args: list[str], env: dict[str, str], names: list[str], _never_bind: list[tuple[str, int]]
) -> None:
    (tmp_path / "c.yaml").write_text("{}", encoding="utf-8")
    result = runner.invoke(app, ["serve", *(a.format(tmp=tmp_path) for a in args)], env=env)
    assert result.exit_code == 2, result.output
    for name in names:
        assert name in result.output
    assert _never_bind == []


def test_flags_override_the_config(tmp_path: Path, _never_bind: list[tuple[str, int]]) -> None:
    path = _config(tmp_path, {"server": {"host": "127.0.0.1", "port": 8123}, "upstreams": UPSTREAMS})
    result = runner.invoke(app, ["serve", "--config", path, "--port", "0"])
    assert isinstance(result.exception, WouldServe), result.output
    assert _never_bind == [("127.0.0.1", 0)]


def test_a_public_address_is_served_with_keys_or_when_explicitly_allowed(
    _never_bind: list[tuple[str, int]],
) -> None:
    base = ["serve", "--upstream", "http://127.0.0.1:9/v1", "--host", "0.0.0.0", "--port", "0"]
    keyed = runner.invoke(app, [*base, "--client-key-env", "CLI_TEST_KEYS"], env={"CLI_TEST_KEYS": "sk-a,sk-b"})
    assert isinstance(keyed.exception, WouldServe), keyed.output
    allowed = runner.invoke(app, [*base, "--allow-unauthenticated"])
    assert isinstance(allowed.exception, WouldServe), allowed.output
    assert _never_bind == [("0.0.0.0", 0), ("0.0.0.0", 0)]


def test_serve_help_lists_its_options() -> None:
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--config", "--host", "--port", "--workers", "--upstream", "--upstream-key-env", "--client-key-env"):
        assert option in result.output


@pytest.mark.parametrize(
    ("host", "taken", "name"),
    [
        ("nosuchhost.invalid", False, "server.host"),
        ("192.0.2.1", False, "server.host"),
        ("127.0.0.1", True, "server.port"),
    ],
)
def test_a_socket_that_cannot_be_bound_names_the_setting_at_fault(host: str, taken: bool, name: str) -> None:
    """A name that does not resolve or an address not on this machine (192.0.2.1: TEST-NET-1) is the host's
    fault; a port in use is the port's."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1] if taken else 0
        with pytest.raises(ConfigError) as caught:
            bind_socket(host, port).close()
    assert str(caught.value).startswith(f"{name}: ")
