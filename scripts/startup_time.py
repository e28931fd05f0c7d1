"""Seconds from process start to each start-up line, to ready (the threshold line) and to the first
score written, for the README tour's run command on runs/demo (write it with `linewatch demo
runs/demo`). Run it twice: the first run fills the caches, the second shows a warm start.

    python scripts/startup_time.py [DEMO_FOLDER]
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    demo = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo").resolve()
    if not (demo / "clip.mp4").is_file():
        sys.exit(f"no demo at {demo}: run `linewatch demo {demo}` first")
    out = Path(tempfile.mkdtemp(prefix="startup-"))
    scores = out / "scores.jsonl"
    cmd = [sys.executable, "-m", "linewatch", "run", str(demo / "clip.mp4"), "--stream-id", "drone-1",
           "--references", str(demo / "references"), "--calibration", str(demo / "calibration"),
           "--option", "text_weight=0", "--k", "3", "--n", "10", "--out", str(out / "out"), "--scores", str(scores),
           "--metrics-port", "off"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first: list[float] = []

    def watch() -> None:  # the first score line written to the scores file
        while proc.poll() is None and not first:
            if scores.exists() and scores.stat().st_size > 0:
                first.append(time.monotonic() - started)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    ready = None
    for line in proc.stdout:
        at = time.monotonic() - started
        if "startup" in line or "threshold" in line:
            print(f"{at:6.2f} s  {line.split(' ', 3)[-1].rstrip()}")
        if ready is None and "threshold" in line:
            ready = at
        if ready is not None and first:
            break
    proc.kill()
    proc.wait()
    shutil.rmtree(out, ignore_errors=True)
    print(f"ready to score after {ready:.1f} s, first score after {first[0]:.1f} s" if ready and first
          else "the run ended before it scored")


if __name__ == "__main__":
    main()
