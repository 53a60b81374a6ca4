"""Settings (YAML + APPRENTICE_* env, validated, errors naming the key; secret references) and prices (bundled
map read offline, config overrides win, an unknown price is None and never 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gateway.pricing import Price, PriceBook
from gateway.settings import ConfigError, ModelPrice, PricingConfig, Settings, load_settings, resolve_secret

UPSTREAM = {"api_base": "http://127.0.0.1:9/v1", "models": ["gpt-4o-mini"]}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A developer's APPRENTICE_* variables must not change what these tests load.
    for name in list(os.environ):
        if name.startswith("APPRENTICE_"):
            monkeypatch.delenv(name)
    yield


def _write(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "apprentice.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    settings = load_settings(None)
    assert (settings.server.host, settings.server.port, settings.server.workers) == ("127.0.0.1", 8000, 1)
    assert settings.upstreams == {} and settings.tasks == {}
    assert settings.registry.path == Path(".apprentice/registry")


def test_task_calibration_and_student_settings_have_defaults_and_take_values(tmp_path: Path) -> None:
    # The rejections below would also come from an unknown key; these are read as the fields they name.
    task = {"teacher": "m", "labels": ["x", "y"]}
    default = load_settings(_write(tmp_path, {"tasks": {"t": task}})).tasks["t"]
    assert (default.agreement_confidence, default.ood_quantile, default.word_vectors) == (0.9, 0.99, True)
    assert default.decline_recall is None
    chosen = {**task, "agreement_confidence": 0.5, "ood_quantile": 0.95, "word_vectors": False, "decline_recall": 0.8}
    given = load_settings(_write(tmp_path, {"tasks": {"t": chosen}})).tasks["t"]
    assert (given.agreement_confidence, given.ood_quantile, given.word_vectors) == (0.5, 0.95, False)
    assert given.decline_recall == 0.8
    off = load_settings(_write(tmp_path, {"tasks": {"t": {**task, "decline_recall": None}}})).tasks["t"]
    assert off.decline_recall is None


def test_a_full_file_is_read(tmp_path: Path) -> None:
    config = {
        "server": {"port": 9100, "max_body_bytes": 2048},
        "upstreams": {
            "openai": {**UPSTREAM, "timeouts": {"first_byte_s": 12}, "retry": {"max_retries": 4}, "fallbacks": ["b"]},
            "b": {"api_base": "https://example.invalid/v1", "models": ["*"]},
        },
        "default_upstream": "b",
        "tasks": {"intent": {"teacher": "gpt-4o-mini", "labels": ["a", "b"]}},
    }
    settings = load_settings(_write(tmp_path, config))
    assert settings.server.port == 9100 and settings.server.max_body_bytes == 2048
    up = settings.upstreams["openai"]
    assert (up.timeouts.first_byte_s, up.retry.max_retries, up.fallbacks) == (12, 4, ["b"])
    assert settings.tasks["intent"].name == "intent"  # filled in from its key
    assert settings.upstream_models() == {"gpt-4o-mini"}


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"server": {"prot": 9000}}, ["server.prot", "Extra inputs are not permitted"]),
        ({"server": {"port": "abc"}}, ["server.port", "valid integer"]),
        ({"server": {"port": 70000}}, ["server.port"]),
        ({"server": {"workers": 0}}, ["server.workers"]),
        ({"bogus_section": 1}, ["bogus_section"]),
        ({"upstreams": {"a": {"api_base": "ftp://x"}}}, ["upstreams.a", "api_base must start with http"]),
        ({"upstreams": {"a": {"models": ["m"]}}}, ["upstreams.a", "api_base is required"]),
        ({"upstreams": {"a": {**UPSTREAM, "timeouts": {"first_byte_s": 0}}}}, ["upstreams.a.timeouts.first_byte_s"]),
        ({"upstreams": {"a": {**UPSTREAM, "retry": {"max_retries": -1}}}}, ["upstreams.a.retry.max_retries"]),
        ({"upstreams": {"a": {**UPSTREAM, "provider": "bedrock"}}}, ["upstreams.a.provider"]),
        ({"upstreams": {"a": {**UPSTREAM, "fallbacks": ["nope"]}}}, ["upstreams.a.fallbacks", "'nope'"]),
        ({"upstreams": {"a": {**UPSTREAM, "fallbacks": ["a"]}}}, ["upstreams.a.fallbacks", "itself"]),
        ({"upstreams": {"a": UPSTREAM}, "default_upstream": "z"}, ["default_upstream", "'z'"]),
        ({"tasks": {"t": {"teacher": "m", "labels": ["x", "x"]}}}, ["tasks.t.labels", "duplicate labels: x"]),
        ({"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "shadow_rate": 2}}}, ["tasks.t.shadow_rate"]),
        ({"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "ood_quantile": 0.3}}}, ["tasks.t.ood_quantile"]),
        ({"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "word_vectors": "maybe"}}}, ["tasks.t.word_vectors"]),
        ({"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "decline_recall": 1.0}}}, ["tasks.t.decline_recall"]),
        (
            {"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "agreement_confidence": 1.0}}},
            ["tasks.t.agreement_confidence"],
        ),
        (
            {"tasks": {"t": {"teacher": "m", "labels": ["x", "y"], "agreement_confidence": 0.3}}},
            ["tasks.t.agreement_confidence"],
        ),
        ({"tasks": {"t": {"labels": ["x", "y"]}}}, ["tasks.t.teacher", "Field required"]),
        (
            {"upstreams": {"a": UPSTREAM}, "tasks": {"gpt-4o-mini": {"teacher": "m", "labels": ["x", "y"]}}},
            ["tasks.gpt-4o-mini"],
        ),
        ({"log": {"batch_size": 0}}, ["log.batch_size"]),
    ],
)
def test_a_bad_config_fails_naming_the_key(tmp_path: Path, config: dict[str, object], names: list[str]) -> None:
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert str(path) in message
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("server: [", "is not valid YAML"), ("- 1\n- 2\n", "the top level must be a mapping")],
)
def test_a_file_that_is_not_a_yaml_mapping_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(_write(tmp_path, text))


def test_a_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 8000\n  port: 8001\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert f'in "{path}", line 3' in str(caught.value)
    assert "<unicode string>" not in str(caught.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "")).server.port == 8000


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"server": {"port": 8100, "host": "127.0.0.1"}, "log": {"url": "sqlite:///a.db"}})
    monkeypatch.setenv("APPRENTICE_SERVER__PORT", "9000")
    monkeypatch.setenv("APPRENTICE_LOG__URL", "postgresql+psycopg://u@db/log")
    settings = load_settings(path)
    assert settings.server.port == 9000
    assert settings.server.host == "127.0.0.1"  # the rest of the section still comes from the file
    assert settings.log.url == "postgresql+psycopg://u@db/log"
    # Keyword overrides (what the CLI passes) win over both.
    assert load_settings(path, server={"port": 9200}).server.port == 9200


def test_a_bad_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPRENTICE_SERVER__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(None)


# -- secret references ------------------------------------------------------------------------------------


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_SECRET", "from-env")
    secret_file = tmp_path / "key"
    secret_file.write_text("from-file\n", encoding="utf-8")
    assert resolve_secret("env:UNIT_SECRET", key="k") == "from-env"
    assert resolve_secret(f"file:{secret_file}", key="k") == "from-file"
    assert resolve_secret("sk-literal", key="k") == "sk-literal"


def test_an_unresolvable_secret_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIT_ABSENT", raising=False)
    with pytest.raises(ConfigError, match=r"upstreams\.a\.api_key: environment variable UNIT_ABSENT is not set"):
        resolve_secret("env:UNIT_ABSENT", key="upstreams.a.api_key")
    with pytest.raises(ConfigError, match=r"auth\.api_keys\[0\]: cannot read secret file"):
        resolve_secret(f"file:{tmp_path / 'absent'}", key="auth.api_keys[0]")


@pytest.mark.parametrize("listed", ["file", "blank", "commas"])
def test_a_listed_client_key_that_is_empty_is_refused_not_read_as_no_auth(tmp_path: Path, listed: str) -> None:
    """An empty secret file (or a blank key) once left api_keys empty, which on loopback means no auth at all."""
    empty = tmp_path / "empty-key"
    empty.write_text("  \n", encoding="utf-8")
    ref = {"file": f"file:{empty}", "blank": "", "commas": " , "}[listed]
    settings = load_settings(_write(tmp_path, {"auth": {"api_keys": ["sk-one", ref]}}))
    with pytest.raises(ConfigError, match=r"auth\.api_keys\[1\]"):
        settings.auth.resolved("api_keys")


def test_keys_resolve_from_references_and_stay_out_of_reprs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_CLIENT_KEYS", "sk-one, sk-two,")
    monkeypatch.setenv("UNIT_UPSTREAM_KEY", "sk-upstream")
    config = {
        "auth": {"api_keys": ["env:UNIT_CLIENT_KEYS", "sk-three"], "admin_keys": ["sk-admin"]},
        "upstreams": {"a": {**UPSTREAM, "api_key": "env:UNIT_UPSTREAM_KEY"}},
    }
    settings = load_settings(_write(tmp_path, config))
    assert settings.auth.resolved("api_keys") == {"sk-one", "sk-two", "sk-three"}
    assert settings.auth.resolved("admin_keys") == {"sk-admin"}
    assert settings.upstreams["a"].resolved_key("a") == "sk-upstream"
    shown = repr(settings) + str(settings.model_dump())
    assert "sk-three" not in shown and "sk-admin" not in shown


# -- prices -----------------------------------------------------------------------------------------------


def test_an_unknown_price_is_none_never_zero() -> None:
    book = PriceBook(PricingConfig(), bundled={})
    assert book.price("gpt-4o-mini") is None
    assert book.cost("gpt-4o-mini", 100, 10) is None


def test_the_bundled_price_map_is_read_offline() -> None:
    book = PriceBook(PricingConfig())
    price = book.price("gpt-4o-mini")
    assert price is not None and price.input_per_token > 0 and price.output_per_token > 0
    cost = book.cost("gpt-4o-mini", 1000, 100)
    assert cost == pytest.approx(1000 * price.input_per_token + 100 * price.output_per_token)
    assert book.cost("a-model-nobody-prices", 1000, 100) is None
    # A provider prefix the map does not know falls back to the bare model name.
    assert book.price("myproxy/gpt-4o-mini") == price


def test_a_config_price_wins_over_the_bundled_map() -> None:
    bundled = {"gpt-4o-mini": Price(1.0, 1.0)}
    config = PricingConfig(models={"gpt-4o-mini": ModelPrice(input_per_mtok=2, output_per_mtok=8)})
    book = PriceBook(config, bundled=bundled)
    assert book.cost("gpt-4o-mini", 1_000_000, 500_000) == pytest.approx(2 + 4)


def test_an_explicit_zero_price_is_known_and_an_alias_prices_as_its_target() -> None:
    config = PricingConfig(
        models={"local-llm": ModelPrice(input_per_mtok=0, output_per_mtok=0)},
        aliases={"reference-teacher": "gpt-4o"},
    )
    book = PriceBook(config, bundled={"gpt-4o": Price(2.5e-6, 1e-5)})
    assert book.cost("local-llm", 100, 100) == 0.0
    assert book.cost("reference-teacher", 1000, 100) == pytest.approx(1000 * 2.5e-6 + 100 * 1e-5)


def test_missing_usage_makes_the_cost_unknown() -> None:
    book = PriceBook(PricingConfig(), bundled={"m": Price(1.0, 1.0)})
    assert book.cost("m", None, 10) is None and book.cost("m", 10, None) is None


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: a second `tasks:` block would drop the first's tasks."""
    text = (
        "tasks:\n  intent: {teacher: m, labels: [x, y]}\nlog:\n  url: memory://\n"
        "tasks:\n  sentiment: {teacher: m, labels: [pos, neg]}\n"
    )
    with pytest.raises(ConfigError, match="the key 'tasks' is given twice"):
        load_settings(_write(tmp_path, text))
    nested = "upstreams:\n  a:\n    api_base: http://127.0.0.1:9/v1\n    api_base: http://127.0.0.1:10/v1\n"
    with pytest.raises(ConfigError, match="the key 'api_base' is given twice"):
        load_settings(_write(tmp_path, nested))
    with pytest.raises(ConfigError, match="is not valid YAML"):  # a list as a key: YAML's own refusal
        load_settings(_write(tmp_path, "tasks:\n  ? [a, b]\n  : {teacher: m, labels: [x, y]}\n"))


