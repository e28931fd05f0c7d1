"""Configuration for the pipeline commands: flags over environment over an optional YAML file.
Importable without torch (``linewatch --help`` reads its defaults).

Environment variables are ``LINEWATCH_<FIELD>``, nested with ``__``, e.g.
``LINEWATCH_BOOTSTRAP_SERVERS=kafka:9092``, ``LINEWATCH_WORKER__MAX_BATCH=16``,
``LINEWATCH_PROFILE__METHOD=winclip``. The YAML file has the same shape as the fields below;
``streams`` maps stream-id globs to per-stream overrides of ``profile`` (scoring) and
``alerts.streams`` to overrides of ``alerts.policy``. See deploy/linewatch.example.yaml.
A ``LINEWATCH_*`` variable that names no setting is refused like an unknown YAML key, except
the few linewatch reads elsewhere (``NOT_SETTINGS``). Every secret the settings hold is
registered with the redactor once they load (``register_secrets``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from ..bus import MAX_MESSAGE_BYTES
from ..bus.jpeg import DEFAULT_MAX_PIXELS
from ..bus.redact import register_secret, register_url_secrets
from ..sinks.channels import base as channel_base
from ..sinks.channels.base import DeliveryPolicy
from ..sinks.channels.registry import bundled
from ..sinks.events import AlertPolicy
from ..workers.profiles import StreamProfile


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneSettings(_Section):
    arch: str = "ViT-B-16"
    weights: str = "none"  # 'none' (seeded random), an open_clip pretrained tag, or a local file
    image_size: int | None = Field(default=None, gt=0)
    layers: tuple[int, ...] | None = None
    vv_attention: bool = False
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu


class IngestSettings(_Section):
    fps: float | None = Field(default=None, gt=0)  # frames per second to keep, by timestamp; None: all
    max_size: int | None = Field(default=1280, gt=0)  # long side in px; larger frames are downscaled
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    realtime: bool = False  # pace files at recorded speed instead of as fast as possible


class WorkerSettings(_Section):
    # Defaults picked by `linewatch bench` for the default method, aprilgan, on ViT-B-16 at
    # 224 px on a 2-core CPU (docs/benchmarks.md): batch 16 in bf16 gave the most frames/s,
    # and a batch waits for company at most 10 % of that batch's scoring time.
    max_batch: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(default=70.0, ge=0)
    # Image-tower precision: auto = bf16 on a GPU (fp16 where it lacks bf16) and on a CPU with
    # native bf16 (AVX512-BF16/AMX), else fp32 (scoring/precision.py).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the image tower's blocks (the first batch waits for it)
    prompts: str | None = None  # prompt pack YAML; default: the bundled pack
    # how often a worker looks for changed reference and calibration folders (the console's
    # review adds frames there) and re-prepares the profile; 0: before every batch
    reload_s: float = Field(default=5.0, ge=0)


class OpsSettings(_Section):
    """The operations endpoint and logs of the long-running commands (docs/operations.md)."""
    host: str = "127.0.0.1"  # where /metrics, /healthz and /readyz listen; 0.0.0.0 in a container
    port: int | None = Field(default=9400, ge=0, le=65535)  # None: no endpoint; 0: any free port (logged)
    heartbeat_s: float = Field(default=120.0, gt=0)  # /healthz fails when a loop has not beaten for this long
    summary_s: float = Field(default=30.0, ge=0)  # the worker logs a one-line summary this often; 0: never
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class KafkaSettings(_Section):
    """Security and topic durability for Kafka (docs/deployment.md, Security). The SASL password
    comes from LINEWATCH_KAFKA__SASL_PASSWORD or a file (a mounted Secret), never from a flag."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None  # CA bundle to trust (default: the system's)
    ssl_certfile: str | None = None  # client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    # for the topics linewatch creates: -1 takes the broker's default.replication.factor
    replication_factor: int = -1
    min_insync_replicas: int | None = Field(default=None, ge=1)  # None: the broker's default


class RedisSettings(_Section):
    """TLS and password for the anchor cache's Redis. The password may sit in ``redis_url``
    (``rediss://:PASSWORD@host:6380/0``; keep that URL in a Secret) or come from
    LINEWATCH_REDIS__PASSWORD or ``password_file``."""
    password: SecretStr | None = None
    password_file: str | None = None
    ssl_ca_file: str | None = None  # CA bundle to trust for rediss:// (default: the system's)
    ssl_certfile: str | None = None  # client certificate, when the server checks clients
    ssl_keyfile: str | None = None


class DeliveryOverrides(_Section):
    """One kind of channel's overrides of ``alerts.delivery`` (``DeliveryPolicy``'s fields)."""
    timeout_s: float | None = Field(None, gt=0)
    attempts: int | None = Field(None, ge=0)
    max_age_s: float | None = Field(None, ge=0)
    backoff_s: float | None = Field(None, ge=0)
    max_backoff_s: float | None = Field(None, ge=0)


