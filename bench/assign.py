"""Benchmark of the assign step: improvement images/s of heatmaps + unsafe-set selection, and peak memory.

The model is the gaze case study's DNN shape (SmallAlexNet, 3x48x48, width 16, 8 classes; seeded
random weights), the improvement set N PNG files written once to a temporary folder and read back
through common.data.ImageSet, as the step reads them. Three measurements, each in a fresh process
so that its peak resident memory (ru_maxrss) is its own:

- engine: the LRP engine alone over the same loader (heatmapModule.layer_relevance at one layer),
  the floor of the step;
- assign: the step itself, assignModule.improvement_heatmaps streamed into select_unsafe_set
  (single-linkage distances to every cluster member by matrix products, greedy quota selection);
- assign at N/4, to show that memory does not grow with the size of the improvement set.

The error clusters are E heatmaps of other random images at the same layer with planted cluster
sizes (Dirichlet), so the distance work is E members x the layer's size per improvement image.

    .venv/bin/python bench/assign.py                         # N = 20000, Layer3 and Layer1
    .venv/bin/python bench/assign.py -n 5000 --layers Layer9
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIDE, CLASSES, WIDTH, HIDDEN = 48, 8, 16, 256      # the gaze case study's DNN
DEFAULT_N = 20000
DEFAULT_LAYERS = ("Layer3", "Layer1")               # a mid layer and the largest one (16x48x48)
ERRORS, CLUSTERS = 500, 30


def _model():
    import torch

    sys.path.insert(0, str(ROOT))
    from models.alexnet import SmallAlexNet

    torch.manual_seed(0)
    return SmallAlexNet(num_classes=CLASSES, in_channels=3, input_size=SIDE, width=WIDTH, hidden=HIDDEN).eval()


def write_images(folder, n, seed=0):
    """N smooth random 48x48 RGB PNGs under folder/ImprovementSet/; returns their keys relative to folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = Path(folder) / "ImprovementSet"
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for i in range(n):
        cx, cy, r = rng.uniform(8, 40), rng.uniform(8, 40), rng.uniform(4, 14)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
        pixels = rng.normal(0.5, 0.15, (SIDE, SIDE, 3)) + 0.3 * disc
        name = f"ImprovementSet/{i:06d}.png"
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(Path(folder) / name, compress_level=1)
        keys.append(name)
    return keys


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(kind, folder, n, layer, batch_size, threads):
    import torch

    torch.set_num_threads(threads)
    model = _model()
    import assignModule
    import heatmapModule
    from common.data import ImageSet, ImageSpec, batches

    keys = sorted(p.relative_to(folder).as_posix() for p in (Path(folder) / "ImprovementSet").glob("*.png"))[:n]
    dataset = ImageSet(folder, keys, ImageSpec(3, SIDE, SIDE, (0.5,) * 3, (0.25,) * 3))
    rng = np.random.default_rng(1)
    members = heatmapModule.layer_relevance(model, torch.randn(ERRORS, 3, SIDE, SIDE), layers=[layer])[layer]
    members = members.numpy().reshape(ERRORS, -1)
    labels = rng.choice(CLUSTERS, size=ERRORS, p=rng.dirichlet(np.full(CLUSTERS, 1.0)))
    start, cpu = time.perf_counter(), _cpu_seconds()
    if kind == "engine":
        for inputs, _, _, _ in batches(dataset, batch_size, progress=False):
            heatmapModule.layer_relevance(model, inputs, layers=[layer])
        selected = None
    else:
        stream = assignModule.improvement_heatmaps(model, dataset, layer, batch_size, "cpu", progress=False)
        selected = len(assignModule.select_unsafe_set(members, labels, stream))
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"kind": kind, "n": n, "layer": layer, "dims": int(members.shape[1]), "seconds": seconds,
            "cpu_s": cpu, "images_per_s": n / seconds, "selected": selected,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_child(*args, script=__file__):
    """Run `script --child args` in a fresh interpreter (its own peak memory) and return its JSON line."""
    command = [sys.executable, str(script), "--child", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"benchmark child {args} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=DEFAULT_N, help="improvement images")
    parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="selected layers to measure")
    parser.add_argument("--batch-size", type=int, default=64, help="the pipeline's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, folder, n, layer, batch, threads = args.child
        print(json.dumps(child(kind, Path(folder), int(n), layer, int(batch), int(threads))))
        return

    with tempfile.TemporaryDirectory(prefix="hudd-bench-assign-") as folder:
        start = time.perf_counter()
        write_images(folder, args.n)
        print(f"{os.cpu_count()} CPUs, {args.threads} threads, batch {args.batch_size}; {args.n} improvement PNGs "
              f"written in {time.perf_counter() - start:.0f} s; {ERRORS} error heatmaps in {CLUSTERS} planted clusters")
        print(f"  {'layer':7s} {'dims':>6s} {'run':24s} {'images/s':>9s} {'x engine':>9s} {'CPU s':>7s} "
              f"{'peak GB':>8s} {'selected':>9s}")
        for layer in args.layers:
            small = max(args.n // 4, 1)
            runs = [("engine alone", run_child("engine", folder, args.n, layer, args.batch_size, args.threads)),
                    ("heatmaps + assignment", run_child("assign", folder, args.n, layer, args.batch_size, args.threads)),
                    (f"same, N = {small}", run_child("assign", folder, small, layer, args.batch_size, args.threads))]
            base = runs[0][1]["images_per_s"]
            for label, r in runs:
                selected = "" if r["selected"] is None else str(r["selected"])
                print(f"  {layer:7s} {r['dims']:>6d} {label:24s} {r['images_per_s']:>9.0f} "
                      f"{r['images_per_s'] / base:>9.2f} {r['cpu_s']:>7.1f} {r['peak_rss_gb']:>8.2f} {selected:>9s}")


if __name__ == "__main__":
    main()
