"""The benchmark report as a table for people; the JSON is ``run_bench``'s dict as it is."""

from __future__ import annotations

import json
from pathlib import Path

OTHER_CPU_WARNING = 0.05
PART_NAMES = {"naive": "baseline loop", "sweep": "sweep", "scoring": "scoring", "embedded": "pipeline, embedded",
              "kafka": "pipeline, Kafka", "opencv-decode": "OpenCV decode", "ingest": "ingest"}


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(share) -> str:
    return "-" if share is None else f"{share:.0%}"


def _all_parts(report: dict) -> list[dict]:
    parts = []
    for result in report["methods"].values():
        for key in ("naive", "sweep", "scoring", "embedded", "kafka"):
            value = result.get(key)
            parts += value if isinstance(value, list) else ([value] if value else [])
    ingest = report.get("ingest")
    return parts + ([ingest["opencv_decode"], ingest["ingest"]] if ingest else [])


def _settings(part: dict) -> str:
    s = part["settings"]
    if part["part"] == "naive":
        return "b1 fp32 PIL, prompts every frame"
    if "batch" in s:
        text = f"b{s['batch']} {s['precision']}"
        if s.get("compiled"):
            text += " compiled"
        if "max_wait_ms" in s:
            text += f" wait {s['max_wait_ms']:g} ms"
        elif "preprocess" in s:
            text += f" {s['preprocess']}"
        return text
    return s.get("what") or f"JPEG q{s.get('jpeg_quality')}, long side <= {s.get('max_size')}"


def _row(method: str, part: dict, gpu: bool) -> list[str]:
    row = [method, PART_NAMES.get(part["part"], part["part"]), _settings(part), str(part["frames"]),
           _num(part["fps"], 2), _num(part["latency_ms"]["p50"], 0), _num(part["latency_ms"]["p99"], 0),
           _num(part["peak_rss_mb"], 0), _percent(part.get("other_cpu"))]
    return row + [_num(part["peak_gpu_mb"], 0)] if gpu else row


def format_table(report: dict) -> str:
    gpu = report["device"].startswith("cuda")
    header = ["method", "part", "settings", "frames", "frames/s", "p50 ms", "p99 ms", "peak RSS MB", "other CPU"]
    header += ["peak GPU MB"] if gpu else []
    rows = []
    for method, result in report["methods"].items():
        for key in ("naive", "sweep", "scoring", "embedded", "kafka"):
            parts = result.get(key)
            for part in parts if isinstance(parts, list) else ([parts] if parts else []):
                rows.append(_row(method, part, gpu))
    ingest = report.get("ingest")
    if ingest:
        rows += [_row("-", ingest["opencv_decode"], gpu), _row("-", ingest["ingest"], gpu)]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = set(range(3, len(header)))

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    clip = report["clip"]
    lines = [
        f"linewatch bench: {report['model']} ({report['weights_note']}), {report['image_size']} px, "
        f"{report['device']} ({report['name']}, {report['threads']} torch threads), torch {report['torch']}",
        f"class {report['class_name']} ({report['prompt_sentences']} prompt sentences); clip {clip['width']}x"
        f"{clip['height']}, {clip['frames']} frames ({'synthetic demo clip' if clip['synthetic'] else clip['video']})",
        "latency: baseline per frame; scoring per frame = its batch's time; pipelines = the worker's batch handling "
        "to score sent",
        "", line(header), line(["-" * w for w in widths]), *[line(r) for r in rows], ""]
    for method, result in report["methods"].items():
        r = result["ratios"]
        text = (f"{method}: scoring / baseline = {r['scoring_vs_naive']:.1f}x "
                f"(baseline with prompts encoded once: {r['scoring_vs_naive_cached_prompts']:.1f}x)")
        for bus in ("embedded", "kafka"):
            if f"{bus}_vs_scoring" in r:
                text += (f"; {bus} pipeline / scoring = {r[f'{bus}_vs_scoring']:.2f} "
                         f"(overhead {r[f'{bus}_overhead']:+.1%} of scoring time)")
        lines.append(text)
        runs = [f"{key} {'/'.join(f'{fps:.2f}' for fps in result[key]['repeat_fps'])}"
                for key in ("scoring", "embedded", "kafka") if result.get(key) and "repeat_fps" in result[key]]
        lines.append(f"{method}: frames/s of each run, the median in the table: {'; '.join(runs)}")
        pick = result["picked"]
        lines.append(f"{method}: picked max_batch {pick['max_batch']}, precision {pick['precision']}, max_wait_ms "
                     f"{pick['max_wait_ms']:g}{', compile' if pick['compile'] else ''} ({pick['why']})")
    if ingest:
        lines.append(f"ingest / OpenCV decode = {ingest['ratios']['ingest_vs_opencv']:.2f}")
    busy = [p for p in _all_parts(report) if (p.get("other_cpu") or 0) > OTHER_CPU_WARNING]
    if busy:
        lines.append(f"WARNING: other processes took over {OTHER_CPU_WARNING:.0%} of the CPU during {len(busy)} "
                     f"part(s) (column 'other CPU'; a broker the bench started counts too): re-run on a quiet machine")
    kafka = report["kafka"]
    lines.append(f"Kafka: {kafka.get('broker', '')} {kafka.get('servers', '')}".rstrip() if kafka["used"]
                 else f"Kafka pipeline skipped: {kafka['why']}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
