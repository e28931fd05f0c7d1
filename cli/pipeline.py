"""The pipeline commands: run, ingest, worker, sink, replay, demo.

Every flag writes into a dotted Settings field (``dest="worker.max_batch"``) and is absent
unless given, so flags override LINEWATCH_* variables, which override the --config file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time

from ..bus.redact import redact
from ..scoring.options import canonical_method
from . import args as a

S = argparse.SUPPRESS


def add_common(parser: argparse.ArgumentParser, services: bool = True) -> None:
    parser.add_argument("--config", default=None, help="YAML settings file (see deploy/linewatch.example.yaml)")
    parser.add_argument("--max-pixels", dest="max_pixels", type=a.positive, default=S,
                        help="largest frame (width x height) decoded: ingest scales larger ones down, the worker "
                             "and the archive dead-letter them (default 40000000)")
    if services:
        parser.add_argument("--max-message-bytes", dest="max_message_bytes", type=a.positive, default=S,
                            help="largest record sent to Kafka; set it to the broker's limit if that is lower "
                                 "(default 16 MiB)")
        parser.add_argument("--bootstrap-servers", dest="bootstrap_servers", default=S,
                            help="Kafka brokers host:port[,host:port] (env LINEWATCH_BOOTSTRAP_SERVERS)")
        parser.add_argument("--topic-prefix", dest="topic_prefix", default=S, help="topic name prefix (default linewatch)")
        parser.add_argument("--partitions", dest="partitions", type=int, default=S,
                            help="partitions for topics linewatch creates (default 4)")


def add_ops(parser: argparse.ArgumentParser, endpoint: bool = True) -> None:
    group = parser.add_argument_group("operations (docs/operations.md)")
    if endpoint:
        group.add_argument("--metrics-port", dest="ops.port", type=a.port, default=S,
                           help="port of /metrics, /healthz and /readyz (default 9400; 0: any free port, "
                                "logged; off: none). A taken port is refused, except that `run` moves off a taken "
                                "default to a free port (logged)")
        group.add_argument("--metrics-host", dest="ops.host", default=S,
                           help="address they listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    group.add_argument("--log-format", dest="ops.log_format", choices=["text", "json"], default=S, metavar="{text,json}",
                       help="text (default) or json: one JSON object per line")
    group.add_argument("--log-level", dest="ops.log_level", choices=["debug", "info", "warning", "error"], default=S,
                       metavar="LEVEL",
                       help="linewatch's log level: debug, info (default), warning, error")


def add_model(parser: argparse.ArgumentParser, redis: bool = True) -> None:
    model = parser.add_argument_group("model and scoring profile")
    if redis:
        model.add_argument("--redis-url", dest="redis_url", default=S,
                           help="Redis for the shared text-anchor cache, e.g. redis://host:6379/0")
    model.add_argument("--method", dest="profile.method", default=S, type=canonical_method,
                       help="scoring method (`linewatch methods`; default aprilgan, as in eval)")
    model.add_argument("--checkpoint", dest="profile.checkpoint", default=S,
                       help="trained method from `linewatch train` (sets the method, and the backbone unless given)")
    model.add_argument("--class", dest="profile.class_name", default=S,
                       help="asset class of the prompt pack, e.g. insulator (default)")
    model.add_argument("--threshold", dest="profile.threshold", type=a.threshold, default=S,
                       help="image score that marks a frame anomalous, or 'auto' (default): from --calibration "
                            "images, else from the references by leave-one-out")
    model.add_argument("--references", dest="profile.references", default=S,
                       help="folder of normal images of the asset (few-shot)")
    model.add_argument("--calibration", dest="profile.calibration", default=S,
                       help="folder of other normal images: threshold 'auto' sits just above their scores")
    model.add_argument("--shots", dest="profile.shots", type=a.positive, default=S, help="use the first N references")
    model.add_argument("--option", dest="profile.options", type=a.option, action="append", default=S,
                       metavar="KEY=VALUE", help="method option, repeatable, e.g. text_weight=0")
    from ..pipeline.settings import WorkerSettings

    worker = WorkerSettings()
    model.add_argument("--max-batch", dest="worker.max_batch", type=a.positive, default=S,
                       help=f"frames per batch (default {worker.max_batch}; docs/benchmarks.md)")
    model.add_argument("--max-wait-ms", dest="worker.max_wait_ms", type=float, default=S,
                       help=f"how long a batch waits to fill after its first frame (default {worker.max_wait_ms:g})")
    model.add_argument("--precision", dest="worker.precision", choices=["auto", "fp32", "bf16", "fp16"], default=S,
                       help="image-tower precision (default auto: bf16 on a GPU and on a CPU with native bf16, "
                            "else fp32; docs/benchmarks.md)")
    model.add_argument("--compile", dest="worker.compile", action="store_const", const=True, default=S,
                       help="torch.compile the image tower (the first batch waits for the compiler)")
    model.add_argument("--prompts", dest="worker.prompts", default=S, help="prompt pack YAML")
    a.add_backbone(parser)


def add_ingest(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ingest")
    group.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="video file, image folder, rtsp:// or http(s):// URL, or webcam index")
    group.add_argument("--stream-id", dest="stream_ids", action="append", default=None,
                       help="stream id per source, in order (default: from the file or URL name)")
    group.add_argument("--fps", dest="ingest.fps", type=float, default=S, help="frames per second to keep (default all)")
    group.add_argument("--max-size", dest="ingest.max_size", type=int, default=S, help="long side in px (default 1280)")
    group.add_argument("--jpeg-quality", dest="ingest.jpeg_quality", type=int, default=S,
                       help="JPEG quality 1-100 of the frames put on the bus (default 90)")
    group.add_argument("--realtime", dest="ingest.realtime", action="store_const", const=True, default=S,
                       help="pace files at recorded speed (default: as fast as possible)")


def add_alerts(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("alerts")
    group.add_argument("--k", dest="alerts.policy.k", type=int, default=S, help="anomalous frames among the last n (default 2)")
    group.add_argument("--n", dest="alerts.policy.n", type=int, default=S, help="debounce window in frames (default 3)")
    group.add_argument("--cooldown", dest="alerts.policy.cooldown_s", type=float, default=S,
                       help="seconds of quiet before an event closes (default 0)")
    group.add_argument("--gap", dest="alerts.policy.gap_s", type=float, default=S,
                       help="seconds missing from a stream's capture time that end its session's event, "
                            "for live sources that stop without an end marker (default 30)")
    group.add_argument("--alert-threshold", dest="alerts.policy.threshold", type=float, default=S,
                       help="override the workers' thresholds for alerting")
    add_channel_flags(group)
    group.add_argument("--channel-timeout", dest="alerts.delivery.timeout_s", type=float, default=S, metavar="S",
                       help="alert channels: seconds one delivery attempt may take (default 10)")
    group.add_argument("--channel-attempts", dest="alerts.delivery.attempts", type=int, default=S, metavar="N",
                       help="alert channels: attempts per alert before its dead letter, 0: no limit (default 10)")
    group.add_argument("--channel-max-age", dest="alerts.delivery.max_age_s", type=float, default=S, metavar="S",
                       help="alert channels: an alert decided longer ago is dead-lettered, not sent; 0: no limit "
                            "(default 86400)")
    group.add_argument("--channel-max-backoff", dest="alerts.delivery.max_backoff_s", type=float, default=S,
                       metavar="S", help="alert channels: longest wait between two attempts (default 60)")


def add_channel_flags(parser, sink_only: bool = False) -> None:
    """The bundled alert channels' flags (``sinks.channels``), each setting ``alerts.<field>``:
    those of ``run`` and ``sink alerts``, or with ``sink_only`` those of ``sink alerts`` only."""
    from ..sinks.channels.registry import bundled

    for flag in (flag for cls in bundled().values() for flag in cls.flags if flag.sink_only == sink_only):
        how = {"metavar": flag.metavar} if flag.const is None else {"action": "store_const", "const": flag.const}
        parser.add_argument(flag.option, dest=f"alerts.{flag.field}", default=S, help=flag.help, **how)


def add_parsers(commands) -> None:
    run = commands.add_parser("run", help="run the whole pipeline in this process (no services needed)",
                              description="Ingest, score, alert and archive in one process on the in-process bus. "
                                          "Alerts go to OUT/alerts.jsonl, anomaly masks and overlays to OUT/archive.")
    add_ingest(run)
    run.add_argument("--out", default="linewatch-out", help="output folder (default linewatch-out)")
    run.add_argument("--scores", default=None, metavar="FILE",
                     help="also write every frame's score to this JSONL file (stream, seq, time, score, threshold, "
                          "anomalous; `linewatch report OUT` draws timelines from OUT/scores.jsonl)")
    view = run.add_argument_group("console (docs/console.md)")
    view.add_argument("--console", action="store_true",
                      help="open the operator's console on this run (http://127.0.0.1:8400/); it stays open "
                           "after the run until Ctrl-C")
    view.add_argument("--console-port", dest="console.port", type=a.port, default=S,
                      help="the console's port (default 8400; 0: any free port, logged)")
    view.add_argument("--console-host", dest="console.host", default=S,
                      help="the console's address (default 127.0.0.1; any other needs LINEWATCH_CONSOLE__TOKEN)")
    add_common(run, services=False)
    add_model(run, redis=False)
    add_alerts(run)
    add_ops(run)

    ingest = commands.add_parser("ingest", help="publish frames of sources to Kafka",
                                 description="Read video files, image folders, RTSP/HTTP streams or webcams and publish their frames (JPEG, scaled to --max-size) to the frames topic, one stream per source.")
    add_ingest(ingest)
    add_common(ingest)
    add_ops(ingest)

    worker = commands.add_parser("worker", help="score frames from Kafka (a consumer group member)",
                                 description="Consume the frames topic as a member of the workers' consumer group, score each batch with the method and publish the scores; start more workers to share the partitions.")
    add_common(worker)
    add_model(worker)
    add_ops(worker)

    sink = commands.add_parser("sink", help="alert or archive sink on the scores topic",
                               description="A long-running consumer of the scores topic: `sink alerts` turns "
                                           "anomalous frames into events and sends them out, `sink archive` keeps "
                                           "their frames, masks and overlays.")
    kinds = sink.add_subparsers(dest="kind", required=True, metavar="{alerts,archive}",
                                help="which sink (each has its own --help)")
    alerts = kinds.add_parser("alerts", help="debounce scores into events; write, publish and send them",
                              description="Read the scores topic, debounce anomalous frames into events (--k of "
                                          "the last --n frames) and write them to --jsonl, the alerts topic and "
                                          "the configured channels (webhook, MQTT, Apprise).")
    archive = kinds.add_parser("archive", help="store the frames, masks and overlays of anomalous frames",
                               description="Read the scores topic and store each anomalous frame with its anomaly "
                                           "mask and overlay in --archive (a folder or s3://bucket/prefix).")
    for parser in (alerts, archive):
        parser.add_argument("--scores-topic", default=None,
                            help="read this topic instead of <prefix>.scores (e.g. a replay's)")
    add_channel_flags(alerts, sink_only=True)  # --jsonl, --no-publish
    archive.add_argument("--archive", dest="archive", default=S,
                         help="where to store: a folder or s3://bucket/prefix (env LINEWATCH_ARCHIVE)")
    add_common(alerts)
    add_alerts(alerts)
    add_ops(alerts)
    add_common(archive)
    add_ops(archive)

    replay = commands.add_parser("replay", help="re-score frames still on the frames topic into a results topic",
                                 description="Score again, with another method, checkpoint or threshold, the frames Kafka still keeps, into a results topic of their own; compare them with `linewatch sink alerts --scores-topic` or the console's Compare tab.")
    add_common(replay)
    add_model(replay)
    span = replay.add_argument_group("range (default: everything on the topic)")
    span.add_argument("--from-offset", type=int, default=None,
                      help="first offset to replay, in every partition (default: the earliest kept)")
    span.add_argument("--to-offset", type=int, default=None, help="exclusive")
    span.add_argument("--since", type=a.when, default=None,
                      help="frames published from this time on, UNIX seconds or ISO 8601 (UTC unless zoned)")
    span.add_argument("--until", type=a.when, default=None, help="exclusive")
    span.add_argument("--stream", default="*", help="glob of stream ids to replay")
    replay.add_argument("--results-topic", default=None,
                        help="where the scores go (default <prefix>.replay.<method>-<UTC time>)")
    add_ops(replay, endpoint=False)

    demo = commands.add_parser("demo", help="write a synthetic drone inspection clip with a defect, and references "
                                             "(or, with --context-set, a context-anomaly dataset)",
                               description="Write OUT/clip.mp4 (a drone panning past a lattice tower whose insulator is "
                                           "burnt for a few seconds), OUT/references and OUT/calibration (normal "
                                           "views) and OUT/truth.json (the defect frames): inputs for `linewatch run` "
                                           "without any data of your own.")
    demo.add_argument("out", help="output folder")
    demo.add_argument("--seconds", type=float, default=None, help="clip length (default 12)")
    demo.add_argument("--fps", type=float, default=None, help="clip frame rate (default 10)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the scene (default 0); the same seed writes the same files")
    context = demo.add_argument_group("context-anomaly dataset")
    context.add_argument("--context-set", action="store_true",
                         help="write OUT/powerline_context in MVTec layout with subject masks instead of a clip: "
                              "dampers, insulator strings and nests in normal and in wrong places")
    context.add_argument("--train", type=int, default=None, metavar="N", help="normal training images (default 32)")
    context.add_argument("--per-type", type=int, default=None, metavar="N",
                         help="test images per anomaly type; test/good gets three times as many (default 16)")

    for parser in (run, ingest, worker, alerts, archive, replay):
        a.metavars(parser)


# ---- handlers ---------------------------------------------------------------------------
def _settings(args: argparse.Namespace):
    _check_option_flags(args)
    from ..pipeline.settings import load_settings, nest

    flat = {k: v for k, v in vars(args).items() if "." in k or k in ("bootstrap_servers", "redis_url", "topic_prefix",
                                                                      "partitions", "archive", "max_pixels",
                                                                      "max_message_bytes")}
    if "profile.options" in flat:
        flat["profile.options"] = dict(flat["profile.options"])
    return load_settings(args.config, nest(flat))


def _check_option_flags(args: argparse.Namespace) -> None:
    """``--option`` values as typed, against ``--method`` (or the default method when neither a
    config file nor the environment can name another), before the settings load: pydantic takes
    a second or more to import, and a typo should not wait for it."""
    import os

    from ..scoring.options import DEFAULT_METHOD, check_options

    options, method = getattr(args, "profile.options", S), getattr(args, "profile.method", S)
    if options is S or not options:
        return
    if method is S:
        if getattr(args, "config", None) or "LINEWATCH_PROFILE__METHOD" in os.environ:
            return  # the method is the config's or the environment's: checked with the settings
        method = DEFAULT_METHOD
    check_options(method, dict(options))


def _bus(settings, part: str, stop: threading.Event):
    """The Kafka bus of this process's ``part``; ``stop`` (its signals) ends any wait for the broker."""
    from ..bus import BusError
    from ..ops.health import HEALTH
    from ..pipeline.wiring import connect, kafka_options

    if not settings.bootstrap_servers:
        raise BusError("no Kafka given: pass --bootstrap-servers or set LINEWATCH_BOOTSTRAP_SERVERS "
                       "(or use `linewatch run` for the in-process pipeline)")
    bus = connect(f"kafka://{settings.bootstrap_servers}", settings.topic_prefix, settings.partitions, part=part,
                  stop=stop, max_message_bytes=settings.max_message_bytes, **kafka_options(settings))
    HEALTH.set("bus", True, f"Kafka at {settings.bootstrap_servers}")
    return bus


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@contextlib.contextmanager
def _operations(settings, *conditions: str, one_shot: bool = False):
    """For the command's lifetime: logs as configured, and the /metrics /healthz /readyz endpoint
    (unless ``ops.port`` is off), not ready until every one of ``conditions`` is reported.

    A ``one_shot`` command (``run``) whose port was not asked for takes any free port when the
    default one is taken (by another run, say) and logs it: a second run in another terminal
    still has its metrics. A port that was asked for (flag, variable, config), and every port of
    the long-running services, is refused when taken: their probes and scrapers expect it."""
    from .. import __version__
    from ..bus.outages import OUTAGES
    from ..ops import metrics
    from ..ops.health import HEALTH
    from ..ops.logs import setup_logging
    from ..ops.server import OpsServer

    ops = settings.ops
    setup_logging(ops.log_format, ops.log_level, redact=redact)
    HEALTH.reset()
    OUTAGES.reset()
    HEALTH.bound_s = ops.heartbeat_s
    HEALTH.expect(*conditions)
    # the outages the parts ride out (Kafka, S3, the disk; Redis only degrades): not ready meanwhile
    HEALTH.watch("outages", lambda: (OUTAGES.ready(), OUTAGES.snapshot()["parts"]))
    metrics.BUILD.info({"version": __version__})
    try:
        if ops.port is None:
            yield None
            return
        try:
            server = OpsServer(ops.host, ops.port)
        except OSError:
            if not one_shot or "port" in ops.model_fields_set:
                raise
            server = OpsServer(ops.host, 0)
            logging.getLogger("linewatch").info("port %d is taken (another linewatch run?); this run's metrics and "
                                                "health are on port %d instead", ops.port, server.port)
        with server:
            yield server
    finally:
        OUTAGES.settle()  # an outage that ended as the command finished still gets its "is back" line


