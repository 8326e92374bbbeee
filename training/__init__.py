"""The training loops shared by the case builders, HUDD's retraining and any later search.

loop: the one epoch loop (`fit`), the kept epoch, seeding; classifier and keypoints: what a task's
step computes on top of it; optimisers: optimisers and schedules; history: the per-epoch plot.
"""
from training.classifier import accuracy, train_classifier
from training.history import HISTORY_CURVES, write_history_plot
from training.keypoints import (FROZEN_CONVS, GAUSSIAN_SCALE, GAUSSIAN_SIGMA, freeze_convolutions, gaussian_targets,
                                train_keypoints)
from training.loop import SELECTIONS, best_epoch, fit, seed_everything, train_one_epoch
from training.optimisers import DEFAULT_SCHEDULE, SCHEDULES, adam, rmsprop, scheduler, sgd, with_lr

__all__ = ["accuracy", "train_classifier", "HISTORY_CURVES", "write_history_plot", "FROZEN_CONVS", "GAUSSIAN_SCALE",
           "GAUSSIAN_SIGMA", "freeze_convolutions", "gaussian_targets", "train_keypoints", "SELECTIONS", "best_epoch",
           "fit", "seed_everything", "train_one_epoch", "DEFAULT_SCHEDULE", "SCHEDULES", "adam", "rmsprop",
           "scheduler", "sgd", "with_lr"]
