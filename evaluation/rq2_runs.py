"""RQ2's repetitions: every mode retrained `reps` times with the same seeds, one after another or in processes."""
import os

import pandas as pd

from common.errors import HUDDError
from evaluation.statistics import write_rq2


def run_rq2(case_dir, model_path, modes, reps=10, jobs=1, threads=None, *, retrain, known_modes, **options):
    """RQ2: `reps` retrainings per mode with the same seeds per repetition, then write_rq2. Returns (table, results).

    `retrain(case_dir, model_path, mode, reps=, resume=, bar_position=, **options)` is the retraining
    step (retrainModule.retrain), `known_modes` its modes in the order the table lists them. `options`
    go to retrain (seed, epochs, select, budget_factor, device, batch_size, ...). Repetitions finished by
    an earlier, interrupted run with the same inputs are kept, not retrained.
    `jobs` > 1 retrains up to that many modes at once, each in its own process with `threads` torch
    threads (None: the usable CPUs divided by the jobs): on a CPU a small DNN keeps two cores busier as
    two one-thread processes than as one two-thread process. Each mode writes only its own files, so
    the results are those of a serial run with the same threads.
    """
    unknown = [m for m in modes if m not in known_modes]
    if unknown or not modes:
        raise HUDDError(f"-modes {','.join(modes)}: use a comma-separated subset of {','.join(known_modes)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise HUDDError(f"--jobs {jobs!r}: use a positive integer (1 retrains the modes one after another)")
    jobs = min(jobs, len(modes))
    calls = [dict(case_dir=case_dir, model_path=model_path, mode=mode, reps=reps, resume=True, **options)
             for mode in modes]
    if jobs == 1:
        frames = [retrain(**call) for call in calls]
    else:
        frames = run_in_processes(retrain, [dict(call, bar_position=i) for i, call in enumerate(calls)], jobs,
                                  threads or threads_per_job(jobs))
    results = pd.concat(frames, ignore_index=True)
    reference = "HUDD" if "HUDD" in modes else modes[0]
    return write_rq2(case_dir, results, reference, order=known_modes), results


def threads_per_job(jobs):
    """Torch threads for each of `jobs` processes sharing the CPUs this process may use (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // jobs)


def run_in_processes(function, calls, jobs, threads):
    """`function(**call)` for every call in `jobs` processes of `threads` torch threads; the results in call order.

    The first call that fails stops the others (what they finished is on disk already) instead of
    letting them train for hours before the error shows.
    """
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    import torch

    context = multiprocessing.get_context("spawn")      # a fork after torch started its threads can hang
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        futures = [pool.submit(function, **call) for call in calls]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            raise failed[0].exception()
        return [future.result() for future in futures]
    except BaseException:
        for process in set(multiprocessing.active_children()) - others:
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
