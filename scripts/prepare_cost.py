"""What measuring the blend's scales costs a cold prepare: aprilgan (random ViT-B-16, 224 px) with k
references (default 8; the first argument) at text_weight 0 (nothing measured) and 0.5, alternated, median of 3 each."""
import statistics, sys, time
import torch
from linewatch.scoring.backbone import Backbone, BackboneConfig
from linewatch.scoring.methods import create_method

torch.manual_seed(0)
backbone = Backbone.build(BackboneConfig())
k = int(sys.argv[1]) if len(sys.argv) > 1 else 8
refs = torch.rand(k, 3, 224, 224)
anchors = create_method("aprilgan", backbone).build_anchors("insulator")
times = {0.0: [], 0.5: []}
for _ in range(3):
    for w in times:
        m = create_method("aprilgan", backbone, text_weight=w)
        t = time.perf_counter(); m.prepare("insulator", refs, anchors=anchors); times[w].append(time.perf_counter() - t)
med = {w: statistics.median(v) for w, v in times.items()}
print(f"k={k}: prepare text_weight=0 {med[0.0]:.2f} s, text_weight=0.5 {med[0.5]:.2f} s, ratio {med[0.5]/med[0.0]:.2f}")
