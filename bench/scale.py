"""Benchmark of the engines at scale: the assign step's improvement heatmaps and distances to the clusters
over 100,000 improvement images, on the local engine and on Ray (`--engine ray`) with 1 and 2 workers.

The model is the gaze case study's DNN shape (bench/assign.py: SmallAlexNet, 3x48x48, seeded random
weights), the improvement set N smooth random PNGs written once to a temporary folder, the clusters
500 error heatmaps in 30 planted clusters. Each run is a fresh process calling the engine's
`distances` (engines/), the call the assign step makes; its peak memory is that process's
ru_maxrss and, for Ray, the highest resident memory (VmHWM) of each Ray worker process, summed.
The last two rows repeat local and Ray (2 workers) at N/10: memory must not grow with N, since only
each image's distance to each cluster is kept.

    .venv/bin/python bench/scale.py                    # N = 100000, Layer3
    .venv/bin/python bench/scale.py -n 20000 --workers 1 2 4

On a cluster, start Ray there (`ray start --head` on one node, `ray start --address HEAD:6379` on
the others) and pass `--ray-address auto` from a node of it (the images must be readable by every
node at the same path, e.g. a shared file system).
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from assign import CLUSTERS, ERRORS, SIDE, _model, run_child, write_images  # noqa: E402  (bench/assign.py)

DEFAULT_N = 100_000


class _WorkerMemory(threading.Thread):
    """Samples the peak resident memory (VmHWM) of every Ray worker process while a run lasts."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks, self.stop = {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"ray::" not in cmdline and b"default_worker" not in cmdline:
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
                self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)

    def total_gb(self):
        return sum(self.peaks.values()) / 1e6


def child(engine_name, folder, n, layer, batch_size, workers, address):
    import torch

    import heatmapModule
    from common.data import ImageSet, ImageSpec
    from engines import make_engine

    model = _model()
    keys = sorted(p.relative_to(folder).as_posix() for p in (Path(folder) / "ImprovementSet").glob("*.png"))[:n]
    dataset = ImageSet(folder, keys, ImageSpec(3, SIDE, SIDE, (0.5,) * 3, (0.25,) * 3))
    rng = np.random.default_rng(1)
    members = heatmapModule.layer_relevance(model, torch.randn(ERRORS, 3, SIDE, SIDE), layers=[layer])[layer]
    members = members.numpy().reshape(ERRORS, -1)
    labels = rng.choice(CLUSTERS, size=ERRORS, p=rng.dirichlet(np.full(CLUSTERS, 1.0)))
    monitor = _WorkerMemory()
    started = time.perf_counter()
    engine = make_engine(engine_name, address or None, workers)
    ready = time.perf_counter()
    if engine_name == "ray":
        monitor.start()
    got, cluster_ids, distances = engine.distances(model, dataset, layer, members, labels, batch_size, "cpu",
                                                   progress=False)
    seconds = time.perf_counter() - ready
    monitor.stop.set()
    engine.close()
    return {"engine": engine_name, "workers": workers, "n": len(got), "seconds": seconds,
            "startup_s": ready - started, "images_per_s": len(got) / seconds,
            "driver_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "workers_gb": monitor.total_gb(), "checksum": float(np.nansum(distances))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=DEFAULT_N, help="improvement images")
    parser.add_argument("--layer", default="Layer3", help="the selected layer")
    parser.add_argument("--batch-size", type=int, default=64, help="the pipeline's default")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor counts to measure")
    parser.add_argument("--ray-address", default="", help="join this Ray cluster instead of starting one here")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        engine, folder, n, layer, batch, workers, address = args.child
        print(json.dumps(child(engine, Path(folder), int(n), layer, int(batch), int(workers), address)))
        return

    with tempfile.TemporaryDirectory(prefix="hudd-bench-scale-") as folder:
        start = time.perf_counter()
        write_images(folder, args.n)
        print(f"{os.cpu_count()} CPUs, batch {args.batch_size}, {args.layer}; {args.n} improvement PNGs written in "
              f"{time.perf_counter() - start:.0f} s; {ERRORS} error heatmaps in {CLUSTERS} planted clusters")
        small = max(args.n // 10, 1)
        plan = [("local", 0, args.n)] + [("ray", w, args.n) for w in args.workers] + \
               [("local", 0, small), ("ray", max(args.workers), small)]
        runs = [run_child(engine, folder, n, args.layer, args.batch_size, workers, args.ray_address or "", script=__file__)
                for engine, workers, n in plan]
        base = runs[0]["images_per_s"]
        print(f"  {'engine':14s} {'images':>8s} {'start s':>8s} {'images/s':>9s} {'x local':>8s} {'driver GB':>10s} "
              f"{'workers GB':>11s}")
        for r in runs:
            label = "local" if r["engine"] == "local" else f"ray, {r['workers']} worker{'s' * (r['workers'] > 1)}"
            print(f"  {label:14s} {r['n']:>8d} {r['startup_s']:>8.1f} {r['images_per_s']:>9.0f} "
                  f"{r['images_per_s'] / base:>8.2f} {r['driver_gb']:>10.2f} {r['workers_gb']:>11.2f}")
        sums = [r["checksum"] for r in runs if r["n"] == args.n]
        agree = all(abs(s - sums[0]) <= 1e-5 * abs(sums[0]) for s in sums)
        print(f"  sum of all distances, every engine at N = {args.n}: {'the same' if agree else 'DIFFERENT: '}"
              f"{'' if agree else sums} (to 1e-5 relative)")


if __name__ == "__main__":
    main()
