"""Benchmark of the clustering step at scale: distances + Ward + all-k WICD + knee.

Synthetic heatmaps (default 4,096 dimensions, a 64x64 relevance map) with planted clusters of
unequal sizes: each cluster is a few Gaussian blobs of relevance, each image its cluster's map
with random blob strength and noise. Each N runs in a fresh subprocess so that its peak
resident memory (ru_maxrss, which counts BLAS buffers and mapped files, unlike tracemalloc) is
its own. CPU seconds (user + system, both cores) do not depend on other jobs: on an idle 2-core
machine the wall time is about half of them plus half the single-threaded linkage time. Reports wall time per phase, peak memory, k and the adjusted Rand index against the
planted clusters.

    .venv/bin/python bench/cluster.py                 # N = 1000 5000 20000
    .venv/bin/python bench/cluster.py -n 1000 5000
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = (1000, 5000, 20000)
TARGET_N, TARGET_SECONDS, TARGET_GB = 20000, 120, 8.0   # the target on 2 cores
SIDE = 64                       # 64 x 64 = 4,096 dimensions
PLANTED = 20
BLOBS_PER_CLUSTER = 3
NOISE = 0.05


def planted_heatmaps(n, side=SIDE, clusters=PLANTED, seed=0):
    """(n, side*side) float32 relevance maps and their planted cluster ids 0..clusters-1."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    truth = rng.choice(clusters, size=n, p=weights)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    patterns = np.zeros((clusters, side * side), dtype=np.float32)
    for c in range(clusters):
        for _ in range(BLOBS_PER_CLUSTER):
            cy, cx = rng.uniform(0, side, 2)
            width = rng.uniform(side / 16, side / 6)
            patterns[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2)).ravel()
    strength = rng.uniform(0.6, 1.4, size=(n, 1)).astype(np.float32)
    maps = patterns[truth] * strength
    maps += rng.normal(0.0, NOISE, size=maps.shape).astype(np.float32)
    return maps, truth


def adjusted_rand_index(a, b):
    """ARI (Hubert and Arabie) from the contingency table."""
    from scipy.special import comb

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    index = comb(table, 2).sum()
    rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = rows * cols / comb(len(a), 2)
    top = (rows + cols) / 2
    return float((index - expected) / (top - expected)) if top != expected else 1.0


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(n, seed):
    sys.path.insert(0, str(ROOT))
    import clusterModule as cm
    import kneed  # noqa: F401  (its import takes about 2 s once per process; not part of the per-N cost)

    maps, truth = planted_heatmaps(n, seed=seed)
    timings = {}
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    distances = cm.pairwise_distances(maps, progress=False)
    timings["distances_s"] = time.perf_counter() - start
    del maps
    start = time.perf_counter()
    result = cm.cluster_layer(distances, progress=False)
    timings["clustering_s"] = time.perf_counter() - start
    timings["total_s"] = timings["distances_s"] + timings["clustering_s"]
    timings["cpu_s"] = _cpu_seconds() - cpu_before
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "dims": SIDE * SIDE, "planted": int(len(np.unique(truth))), "k": int(result["k"]),
            "knee_method": result["knee_method"], "k_max": int(result["ks"][-1]),
            "ari": adjusted_rand_index(truth, result["labels"]),
            "ari_at_planted_k": adjusted_rand_index(truth, cm.cut(result["linkage"], len(np.unique(truth)))),
            "peak_rss_gb": peak_kb / 1e6, **{k: round(v, 2) for k, v in timings.items()},
            "phases_s": result["timings"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, nargs="+", default=list(DEFAULT_SIZES), help="numbers of error images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.seed)))
        return
    print(f"{os.cpu_count()} CPUs; the machine may be shared, so times are upper bounds")
    print(f"{'N':>7} {'dist s':>7} {'clust s':>8} {'total s':>8} {'CPU s':>7} {'peak GB':>8} {'k':>4} {'kmax':>5} "
          f"{'ARI':>6} {'ARI@planted':>11}  knee")
    for n in args.n:
        done = subprocess.run([sys.executable, __file__, "--child", str(n), "--seed", str(args.seed)],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{n:>7} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['n']:>7} {r['distances_s']:>7.1f} {r['clustering_s']:>8.1f} {r['total_s']:>8.1f} {r['cpu_s']:>7.1f} "
              f"{r['peak_rss_gb']:>8.2f} {r['k']:>4} {r['k_max']:>5} {r['ari']:>6.3f} {r['ari_at_planted_k']:>11.3f}"
              f"  {r['knee_method']} (planted {r['planted']})")
        print(f"{'':>7} clustering phases (s): {r['phases_s']}")
        if r["n"] == TARGET_N:
            met = r["total_s"] <= TARGET_SECONDS and r["peak_rss_gb"] <= TARGET_GB
            print(f"target: N = {TARGET_N} in at most {TARGET_SECONDS} s and {TARGET_GB:.0f} GB: "
                  f"{'met' if met else 'NOT met'} ({r['total_s']:.0f} s, {r['peak_rss_gb']:.2f} GB)")


if __name__ == "__main__":
    main()
