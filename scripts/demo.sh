#!/usr/bin/env bash
# Set up a virtualenv, write the synthetic drone inspection clip and run the whole pipeline on
# it in one process (embedded bus, no services): alerts and anomaly masks land in runs/demo/out.
# Random ViT-B-16 weights (no pretrained weights here): few-shot, references only (text_weight=0).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -e .
linewatch demo runs/demo
# The README's tour, step 1: the threshold calibrated on the demo's further normal views.
linewatch run runs/demo/clip.mp4 --stream-id drone-1 --references runs/demo/references --calibration runs/demo/calibration \
    --option text_weight=0 --k 3 --n 10 --out runs/demo/out --scores runs/demo/out/scores.jsonl "$@"
echo "--- alerts (runs/demo/out/alerts.jsonl) ---"
python - <<'PY'
import json
for line in open("runs/demo/out/alerts.jsonl"):
    a = json.loads(line)
    print(f"{a['status']:>6}  {a['event_id']}  frames {a['start_seq']}..{a['end_seq']}  peak {a['peak_score']:.3f} at {a['peak_seq']}")
PY