def _check_before_loading(settings) -> None:
    """What needs no model, checked before torch is even imported: the profiles' methods and
    options, their folders, and whether pretrained weights can be had (a mistake fails in a
    second, not after the model has loaded)."""
    from ..scoring.weights import check_weights
    from ..workers.profiles import ProfileTable

    ProfileTable(settings.profile, settings.streams)
    check_weights(settings.backbone.arch, settings.backbone.weights)


def _logging(settings) -> None:
    from ..ops.logs import setup_logging

    setup_logging(settings.ops.log_format, settings.ops.log_level, redact=redact)


def run_run(args) -> None:
    settings = _settings(args)
    _check_before_loading(settings)
    from ..pipeline.embedded import check_inputs, run_embedded

    check_inputs(args.sources, settings, args.stream_ids)  # a mistake is one line, before the endpoint's
    opened, recording = [], []

    def attach(bus, run_settings) -> None:
        from ..console.service import record, serve
        from ..pipeline.wiring import policy_table

        if args.console:
            opened.append(serve(run_settings, bus, policy_table(run_settings)))
        elif not run_settings.archive.startswith("s3://"):  # the archive's index keeps the events for a console later
            recording.append(record(run_settings, bus))

    if args.console:
        from ..console.service import console_token

        console_token(settings)  # a console beyond loopback without a token fails before the model is built
    with _operations(settings, "model", one_shot=True):
        try:
            summary = run_embedded(args.sources, settings, args.out, stream_ids=args.stream_ids, scores=args.scores,
                                   attach=attach)
            for recorder in recording:
                recorder.close(drain=True)
            print(summary.text() + (f"\nscores: {args.scores}" if args.scores else ""), flush=True)
            if summary.interrupted:  # Ctrl-C: the summary, then exit 130
                raise KeyboardInterrupt
            if opened:
                logging.getLogger("linewatch").info("the run is done; the console stays open at %s until Ctrl-C "
                                                    "(later: linewatch console --archive %s)", opened[0].url,
                                                    summary.archive)
                stop = _stop_on_signals()
                while not stop.wait(0.5):
                    pass
        finally:
            for recorder in recording:
                recorder.close()
            for server in opened:
                server.stop()