class AlertBase(_Section):
    """``alerts``: the debounce policy, delivery, packages' channels; ``AlertSettings`` adds the
    bundled channels' settings."""
    policy: AlertPolicy = AlertPolicy()
    streams: dict[str, dict[str, Any]] = {}
    # every channel's attempts, timeout, backoff and maximum age (per kind of channel: ``channels``)
    delivery: DeliveryPolicy = DeliveryPolicy()
    # channels from other packages (entry point group linewatch.alert_channels), by name: each one's
    # settings, validated by the channel (docs/alerts.md, "Channels from other packages")
    plugins: dict[str, dict[str, Any]] = {}


def alert_settings() -> type[AlertBase]:
    """``AlertBase`` with each bundled channel's settings fields (``alerts.jsonl``, ``alerts.webhook``,
    ``alerts.mqtt``, ..., from ``sinks.channels.registry``) and ``channels``: per kind of channel
    (jsonl, webhook, mqtt, apprise), overrides of ``delivery``, e.g. {webhook: {attempts: 20}}."""
    channels = bundled()
    models = [cls.Settings for cls in channels.values() if cls.Settings is not None]
    fields = [name for model in models for name in model.model_fields]
    clashes = {name for name in fields if fields.count(name) > 1} | (set(fields) & set(AlertBase.model_fields))
    if clashes:
        raise TypeError(f"alert channels' settings: more than one defines {sorted(clashes)}")
    kinds = Literal[tuple(name for name, cls in channels.items() if cls.consumer)]
    # pydantic lists the fields of the last base first: AlertBase's, then the channels' by name
    return create_model("AlertSettings", __base__=(*reversed(models), AlertBase), __module__=__name__,
                        channels=(dict[kinds, DeliveryOverrides], {}))


AlertSettings = alert_settings()


