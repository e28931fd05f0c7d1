"""The frames every part measures: one clip, and its frames as the JPEGs ingest publishes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2

from ..ingest.sources import open_source

MAX_SIZE = 1280  # ingest's default long side
JPEG_QUALITY = 90  # ingest's default


@dataclass
class Workload:
    video: Path
    jpegs: list[bytes]  # every frame of the clip, encoded as `linewatch ingest` encodes it
    width: int
    height: int
    synthetic: bool  # the demo clip written for this run, or the user's --clip
    calibration: Path | None = None  # normal views of the synthetic clip's scene, for the alert threshold

    def describe(self) -> dict:
        return {"video": str(self.video), "frames": len(self.jpegs), "width": self.width, "height": self.height,
                "synthetic": self.synthetic,
                "jpeg_kb_mean": sum(map(len, self.jpegs)) / max(len(self.jpegs), 1) / 1024}


def prepare_workload(work_dir: Path, frames: int, clip: str | None = None, size: tuple[int, int] = (640, 360),
                     fps: float = 10.0) -> Workload:
    """The user's ``clip`` (all of it), or the demo drone clip with ``frames`` frames."""
    if clip is None:
        from ..synthetic.demo import find_backgrounds, write_demo_clip

        demo = write_demo_clip(work_dir / "clip", seconds=frames / fps, fps=fps, size=size, references=4,
                               backgrounds=find_backgrounds())  # 4 references -> 8 calibration views
        video, synthetic, calibration = demo.video, True, demo.calibration[0].parent
    else:
        video, synthetic, calibration = Path(clip), False, None
    jpegs, shape = [], None
    for image, _ in open_source(str(video), max_size=MAX_SIZE):  # a bad path is one clear IngestError
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ValueError(f"{video}: JPEG encoding failed for a {image.shape} frame")
        jpegs.append(jpeg.tobytes())
        shape = image.shape
    if not jpegs:
        raise ValueError(f"{video}: no frames")
    return Workload(video, jpegs, shape[1], shape[0], synthetic, calibration)