def run_ingest_command(args) -> None:
    from ..ingest.publisher import run_ingest

    settings = _settings(args)
    with _operations(settings, "bus", "sources"):
        stop = _stop_on_signals()
        bus, i = _bus(settings, "ingest", stop), settings.ingest
        stats = run_ingest(bus, args.sources, stream_ids=args.stream_ids, fps=i.fps, max_size=i.max_size,
                           jpeg_quality=i.jpeg_quality, realtime=i.realtime, stop=stop, max_pixels=settings.max_pixels)
    for s in stats:
        print(s.summary())


def run_worker(args) -> None:
    from ..ops.health import HEALTH
    from ..pipeline.wiring import build_worker

    settings = _settings(args)
    _check_before_loading(settings)
    with _operations(settings, "bus", "model", "assignment"):
        stop = _stop_on_signals()
        bus = _bus(settings, "worker", stop)
        worker = build_worker(bus, settings)
        HEALTH.set("model", True, f"{worker.backbone.identity}, {len(worker.prepared)} profile(s) prepared")
        logging.getLogger("linewatch").info("worker %s ready (%s, %s, batches of up to %d)", worker.worker_id,
                                            worker.backbone.identity, worker.precision, worker.max_batch)
        stats = worker.run(stop)
    print(f"worker {worker.worker_id}: {stats.frames} frames in {stats.batches} batches, {stats.dead} dead letters; "
          f"model {stats.model_s:.1f} s of {stats.busy_s:.1f} s busy ({stats.model_s / max(stats.busy_s, 1e-9):.0%})")