class ConsoleSettings(_Section):
    """``linewatch console`` and ``linewatch run --console`` (docs/console.md)."""
    host: str = "127.0.0.1"  # anything but loopback requires the token
    port: int = Field(default=8400, ge=0, le=65535)  # 0: any free port (logged)
    token: SecretStr | None = None  # LINEWATCH_CONSOLE__TOKEN, or token_file; never a flag
    token_file: str | None = None
    # map tiles ({z}/{x}/{y}); "" or none: a plain background (also when tiles do not load)
    tile_url: str | None = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    tile_attribution: str = "&copy; OpenStreetMap contributors"
    history_s: float = Field(default=600.0, gt=0)  # the live timelines' span (capture time)
    # SQLite of events, reviews and flight tracks. Default: the archive's index.sqlite for a
    # folder archive; ~/.cache/linewatch/console.sqlite for S3 (reviews are also kept in the bucket)
    index: str | None = None
    feedback_frames: int = Field(default=16, ge=1)  # most frames one action adds to a profile's folder


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LINEWATCH_", env_nested_delimiter="__", extra="forbid")

    bootstrap_servers: str | None = None  # None: the in-process bus (embedded run only)
    redis_url: str | None = None  # None: no shared anchor cache; rediss:// for TLS
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
    ops: OpsSettings = OpsSettings()
    anchor_dir: str | None = "~/.cache/linewatch/anchors"  # text anchors kept across runs; None: off
    # reference memories and thresholds kept across runs (workers.prepared_cache); None: under
    # $XDG_CACHE_HOME/linewatch (else ~/.cache/linewatch); "off": none
    prepared_dir: str | None = None
    topic_prefix: str = Field(default="linewatch", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(default=4, ge=1)
    backbone: BackboneSettings = BackboneSettings()
    ingest: IngestSettings = IngestSettings()
    worker: WorkerSettings = WorkerSettings()
    profile: StreamProfile = StreamProfile()
    streams: dict[str, dict[str, Any]] = {}
    alerts: AlertSettings = AlertSettings()
    archive: str | None = None  # folder or s3://bucket/prefix
    # the largest frame (width x height) a part decodes: ingest scales larger ones down, the
    # worker and the archive dead-letter them (read from the JPEG header, before decoding)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    # the largest record sent (the topics linewatch creates allow it); a score whose frame
    # does not fit carries it re-encoded smaller. Set it to your broker's limit if lower.
    max_message_bytes: int = Field(default=MAX_MESSAGE_BYTES, ge=64 * 1024)
    console: ConsoleSettings = ConsoleSettings()


ENV_PREFIX = "LINEWATCH_"
# LINEWATCH_* variables that are not settings, read by linewatch elsewhere: never refused
NOT_SETTINGS = {
    "LINEWATCH_SHARED": "the shared datasets folder (tests, demo --context-set)",
    "LINEWATCH_WEIGHTS": "scripts/gpu_bench.sh's weights file",
    "LINEWATCH_QUICKSTART": "tests/test_quickstart.py: quick or full (docs/getting-started.md)",
    "LINEWATCH_IMAGE": "deploy/compose.yaml: the image",
    "LINEWATCH_CONFIG": "deploy/compose.yaml: the settings file mounted",
    "LINEWATCH_DATA": "deploy/compose.yaml: the data folder mounted",
    "LINEWATCH_CONSOLE_TOKEN": "deploy/compose.yaml: becomes LINEWATCH_CONSOLE__TOKEN",
    "LINEWATCH_CONSOLE_PORT": "deploy/compose.yaml: the console's published port",
    "LINEWATCH_LOG_FORMAT": "deploy/compose.yaml: becomes LINEWATCH_OPS__LOG_FORMAT",
}
NOT_SETTINGS_PREFIXES = ("LINEWATCH_SOURCE_",)  # the Helm chart's ingest sources from a Secret


def load_settings(config: str | None = None, overrides: dict | None = None) -> Settings:
    """Settings from ``overrides`` (flags), then LINEWATCH_* variables, then the YAML file;
    their secrets registered with the redactor."""
    check_environment(os.environ)
    if config is not None:
        _check_config_file(config)

    class _Settings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            yaml = (YamlConfigSettingsSource(settings_cls, yaml_file=config),) if config else ()
            return (init_settings, env_settings, *yaml)

    try:
        settings = _Settings(**(overrides or {}))
    except yaml.YAMLError as err:
        raise ValueError(f"config file {config} is not valid YAML: {str(err).splitlines()[0]}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"configuration: {where}: {first['msg']}"
                         + (f" (in {config} or LINEWATCH_* variables)" if config else "")) from None
    register_secrets(settings)
    return settings


def check_environment(environ) -> None:
    """Refuse a LINEWATCH_* variable that names no setting (pydantic-settings ignores them:
    ``LINEWATCH_SECURITY_PROTOCOL=SASL_SSL`` would silently leave Kafka in plain text)."""
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        if not _names_a_setting(Settings, upper[len(ENV_PREFIX):].lower().split("__")):
            known = [ENV_PREFIX + "__".join(path).upper() for path in _setting_paths(Settings)]
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            raise ValueError(f"environment variable {name} is not a setting"
                             + (f" (did you mean {close[0]}?)" if close else "")
                             + "; settings are LINEWATCH_<FIELD>, nested with __, e.g. LINEWATCH_WORKER__MAX_BATCH")


def _names_a_setting(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    section = field.annotation
    if isinstance(section, type) and issubclass(section, BaseModel):
        return _names_a_setting(section, path[1:])
    return getattr(section, "__origin__", None) is dict  # a mapping (streams, headers): any key


def _setting_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    for name, field in model.model_fields.items():
        yield (*prefix, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _setting_paths(field.annotation, (*prefix, name))


def register_secrets(settings: BaseModel) -> None:
    """Register with the redactor (``bus.redact``) every secret the settings hold, so it is
    masked in any spelling in logs, dead letters and error lines: each SecretStr (a header
    value, an Apprise URL's tokens, a password, the console token), the secret parts of every
    URL setting (a webhook's path token, ``redis://:password@``), and the AWS secrets S3
    clients take from the environment. Files of secrets register in ``secret`` when read."""
    for value in _leaves(settings):
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
            register_secret(text)
            register_secret(text.split()[-1] if len(text.split()) == 2 else None)  # "Bearer <token>"
            if "://" in text:
                register_url_secrets(text)
        elif isinstance(value, str) and "://" in value:
            register_url_secrets(value)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        register_secret(os.environ.get(name))


def _leaves(value):
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _leaves(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


# a secret from its setting, else from its file (Kafka, Redis, the console; the channels read theirs)
secret = channel_base.secret


def _check_config_file(config: str) -> None:
    """A config file is UTF-8 YAML whose top level is a mapping (or empty): anything else gets
    an error naming the file, before pydantic-settings reads it."""
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"config file not found: {config}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config file {config} is not text (expected YAML settings, UTF-8)") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {config} is not valid YAML: {str(err).splitlines()[0]}") from None
    if content is not None and not isinstance(content, dict):
        raise ValueError(f"config file {config} holds a YAML {type(content).__name__}, expected a mapping of "
                         "settings (see deploy/linewatch.example.yaml)")


def nest(flat: dict[str, Any]) -> dict:
    """{'worker.max_batch': 4} -> {'worker': {'max_batch': 4}} (flag destinations to settings)."""
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
