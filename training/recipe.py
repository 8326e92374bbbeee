"""How a model file's weights are retrained, for either task: the recipe, the training, the test it is judged by."""
from dataclasses import dataclass

import numpy as np

from training.classifier import accuracy, train_classifier
from training.keypoints import FROZEN_CONVS, train_keypoints
from training.loop import SELECTIONS
from training.optimisers import DEFAULT_SCHEDULE, SCHEDULES, rmsprop, scheduler, sgd, with_lr

DEFAULT_EPOCHS = 10            # the original's GD and OC case studies (TS 12, OD and HPD 13)
RETRAIN_BATCH_SIZE = 128       # the original's
DEFAULT_HOLDOUT = 0.1          # share of the training set held out when select="val-accuracy"


@dataclass(frozen=True)
class Recipe:
    """A retraining's settings; the defaults are the original's unless noted."""
    epochs: int = DEFAULT_EPOCHS
    select: str = "train-accuracy"   # the kept epoch (SELECTIONS); a keypoint DNN reads it as "train-loss"
    holdout: float = DEFAULT_HOLDOUT  # "val-accuracy": the share of the training set held out to choose by
    device: str = "auto"
    batch_size: int = RETRAIN_BATCH_SIZE
    workers: int = 0
    progress: bool = True
    lr: float = None                 # None: the optimiser's own 1e-3 (SGD; RMSprop for keypoints)
    schedule: str = DEFAULT_SCHEDULE  # "cosine" falls to 0 over the epochs; "constant" is the original's
    freeze: int = FROZEN_CONVS       # keypoints: the first convolutions left untrained
    threshold: float = None          # keypoints: px within which an image counts as right
    monitor_test: bool = False       # record the test accuracy per epoch (a diagnosis, never selects)

    def check(self):
        from common.errors import HUDDError

        if self.select not in SELECTIONS:
            raise HUDDError(f"select {self.select!r}: use one of {', '.join(SELECTIONS)}")
        if self.schedule not in SCHEDULES:
            raise HUDDError(f"--schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")


def task_selection(select, keypoints):
    """The epoch selection a task trains with: a keypoint DNN's "train-accuracy" is its training loss."""
    return "train-loss" if keypoints and select == "train-accuracy" else select


def holdout_split(n, recipe, seed):
    """(indices trained on, indices held out or None) of a training set of `n` images: a seeded
    `recipe.holdout` share is held out when the recipe keeps its epoch by "val-accuracy"."""
    from common.errors import HUDDError

    if recipe.select != "val-accuracy":
        return list(range(n)), None
    if not 0 < recipe.holdout < 1:
        raise HUDDError(f"holdout {recipe.holdout}: must be between 0 and 1 (e.g. 0.1)")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(recipe.holdout * n)))
    return sorted(order[held:]), sorted(order[:held])


def train_by_recipe(model, train_set, recipe, *, keypoints, seed, val_set=None, test_set=None, desc="retrain",
                    position=None):
    """Train `model` in place as `recipe` says for its task; returns its history (one dict per epoch).

    A classifier: SGD and cross-entropy; a keypoint regressor: the original's retrainKP (RMSprop, MSE
    on Gaussian target maps, the first `freeze` convolutions frozen). `test_set` is measured each
    epoch when `recipe.monitor_test`."""
    common = dict(epochs=recipe.epochs, device=recipe.device, batch_size=recipe.batch_size, seed=seed,
                  workers=recipe.workers, val_set=val_set, desc=desc, progress=recipe.progress,
                  scheduler=scheduler(recipe.schedule, recipe.epochs), position=position,
                  select=task_selection(recipe.select, keypoints))
    if keypoints:
        monitor = (lambda: {"test_accuracy": float(np.mean(keypoint_test(model, test_set, recipe)[0] <=
                                                           recipe.threshold))}) if recipe.monitor_test else None
        return train_keypoints(model, train_set, optimizer=with_lr(rmsprop, recipe.lr), threshold=recipe.threshold,
                               freeze=recipe.freeze, monitor=monitor, **common)
    monitor = (lambda: {"test_accuracy": accuracy(model, test_set, recipe.device, recipe.batch_size,
                                                  recipe.workers)}) if recipe.monitor_test else None
    return train_classifier(model, train_set, optimizer=with_lr(sgd, recipe.lr), monitor=monitor, **common)


def keypoint_test(model, test_set, recipe):
    """(mean keypoint error per test image, the indices of unreadable images)."""
    import testModule

    coords, _, skipped = testModule.predict_keypoints(model, test_set, recipe.device, recipe.batch_size,
                                                      recipe.workers, progress=False)
    return testModule.mean_errors(testModule.keypoint_errors(coords, np.stack(test_set.targets))), skipped


def test_by_recipe(model, test_set, recipe, *, keypoints):
    """(per test image: the model gets it right, the mean keypoint errors or None for a classifier).

    An unreadable image counts as wrong; a keypoint image is right within `recipe.threshold` px."""
    import testModule

    if keypoints:
        errors, skipped = keypoint_test(model, test_set, recipe)
        readable = np.array([i not in skipped for i in range(len(test_set))])
        return readable & (errors <= recipe.threshold), errors
    logits, skipped = testModule.predict(model, test_set, recipe.device, recipe.batch_size, recipe.workers)
    return np.array([i not in skipped and int(np.argmax(row)) == t
                     for i, (row, t) in enumerate(zip(logits, test_set.targets))]), None


def save_retrained(target, model, meta, base_model, info):
    """Write a retrained model to `target` with its base model's metadata, `info` under extra["retrained"]."""
    import models
    from common.files import save_torch

    if meta.get("trusted_pickle"):
        save_torch(target, model.cpu())
        return target
    extra = dict(meta.get("extra") or {})
    extra["retrained"] = dict(info, base_model=base_model)
    models.save_model(target, model, meta["arch"], meta["classes"], meta["input_size"], meta["mean"], meta["std"],
                      arch_args=meta.get("arch_args"), task=meta.get("task", "classification"),
                      preprocess=meta.get("preprocess", "exact"), extra=extra)
    return target
