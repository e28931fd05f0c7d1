"""Wiring: the parts a process runs, built from Settings (the backbone, a prepared worker,
the alert policies and outputs). Every check a user can fail that needs no model runs first."""

from __future__ import annotations

import threading
from pathlib import Path

from ..bus import MAX_MESSAGE_BYTES, Bus, BusError, Topics
from ..bus.streams import StreamTable
from ..scoring.backbone import Backbone, BackboneConfig
from ..scoring.prompts import PromptPack
from ..sinks.events import AlertPolicy
from ..ops.startup import STARTUP
from ..workers.anchors import AnchorCache
from ..workers.prepared import PreparedProfile
from ..workers.prepared_cache import PreparedCache, cache_folder
from ..workers.profiles import ProfileTable
from ..workers.worker import ScoringWorker
from .settings import Settings, secret


def connect(url: str, prefix: str = "linewatch", partitions: int = 4, *, part: str = "linewatch",
            stop: threading.Event | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES, **kafka) -> Bus:
    """``memory://`` or ``kafka://host:port,...`` (``host:port`` alone means Kafka). ``part``
    names this process's part in outage reports; ``stop`` ends any wait for the broker;
    ``kafka``: KafkaBus's security and topic options (``kafka_options``)."""
    topics = Topics(prefix)
    if url.startswith("memory://"):
        from ..bus.memory import MemoryBus
        return MemoryBus(topics, partitions, max_message_bytes=max_message_bytes)
    servers = url.removeprefix("kafka://")
    if not servers or "://" in servers:
        raise BusError(f"bus URL {url!r}: use memory:// or kafka://host:port[,host:port]")
    from ..bus.kafka import KafkaBus
    return KafkaBus(servers, topics, partitions, part=part, stop=stop, max_message_bytes=max_message_bytes,
                    **kafka)


def kafka_options(settings: Settings) -> dict:
    """The configured Kafka security (one KafkaSecurity for every client) and topic durability."""
    from ..bus.kafka import KafkaSecurity

    k = settings.kafka
    security = KafkaSecurity(
        protocol=k.security_protocol, sasl_mechanism=k.sasl_mechanism, sasl_username=k.sasl_username,
        sasl_password=secret(k.sasl_password, k.sasl_password_file, "kafka.sasl_password_file"),
        ssl_cafile=k.ssl_cafile, ssl_certfile=k.ssl_certfile, ssl_keyfile=k.ssl_keyfile,
        ssl_check_hostname=k.ssl_check_hostname)
    return {"security": security, "replication_factor": k.replication_factor,
            "min_insync_replicas": k.min_insync_replicas}


def redis_options(settings: Settings) -> dict:
    """redis-py connection options beside ``redis_url``: the password, and TLS files for rediss://."""
    r = settings.redis
    options = {}
    password = secret(r.password, r.password_file, "redis.password_file")
    if password is not None:
        options["password"] = password
    tls = {"ssl_ca_certs": r.ssl_ca_file, "ssl_certfile": r.ssl_certfile, "ssl_keyfile": r.ssl_keyfile}
    for name, path in tls.items():
        if path is None:
            continue
        if not (settings.redis_url or "").startswith("rediss://"):
            raise ValueError("redis TLS files are set but redis_url is not rediss://host:port/db")
        if not Path(path).is_file():
            raise ValueError(f"redis {name.replace('ssl_ca_certs', 'ssl_ca_file')}: file not found: {path}")
        options[name] = path
    return options


def check_settings(settings: Settings) -> ProfileTable:
    """Everything a user can get wrong that needs no model: fails fast, names the problem."""
    from ..scoring.precision import resolve_device, resolve_precision

    resolve_precision(settings.worker.precision, resolve_device(settings.backbone.device))
    table = ProfileTable(settings.profile, settings.streams)
    if settings.worker.prompts is not None and not Path(settings.worker.prompts).is_file():
        raise ValueError(f"prompt pack not found: {settings.worker.prompts}")
    policy_table(settings)
    if settings.profile.checkpoint:
        backbone_config(settings)
    return table