def run_sink(args) -> None:
    from ..pipeline.wiring import alert_channels, policy_table
    from ..sinks.archive import Archive
    from ..sinks.alert_sink import run_alert_sink
    from ..sinks.archive_sink import run_archive_sink

    settings = _settings(args)
    if args.kind == "archive" and not settings.archive:
        raise ValueError("the archive sink needs --archive FOLDER or s3://bucket/prefix")
    if args.kind == "alerts":
        policy_for = policy_table(settings)
    with _operations(settings, "bus", "assignment"):
        stop = _stop_on_signals()
        bus = _bus(settings, f"sink-{args.kind}", stop)
        # a sink on another scores topic (a replay's) is a group of its own, not a member of the live sinks'
        group = bus.topics.group(args.kind) + (f"@{args.scores_topic}" if args.scores_topic else "")
        if args.kind == "alerts":
            stats = run_alert_sink(bus, policy_for, alert_channels(settings), stop=stop, topic=args.scores_topic,
                                   publish=settings.alerts.publish,
                                   group=group)
        else:
            stats = run_archive_sink(bus, Archive(settings.archive, max_pixels=settings.max_pixels), stop=stop,
                                     topic=args.scores_topic, group=group)
    print(f"sink {args.kind}: {stats}")


def run_replay(args) -> None:
    from ..pipeline.replay import ReplayRange, replay
    from ..pipeline.wiring import build_worker

    settings = _settings(args)
    _check_before_loading(settings)
    _logging(settings)
    span = ReplayRange(args.from_offset, args.to_offset, args.since, args.until, args.stream)
    bus = _bus(settings, "replay", _stop_on_signals())
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = args.results_topic or f"{bus.topics.prefix}.replay.{settings.profile.method}-{stamp}"
    bus.ensure_topics([results])
    worker = build_worker(bus, settings, results_topic=results)
    counts = replay(bus, worker, span)
    print(f"replayed {counts['scored']} frames from {counts['partitions']} partition(s) into {results} "
          f"({counts['skipped']} outside the range, {worker.stats.dead} dead letters)")
    print(f"compare: linewatch sink alerts --scores-topic {results} --jsonl alerts-{results}.jsonl --no-publish")