def test_merge_keys_still_share_a_block_between_tasks(tmp_path: Path) -> None:
    text = (
        "tasks:\n  intent: &base {teacher: m, labels: [x, y], shadow_rate: 0.1}\n"
        "  intent2:\n    <<: *base\n    labels: [a, b]\n"
    )
    tasks = load_settings(_write(tmp_path, text)).tasks
    assert (tasks["intent2"].teacher, tasks["intent2"].shadow_rate, tasks["intent2"].labels) == ("m", 0.1, ["a", "b"])


def test_a_postgres_url_without_the_sqlalchemy_scheme_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"log\.url: .*write postgresql://"):
        load_settings(_write(tmp_path, {"log": {"url": "postgres://u@127.0.0.1/db"}}))
    for url in ("postgresql://u@127.0.0.1/db", "postgresql+psycopg://u@h/db", "sqlite+pysqlite:///x.db"):
        assert load_settings(_write(tmp_path, {"log": {"url": url}})).log.url == url


def test_an_environment_override_that_cannot_reach_a_mixed_case_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Environment variable names are read without case: APPRENTICE_UPSTREAMS__TEACHER__API_BASE names
    `teacher`, so for a file's `Teacher` it would add a second upstream and change nothing."""
    config = {"upstreams": {"Teacher": {"api_base": "http://127.0.0.1:9/v1", "models": ["m"]}}}
    monkeypatch.setenv("APPRENTICE_UPSTREAMS__Teacher__API_BASE", "http://127.0.0.1:10/v1")
    with pytest.raises(ConfigError, match=r"upstreams\.Teacher: the environment variable .* names 'teacher'"):
        load_settings(_write(tmp_path, config))
    config = {"upstreams": {"teacher": {"api_base": "http://127.0.0.1:9/v1", "models": ["m"]}}}
    assert load_settings(_write(tmp_path, config)).upstreams["teacher"].api_base == "http://127.0.0.1:10/v1"


