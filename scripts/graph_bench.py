"""BAG-CLIP's graph on its own: the cost of SAG (width reduction, graph construction, GCN) per
image at given node counts, median of interleaved rounds, on one device. The paper (Table 4): 11 ms per
518-px image (1369 nodes) on an A6000, 3.84 GFLOPs to build the graph, 7.18 G to propagate.

Inputs are random x_detail features of the given width (default ViT-L-14-336's: 4 levels x 1024),
so the figure is the graph's cost alone, whatever the weights. Also times the whole trained head
(SAFR, SAG, the per-level JFF projections and the global map) for comparison.

    python scripts/graph_bench.py --nodes 196 1024 1369 --repeats 20 --json graph.json
    python scripts/graph_bench.py --device cuda --dtype bf16 ...   # on a GPU (autocast)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from linewatch.scoring.methods.bagclip.model import (BagClipModel, knn_affinities, normalised_adjacency,
                                                     resolve_neighbours)


def timed_once(step, device: torch.device) -> float:
    """Milliseconds of one ``step()`` call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[196, 1024, 1369])
    parser.add_argument("--width", type=int, default=1024, help="one level's width (ViT-L: 1024, ViT-B: 768)")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1, help="images per call (the figure is per image)")
    parser.add_argument("--neighbours", type=float, default=15, help="K (a whole number) or a share of the nodes")
    parser.add_argument("--gcn-layers", type=int, default=5)
    parser.add_argument("--graph-width", type=int, default=464)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the head")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    neighbours = int(args.neighbours) if args.neighbours >= 1 else args.neighbours
    torch.manual_seed(0)
    model = BagClipModel(args.width, args.levels, args.embed_dim, torch.randn(args.width, args.embed_dim),
                         neighbours, args.gcn_layers, args.graph_width).to(device).eval()
    autocast = (torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
                if args.dtype != "fp32" else torch.autocast(device.type, enabled=False))
    steps = {}  # node count -> {part: step}
    with torch.inference_mode(), autocast:
        for count in args.nodes:
            levels = [torch.randn(args.batch, count, args.width, device=device) for _ in range(args.levels)]
            image = torch.randn(args.batch, args.embed_dim, device=device)
            detail = model.detail(levels)
            nodes = model.reduce(detail)
            k = resolve_neighbours(neighbours, count)
            adjacency = normalised_adjacency(knn_affinities(nodes, k))
            steps[count] = k, {
                "reduction": lambda detail=detail: model.reduce(detail),
                "construction": lambda nodes=nodes, k=k: normalised_adjacency(knn_affinities(nodes, k)),
                "gcn": lambda nodes=nodes, adjacency=adjacency: model.gcn(nodes, adjacency),
                "sag": lambda detail=detail: model.graph(detail),
                "head": lambda levels=levels, image=image: model(levels, image),
            }
        # rounds interleave every node count and part, so a load that comes and goes (a shared
        # machine) falls on all of them alike: compare within one run
        times = {(count, name): [] for count, (_, parts) in steps.items() for name in parts}
        for round_ in range(args.repeats + 2):  # the first two are warm-ups
            for count, (_, parts) in steps.items():
                for name, step in parts.items():
                    ms = timed_once(step, device)
                    if round_ >= 2:
                        times[count, name].append(ms / args.batch)
    rows = []
    for count, (k, parts) in steps.items():
        row = {"nodes": count, "k": k, **{f"{name}_ms": round(statistics.median(times[count, name]), 3) for name in parts}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch,
              "width": args.width, "levels": args.levels, "graph_width": args.graph_width,
              "gcn_layers": args.gcn_layers, "repeats": args.repeats, "rows": rows}
    print(f"\nper image, median of {args.repeats} interleaved rounds ({report['name']}, {report['threads']} threads, {args.dtype}, "
          f"batch {args.batch}; x_detail {args.levels} x {args.width}, graph width {args.graph_width}, "
          f"P {args.gcn_layers})")
    print(f"{'nodes':>6} {'K':>3} {'reduce ms':>10} {'build ms':>9} {'GCN ms':>8} {'SAG ms':>8} {'head ms':>8}")
    for r in rows:
        print(f"{r['nodes']:>6} {r['k']:>3} {r['reduction_ms']:>10.2f} {r['construction_ms']:>9.2f} "
              f"{r['gcn_ms']:>8.2f} {r['sag_ms']:>8.2f} {r['head_ms']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