def backbone_config(settings: Settings) -> BackboneConfig:
    """The configured backbone; with a checkpoint in the default profile, the one it was
    trained on, checked against the backbone settings given explicitly (one policy with eval:
    ``scoring.checkpoint.checkpoint_backbone``)."""
    from ..scoring.checkpoint import checkpoint_backbone

    b = settings.backbone
    if settings.profile.checkpoint:
        given = {name: getattr(b, name) for name in b.model_fields_set if name != "device"}
        return checkpoint_backbone(settings.profile.checkpoint, given)
    return BackboneConfig(arch=b.arch, weights=b.weights, image_size=b.image_size, layers=b.layers,
                          vv_attention=b.vv_attention, seed=b.seed)


def build_backbone(settings: Settings) -> Backbone:
    from ..scoring.precision import resolve_device

    return Backbone.build(backbone_config(settings), resolve_device(settings.backbone.device))


def build_worker(bus: Bus, settings: Settings, backbone: Backbone | None = None, **kwargs) -> ScoringWorker:
    """A prepared worker; ``backbone`` reuses one already built (and accelerated) for these settings."""
    from ..scoring.acceleration import accelerate

    profiles = check_settings(settings)
    prompts = PromptPack.load(settings.worker.prompts)
    anchors = AnchorCache(settings.redis_url, folder=settings.anchor_dir, redis_options=redis_options(settings),
                          **({"outages": kwargs["outages"]} if "outages" in kwargs else {}))
    STARTUP.begin((backbone is None) + sum(PreparedProfile.stages(p) for p in profiles.profiles()))
    try:
        if backbone is None:
            config = backbone_config(settings)
            weights = "random weights" if config.weights == "none" else f"weights {config.weights}"
            with STARTUP.stage("loading model", f"loading model {config.arch} ({weights})"):
                backbone = accelerate(build_backbone(settings), compile=settings.worker.compile)
        w = settings.worker
        worker = ScoringWorker(bus, backbone, profiles, anchors, prompts=prompts, max_batch=w.max_batch,
                               max_wait_ms=w.max_wait_ms, precision=w.precision, summary_s=settings.ops.summary_s,
                               max_pixels=settings.max_pixels, reload_s=w.reload_s,
                               cache=PreparedCache(cache_folder(settings.prepared_dir)), **kwargs)
        worker.prepare_all()
    finally:
        STARTUP.ready()
    return worker


def policy_table(settings: Settings) -> StreamTable[AlertPolicy]:
    """stream id -> AlertPolicy (glob overrides of the default policy, first match wins)."""
    base = settings.alerts.policy
    return StreamTable(base, {pattern: AlertPolicy.model_validate({**base.model_dump(), **values})
                              for pattern, values in settings.alerts.streams.items()})


def alert_channels(settings: Settings) -> list:
    """The alert channels the settings ask for, each with its delivery policy (docs/alerts.md):
    the bundled ones' (``sinks.channels.registry.bundled``, by name), then each package's in
    ``alerts.plugins`` (by name), which take ``alerts.delivery``."""
    from ..sinks.channels.registry import bundled, plugin, settings_of

    a, channels = settings.alerts, []
    for name, cls in bundled().items():
        delivery = delivery_policy(settings, name)
        for channel in cls.from_settings(settings_of(cls, a), delivery):
            channel.delivery = delivery
            channels.append(channel)
    for name, options in sorted(a.plugins.items()):
        for channel in plugin(name, options, a.delivery):
            channel.delivery = a.delivery
            channels.append(channel)
    return channels


def delivery_policy(settings: Settings, kind: str):
    """``alerts.delivery`` with ``alerts.channels.<kind>``'s overrides."""
    a = settings.alerts
    overrides = a.channels[kind].model_dump(exclude_none=True) if kind in a.channels else {}
    return a.delivery.model_copy(update=overrides)