def test_serve_refuses_a_task_whose_teacher_no_upstream_serves(tmp_path: Path) -> None:
    from gateway.server import ServeArgs, build_settings

    def serve_settings(config: dict) -> Settings:  # what `apprentice serve --config` builds
        return build_settings(ServeArgs(config=str(_write(tmp_path, config))))

    task = {"teacher": "gpt-4o", "labels": ["a", "b"]}
    listed = {"upstreams": {"a": {**UPSTREAM, "models": ["gpt-4o-mini"]}}}
    with pytest.raises(ConfigError, match=r"tasks\.intent\.teacher: no upstream serves 'gpt-4o'.*gpt-4o-mini"):
        serve_settings({**listed, "tasks": {"intent": task}})
    # A task named as its teacher is a drop-in for that model: teacher calls never route back through tasks.
    wildcard = {"upstreams": {"a": {**UPSTREAM, "models": ["*"]}}}
    serve_settings({**wildcard, "tasks": {"gpt-4o": task}})
    # Served: listed, a wildcard upstream, or a default upstream.
    for upstreams, extra in [
        ({"a": {**UPSTREAM, "models": ["gpt-4o"]}}, {}),
        ({"a": {**UPSTREAM, "models": ["*"]}}, {}),
        ({"a": {**UPSTREAM, "models": ["gpt-4o-mini"]}}, {"default_upstream": "a"}),
    ]:
        serve_settings({"upstreams": upstreams, "tasks": {"intent": task}, **extra})