def run_demo(args) -> None:
    from ..synthetic.demo import find_backgrounds, write_demo_clip

    if args.context_set:
        run_context_set(args)
        return
    given = [flag for flag, value in (("--train", args.train), ("--per-type", args.per_type)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only with --context-set")
    clip = write_demo_clip(args.out, seconds=12.0 if args.seconds is None else args.seconds,
                           fps=10.0 if args.fps is None else args.fps, seed=args.seed, backgrounds=find_backgrounds())
    print(f"clip: {clip.video}\nreferences: {clip.references[0].parent} ({len(clip.references)} normal views)\n"
          f"calibration: {clip.calibration[0].parent} ({len(clip.calibration)} more normal views)\n"
          f"defect frames: {clip.defect_frames[0]}..{clip.defect_frames[1]} of {clip.frame_count}")


def run_context_set(args) -> None:
    from ..synthetic.context_set import ANOMALIES, write_context_set
    from ..synthetic.demo import find_backgrounds

    given = [flag for flag, value in (("--seconds", args.seconds), ("--fps", args.fps)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not with --context-set (it writes images, not a clip)")
    for flag, value in (("--train", args.train), ("--per-type", args.per_type)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    written = write_context_set(args.out, seed=args.seed, train=32 if args.train is None else args.train,
                                per_type=16 if args.per_type is None else args.per_type, backgrounds=find_backgrounds())
    counts = ", ".join(f"{key} {n}" for key, n in written.counts.items())
    print(f"context set: {written.root} ({counts})\nanomalies: {', '.join(ANOMALIES)}; subject masks in "
          f"{written.root / 'subject_masks'}\nbackgrounds: {written.backgrounds or 'procedural (no pld_uav_frames found)'}")


HANDLERS = {"run": run_run, "ingest": run_ingest_command, "worker": run_worker, "sink": run_sink,
            "replay": run_replay, "demo": run_demo}
