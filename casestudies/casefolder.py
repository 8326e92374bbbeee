"""Writing a case folder safely: staged data sets, a completion marker, no silent overwrite; the original DNN.

Images are written to ``CASE/.DataSets.building`` and renamed to ``CASE/DataSets`` only once every
image, ``params.csv`` and the ``.complete`` marker exist, so a killed build never looks finished:
the next build removes the leftover staging folder and starts again.
"""
import functools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from casestudies.designs import DEFAULT_DESIGN
from common.errors import HUDDError

MARKER = ".complete"
STAGING = ".DataSets.building"
MODEL_FILE = "OriginalModel.pth"
MARKER_KEYS = ("case_study", "seed", "scale", "design")
MARKER_DEFAULTS = {"design": DEFAULT_DESIGN}    # markers written before the key existed hold the default's data
PARALLEL_FROM = 2000        # images; below this a worker pool costs more than it saves


def read_marker(datasets):
    try:
        return json.loads((Path(datasets) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan(case_dir, wanted, force):
    """Decide what to do in `case_dir`: "data" (write data sets, then train) or "train" (data done, model missing).

    Refuses to replace an existing data set or model unless `force`; resumes a build whose data
    sets are complete (same case study, seed and scale) but whose training was interrupted.
    """
    case = Path(case_dir)
    if case.exists() and not case.is_dir():
        raise HUDDError(f"{case}: exists and is not a folder; pass another -o")
    datasets, model = case / "DataSets", case / "DNNModels" / MODEL_FILE
    shutil.rmtree(case / STAGING, ignore_errors=True)      # left over by a killed build
    if force:
        return "data"
    marker = read_marker(datasets)
    if datasets.is_dir() and any(datasets.iterdir()):
        same = marker is not None and all(_marked(marker, k) == _marked(wanted, k) for k in MARKER_KEYS)
        if same and not model.exists():
            return "train"
        what = "a finished build of this case study" if same else "data sets"
        raise HUDDError(f"{datasets}: already holds {what}; pass --force (force=True) to replace it and "
                        f"DNNModels/{MODEL_FILE}, or choose another -o folder")
    if model.exists():
        raise HUDDError(f"{model}: exists; pass --force (force=True) to replace it, or choose another -o folder")
    return "data"


def _marked(marker, key):
    return marker.get(key, MARKER_DEFAULTS.get(key))


def staging_dir(case_dir):
    path = Path(case_dir) / STAGING
    path.mkdir(parents=True)
    return path


def publish(case_dir, staging, marker):
    """Write the marker last, then move the staged data sets into place."""
    (Path(staging) / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    datasets = Path(case_dir) / "DataSets"
    if datasets.exists():
        shutil.rmtree(datasets)
    os.replace(staging, datasets)
    return datasets


def run_chunks(work, chunks, progress, desc, total):
    """Run `work(chunk)` over chunks, in a process pool when there is enough work; results in chunk order."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not progress)
    workers = os.cpu_count() or 1
    results = []
    if total >= PARALLEL_FROM and workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for result, chunk in zip(pool.map(work, chunks), chunks):
                results.append(result)
                bar.update(len(chunk))
    else:
        for chunk in chunks:
            results.append(work(chunk))
            bar.update(len(chunk))
    bar.close()
    return results


def train_original(case_dir, spec, arch_args, epochs, seed, lr, batch_size, progress, marker, threads=None):
    """Train the case study's DNN on the files as written (read back through ImageSet) and save it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _train(case_dir, spec, arch_args, epochs, seed, lr, batch_size, progress, marker)
    finally:
        torch.set_num_threads(previous)


STUCK_AFTER = 3             # epochs: a training still at chance by then has stalled (README, "Built-in case studies")
STUCK_MARGIN = 0.02         # accuracy above the largest class's share that counts as having learned something
ATTEMPTS = 3                # trainings (the first with the seed asked for) before the build gives up


class TrainingStuck(Exception):
    """A training whose accuracy stayed at the largest class's share: the DNN predicts one class."""


def stuck_guard(targets, epochs, after=STUCK_AFTER, margin=STUCK_MARGIN):
    """A `guard` for retrainModule.train_classifier that raises TrainingStuck when, at epoch `after` or
    at the last, the training accuracy is no better than always answering the largest class.

    Trainings shorter than `after` epochs are not checked: --scale small (2 epochs on 320 images) is
    legitimately still near chance when it ends, and it only serves tests."""
    import numpy as np

    chance = float(np.bincount(np.asarray(targets)).max() / len(targets))
    checked = {after, epochs} if epochs >= after else set()

    def guard(record):
        if record["epoch"] in checked and record["train_accuracy"] <= chance + margin:
            raise TrainingStuck(f"training accuracy {record['train_accuracy']:.1%} at epoch {record['epoch']} "
                                f"(largest class {chance:.1%}), loss {record['train_loss']:.3f}")
    return guard


def attempt_seed(seed, attempt):
    """The training seed of attempt 0, 1, 2...: the seed asked for first, then seeds derived from it
    (the same derivation as retrainModule.rep_seed: a restart's initial weights are not a retraining's)."""
    import retrainModule

    return seed if attempt == 0 else retrainModule.rep_seed(seed, attempt)


def _train(case_dir, spec, arch_args, epochs, seed, lr, batch_size, progress, marker, attempts=ATTEMPTS):
    import torch

    import models
    import retrainModule
    from common.data import ImageSet, list_case, resolve_device

    case = Path(case_dir)
    splits = list_case(case, need=("TrainingSet", "TestSet", "ImprovementSet"))
    train = splits["TrainingSet"]
    targets = [train.classes.index(label) for label in train.labels]
    dataset = ImageSet(case / "DataSets", train.images, spec, targets)
    device = resolve_device("auto")
    guard = stuck_guard(targets, epochs)
    failures = []
    for attempt in range(attempts):
        train_seed = attempt_seed(seed, attempt)
        torch.manual_seed(train_seed)   # the initial weights too: the same seed gives the same DNN
        model = models.SmallAlexNet(num_classes=len(train.classes), **arch_args)
        start = time.time()
        try:
            history = retrainModule.train_classifier(
                model, dataset, epochs=epochs, device=device, seed=train_seed, batch_size=batch_size,
                optimizer=functools.partial(retrainModule.adam, lr=lr),
                scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
                desc=f"train {marker['case_study']}", progress=progress, guard=guard)
            break
        except TrainingStuck as exc:
            failures.append(f"seed {train_seed}: {exc}")
            if attempt + 1 < attempts:
                print(f"warning: the {marker['case_study']} DNN stayed at chance with seed {train_seed} ({exc}); "
                      f"training again from seed {attempt_seed(seed, attempt + 1)}", file=sys.stderr, flush=True)
    else:
        raise HUDDError(f"{case}: the {marker['case_study']} DNN stayed at chance in {attempts} trainings "
                        f"({'; '.join(failures)}); build again with another --seed or --threads")
    path = case / "DNNModels" / MODEL_FILE
    models.save_model(path, model, "smallalexnet", classes=train.classes,
                      input_size=(spec.channels, spec.height, spec.width), mean=spec.mean, std=spec.std,
                      arch_args=dict(num_classes=len(train.classes), **arch_args), preprocess="exact",
                      extra={"trained_by": "casestudies", **{k: _marked(marker, k) for k in MARKER_KEYS},
                             "train_seed": train_seed, "restarts": attempt,
                             "epochs": epochs, "final_train_accuracy": history[-1]["train_accuracy"],
                             "train_seconds": round(time.time() - start, 1),
                             "train_accuracy": retrainModule.accuracy(model, dataset, device)})
    return path
