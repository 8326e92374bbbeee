"""Benchmark of RQ2 --jobs: wall time of the same repetitions, modes one after another with every
CPU's thread in one process, against modes at once in one-thread processes.

Runs on a real case folder after the assign step (e.g. one built by `python -m casestudies fmnist`),
so the DNN and the data are the ones RQ2 retrains. Each configuration works in its own temporary
copy of the case folder (DataSets/ linked, not copied; no earlier repetition to resume) and in a
fresh interpreter, so that its torch threads are its own.

    .venv/bin/python bench/rq2_jobs.py --case cases/fmnist                 # 1 epoch, 1 repetition, 3 modes
    .venv/bin/python bench/rq2_jobs.py --case cases/gaze --epochs 2 --jobs 1 2 3
"""
import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from assign import run_child  # noqa: E402


def scratch_copy(case, folder, model):
    """A copy of `case` under `folder` with DataSets/ linked and no retraining results to resume."""
    import retrainModule

    retrained = ("retrain_*", "RQ2*", *(f"{mode}_*" for mode in retrainModule.MODES), "DataSets", ".lock", "report*")
    target = Path(folder) / Path(case).name
    shutil.copytree(case, target, ignore=shutil.ignore_patterns(*retrained))
    (target / "DataSets").symlink_to(Path(case).resolve() / "DataSets", target_is_directory=True)
    return target, target / "DNNModels" / model


def child(case, model, jobs, threads, reps, epochs, modes):
    import torch

    sys.path.insert(0, str(ROOT))
    import retrainModule
    from evaluation.rq2_runs import run_rq2

    torch.set_num_threads(threads)
    start = time.perf_counter()
    _, results = run_rq2(case, model, modes, reps=reps, jobs=jobs, threads=threads, retrain=retrainModule.retrain,
                         known_modes=retrainModule.MODES, epochs=epochs, progress=False)
    wall = time.perf_counter() - start
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "accuracy": results["test_accuracy"].tolist()}


def main(argv=None):
    from evaluation.rq2_runs import threads_per_job

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="a case folder after the assign step (required)")
    parser.add_argument("--model", default="OriginalModel.pth")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--modes", default="HUDD,BL1,BL2")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 3], help="configurations; 1 = serial, the baseline")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, model, jobs, threads, reps, epochs, modes = args.child
        print(json.dumps(child(case, model, int(jobs), int(threads), int(reps), int(epochs), modes.split(","))))
        return
    if not args.case:
        parser.error("--case CASE is required")
    if not (Path(args.case) / "T" / "UnsafeSet" / "unsafe.csv").is_file():
        raise SystemExit(f"{args.case}: no T/UnsafeSet/unsafe.csv; run HUDD.py -o {args.case} -step assign first")
    cpus = threads_per_job(1)
    modes = args.modes.split(",")
    print(f"RQ2 on {args.case}: {args.reps} repetition(s) x {len(modes)} modes x {args.epochs} epoch(s), "
          f"{cpus} usable CPUs, load average before {os.getloadavg()[0]:.2f}")
    print(f"  {'jobs':>4s} {'threads/job':>11s} {'wall s':>8s} {'x serial':>8s} {'cpu s':>8s}  test accuracy per repetition")
    baseline = None
    for jobs in args.jobs:
        threads = threads_per_job(min(jobs, len(modes)))
        with tempfile.TemporaryDirectory(prefix="hudd-bench-rq2-") as folder:
            case, model = scratch_copy(args.case, folder, args.model)
            r = run_child(case, model, jobs, threads, args.reps, args.epochs, ",".join(modes), script=__file__)
        baseline = baseline or r["wall_s"]
        accuracy = " ".join(f"{100 * a:.2f}" for a in r["accuracy"])
        print(f"  {jobs:>4d} {threads:>11d} {r['wall_s']:>8.1f} {baseline / r['wall_s']:>8.2f} {r['cpu_s']:>8.1f}  {accuracy}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
