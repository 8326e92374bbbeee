"""Benchmark of the LRP engine: images/s against a plain forward+backward, zennit and captum.

Faithful AlexNet (random weights) at 3x256x256, batch 32, 2 threads by default. "plain" is the floor
any LRP has to pay: one forward and the input gradient of the predicted logit. Methods run round-robin
(one batch each per round) so that a change in machine load hits them alike; the median round counts.
Besides wall-clock images/s it reports the process CPU time (user + system) per batch, which other
jobs on a shared machine disturb much less. A missing library (zennit, captum) is skipped with a note.

    .venv/bin/python bench/heatmaps.py                  # 3 timed rounds
    .venv/bin/python bench/heatmaps.py --repeat 10 --batch 32 --threads 2
"""
import argparse
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import heatmapModule as hm  # noqa: E402
from models.alexnet import AlexNet  # noqa: E402

NUM_CLASSES = 8
TARGET_RATIO = 0.9


def plain(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    winner = out.argmax(1, keepdim=True)
    return torch.autograd.grad(out.gather(1, winner).sum(), x)[0]


def predicted_logit(out):
    winner = out.argmax(1, keepdim=True)
    return torch.zeros_like(out).scatter_(1, winner, out.gather(1, winner))


def zennit_method():
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlus
    except ImportError:
        return None, "zennit not installed (pip install zennit==0.5.1)"

    def run(model, x):
        with Gradient(model=model, composite=EpsilonPlus()) as attributor:
            return attributor(x, predicted_logit)[1]
    return run, None


def captum_method():
    try:
        from captum.attr import LRP
    except ImportError:
        return None, "captum not installed (pip install captum; not a project dependency)"

    def run(model, x):
        with torch.no_grad():
            target = model(x).argmax(1)
        return LRP(model).attribute(x, target=target)
    return run, None


def methods(model, size):
    kept = [row["layer"] for row in hm.layer_table(model, (3, size, size)) if row["kept"]]
    found = {
        "plain forward+backward": plain,
        f"engine hudd, {len(kept)} kept layers": lambda m, x: hm.layer_relevance(m, x, "hudd", layers=kept),
        "engine hudd, input only": lambda m, x: hm.layer_relevance(m, x, "hudd", layers=["Layer0"]),
        "engine hudd-compat, kept layers": lambda m, x: hm.layer_relevance(m, x, "hudd-compat", layers=kept),
        "engine composite, input only": lambda m, x: hm.layer_relevance(m, x, "composite", layers=["Layer0"]),
    }
    notes = []
    for name, (run, note) in (("zennit 0.5.1 EpsilonPlus, input only", zennit_method()),
                              ("captum LRP, input only", captum_method())):
        if run is None:
            notes.append(f"skipped {name}: {note}")
        else:
            found[name] = run
    return found, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after one warm-up round")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=UserWarning)     # captum's notes on input gradients
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AlexNet(num_classes=NUM_CLASSES, input_size=args.size).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    found, notes = methods(model, args.size)
    for note in notes:
        print(note)

    times = {name: [] for name in found}
    cpu = {name: [] for name in found}
    failed = {}
    for round_ in range(args.repeat + 1):
        for name, run in found.items():
            if name in failed:
                continue
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            try:
                run(model, x)
            except Exception as exc:      # a third-party library failing on this model is a result
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
                continue
            if round_:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(_cpu_seconds() - start_cpu)

    print(f"AlexNet 3x{args.size}x{args.size}, batch {args.batch}, {args.threads} threads, "
          f"median of {args.repeat} rounds (torch {torch.__version__})")
    base = statistics.median(times["plain forward+backward"])
    base_cpu = statistics.median(cpu["plain forward+backward"])
    print(f"  {'method':40s} {'images/s':>8s} {'x plain':>8s} {'CPU s/batch':>12s} {'x plain (CPU)':>14s}")
    for name in found:
        if name in failed:
            print(f"  {name:40s} failed: {failed[name]}")
            continue
        wall, used = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"  {name:40s} {args.batch / wall:8.1f} {base / wall:8.2f} {used:12.2f} {base_cpu / used:14.2f}")
    kept = next(name for name in found if "kept layers" in name)
    if kept not in failed:
        ratio = base / statistics.median(times[kept])
        ratio_cpu = base_cpu / statistics.median(cpu[kept])
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"target: all kept layers >= {TARGET_RATIO} x plain: {verdict} on wall clock ({ratio:.2f}); "
              f"{ratio_cpu:.2f} by CPU time")


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