def test_a_config_that_is_not_utf8_or_an_env_list_that_is_not_json_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"server:\n  port: 8000\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml is not UTF-8 text"):
        load_settings(binary)
    monkeypatch.setenv("APPRENTICE_AUTH__API_KEYS", "k1,k2")
    with pytest.raises(ConfigError, match=r"must be JSON, e\.g\. APPRENTICE_AUTH__API_KEYS="):
        load_settings(_write(tmp_path, {}))
    monkeypatch.setenv("APPRENTICE_AUTH__API_KEYS", '["k1", "k2"]')
    assert load_settings(_write(tmp_path, {})).auth.resolved("api_keys") == {"k1", "k2"}


@pytest.mark.parametrize("name", ["..", "a/b", ".hidden", "a\\b"])
def test_a_task_name_that_would_leave_the_registry_directory_is_refused(tmp_path: Path, name: str) -> None:
    config = {"tasks": {name: {"teacher": "gpt-4o-mini", "labels": ["a", "b"]}}}
    with pytest.raises(ConfigError, match="a task name must not"):
        load_settings(_write(tmp_path, config))
    config = {"tasks": {"support-intent.v2": {"teacher": "gpt-4o-mini", "labels": ["a", "b"]}}}
    assert list(load_settings(_write(tmp_path, config)).tasks) == ["support-intent.v2"]


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"server": {"port": False}}, "server.port"),
        ({"server": {"workers": True}}, "server.workers"),
        ({"registry": {"poll_interval_s": float("inf")}}, "registry.poll_interval_s"),
        ({"log": {"flush_interval_s": float("nan")}}, "log.flush_interval_s"),
    ],
)
def test_yaml_booleans_and_infinities_are_not_numbers_here(tmp_path: Path, config: dict, where: str) -> None:
    """`port: false` bound any free port and `.inf` as a poll interval never picked up a new version."""
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")) as caught:
        load_settings(_write(tmp_path, config))
    value = next(iter(next(iter(config.values())).values()))
    if isinstance(value, float):  # refused as not finite, not by the field's bounds (NaN fails those too)
        assert "finite number" in str(caught.value)


def test_an_integer_from_the_environment_is_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPRENTICE_SERVER__PORT", "8123")
    assert load_settings(_write(tmp_path, {})).server.port == 8123


def test_an_environment_variable_that_sets_nothing_is_refused_with_the_spelling_that_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPRENTICE_LOG_URL (one underscore) was ignored without a word: the gateway logged to the default SQLite
    file instead of the database the operator meant."""
    monkeypatch.setenv("APPRENTICE_LOG_URL", "postgresql+psycopg://x@db/y")
    with pytest.raises(ConfigError, match=r"APPRENTICE_LOG_URL sets nothing.*APPRENTICE_LOG__URL"):
        load_settings(_write(tmp_path, {}))
    # Used by the config as a secret, the same kind of name is fine; so are names no setting starts with.
    monkeypatch.setenv("APPRENTICE_AUTH_KEYS", "sk-1")
    monkeypatch.delenv("APPRENTICE_LOG_URL")
    monkeypatch.setenv("APPRENTICE_BENCH_UPSTREAM_KEY", "sk-2")
    settings = load_settings(_write(tmp_path, {"auth": {"api_keys": ["env:APPRENTICE_AUTH_KEYS"]}}))
    assert settings.auth.resolved("api_keys") == {"sk-1"}
