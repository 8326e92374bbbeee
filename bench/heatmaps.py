"""Benchmark of the LRP engine: images/s against a plain forward+backward, zennit and captum.

Faithful AlexNet (random weights) at 3x256x256, batch 32, 2 threads by default. "plain" is the floor
any LRP has to pay: one forward and the input gradient of the predicted logit. Each method runs in
its own process, alternating batch by batch with plain, so that its ratio is paired (same process,
same minutes of machine load) and no library's leftovers (captum keeps every layer's activations,
the heap grows) slow another. Besides wall-clock images/s it reports the process CPU time per batch,
which other jobs on a shared machine disturb less. A missing library is skipped with a note.

    .venv/bin/python bench/heatmaps.py                   # 3 timed rounds per method
    .venv/bin/python bench/heatmaps.py --repeat 10 --only engine-kept

Every method runs with the allocator setting the tool itself uses (common.memory.retain_freed_memory:
glibc keeps freed memory for the next batch instead of faulting it in again), applied in each worker
before anything is timed, so plain and every library get it alike. --system-allocator measures with
glibc's defaults instead, where returning and re-faulting ~120 MB of relevance per batch costs the
engine (which holds all kept layers until the batch ends) more than plain.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 8
TARGET_RATIO = 0.9
METHODS = {   # key: (label, needs)
    "engine-kept": ("engine hudd, all kept layers", None),
    "engine-input": ("engine hudd, input only", None),
    "engine-compat": ("engine hudd-compat, all kept layers", None),
    "engine-composite": ("engine composite, input only", None),
    "zennit": ("zennit 0.5.1 EpsilonPlus, input only", "zennit"),
    "captum": ("captum LRP, input only", "captum"),
}


def plain(model, x):
    import torch

    x = x.clone().requires_grad_(True)
    out = model(x)
    winner = out.argmax(1, keepdim=True)
    return torch.autograd.grad(out.gather(1, winner).sum(), x)[0]


def predicted_logit(out):
    import torch

    winner = out.argmax(1, keepdim=True)
    return torch.zeros_like(out).scatter_(1, winner, out.gather(1, winner))


def make_method(key, model, size):
    """The callable (model, x) for one method, or raise ImportError for a missing library."""
    import torch

    import heatmapModule as hm

    kept = [row["layer"] for row in hm.layer_table(model, (3, size, size)) if row["kept"]]
    if key == "engine-kept":
        return lambda m, x: hm.layer_relevance(m, x, "hudd", layers=kept)
    if key == "engine-input":
        return lambda m, x: hm.layer_relevance(m, x, "hudd", layers=["Layer0"])
    if key == "engine-compat":
        return lambda m, x: hm.layer_relevance(m, x, "hudd-compat", layers=kept)
    if key == "engine-composite":
        return lambda m, x: hm.layer_relevance(m, x, "composite", layers=["Layer0"])
    if key == "zennit":
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlus

        def run(m, x):
            with Gradient(model=m, composite=EpsilonPlus()) as attributor:
                return attributor(x, predicted_logit)[1]
        return run
    if key == "captum":
        from captum.attr import LRP

        def run(m, x):
            with torch.no_grad():
                target = m(x).argmax(1)
            try:
                return LRP(m).attribute(x, target=target)
            finally:
                for module in m.modules():          # captum 0.9 leaves each layer's activations behind
                    module.__dict__.pop("activations", None)
        return run
    raise KeyError(key)


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(key, batch, size, threads, repeat, system_allocator=False):
    """Time `key` and plain alternately in this process; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    if system_allocator:
        os.environ["HUDD_RETAIN_MEMORY"] = "0"
    from common.memory import retain_freed_memory

    retaining = retain_freed_memory()
    import torch

    from models.alexnet import AlexNet

    warnings.filterwarnings("ignore", category=UserWarning)     # captum's notes on input gradients
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AlexNet(num_classes=NUM_CLASSES, input_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    try:
        method = make_method(key, model, size)
    except ImportError as exc:
        print(json.dumps({"skipped": str(exc)}))
        return
    runs = {"plain": plain, key: method}
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for round_ in range(repeat + 1):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            run(model, x)
            if round_:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(_cpu_seconds() - start_cpu)
    print(json.dumps({"wall": wall, "cpu": cpu, "torch": torch.__version__, "retaining": retaining}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--only", nargs="*", choices=sorted(METHODS), help="methods to run (default: all)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="glibc's default thresholds instead of the tool's (common.memory)")
    parser.add_argument("--worker", choices=sorted(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.size, args.threads, args.repeat, args.system_allocator)
        return

    rows, plain_rates, version, retained = [], [], "?", set()
    for key in args.only or METHODS:
        label = METHODS[key][0]
        command = [sys.executable, __file__, "--worker", key, "--batch", str(args.batch), "--size", str(args.size),
                   "--threads", str(args.threads), "--repeat", str(args.repeat)]
        if args.system_allocator:
            command.append("--system-allocator")
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
            rows.append((label, f"failed: {error}"))
            continue
        result = json.loads(lines[-1])
        if "skipped" in result:
            rows.append((label, f"skipped: {result['skipped']} (pip install it to compare)"))
            continue
        version = result["torch"]
        retained.add(result["retaining"])
        wall = {name: statistics.median(v) for name, v in result["wall"].items()}
        cpu = {name: statistics.median(v) for name, v in result["cpu"].items()}
        plain_rates.append(args.batch / wall["plain"])
        rows.append((label, args.batch / wall[key], wall["plain"] / wall[key], cpu[key], cpu["plain"] / cpu[key]))

    print(f"AlexNet 3x{args.size}x{args.size}, batch {args.batch}, {args.threads} threads, median of "
          f"{args.repeat} rounds, each method paired with plain in its own process (torch {version})")
    allocator = ("freed memory kept (the tool's setting, common.memory)" if retained == {True}
                 else "glibc defaults" if retained == {False} else "mixed")
    print(f"  allocator: {allocator}")
    if plain_rates:
        print(f"  plain forward+backward: {statistics.median(plain_rates):.1f} images/s "
              f"(median over the method processes; range {min(plain_rates):.1f}-{max(plain_rates):.1f})")
    print(f"  {'method':38s} {'images/s':>8s} {'x plain':>8s} {'CPU s/batch':>12s} {'x plain (CPU)':>14s}")
    for row in rows:
        if isinstance(row[1], str):
            print(f"  {row[0]:38s} {row[1]}")
        else:
            label, rate, ratio, used, ratio_cpu = row
            print(f"  {label:38s} {rate:8.1f} {ratio:8.2f} {used:12.2f} {ratio_cpu:14.2f}")
    kept = next((row for row in rows if row[0] == METHODS["engine-kept"][0] and not isinstance(row[1], str)), None)
    if kept is not None:
        verdict = "met" if kept[2] >= TARGET_RATIO else "NOT met"
        print(f"target: all kept layers >= {TARGET_RATIO} x plain: {verdict} ({kept[2]:.2f} wall, {kept[4]:.2f} CPU)")


if __name__ == "__main__":
    main()
