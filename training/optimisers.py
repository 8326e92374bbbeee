"""The optimisers and learning-rate schedules the training loops are given (the original's values are the defaults)."""
import functools

import torch

SCHEDULES = ("constant", "cosine")   # constant = the original's fixed learning rate
DEFAULT_SCHEDULE = "cosine"         # measured on gaze: a constant rate never settles (results/retraining-diagnosis.md)


def sgd(params, lr=1e-3, momentum=0.9, weight_decay=5e-4):
    """HUDD's retraining optimiser (the original's values are the defaults)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def adam(params, lr=1e-3, weight_decay=0.0):
    """The case studies' optimiser for training their DNNs from scratch."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def rmsprop(params, lr=1e-3):
    """The original's keypoint (FLD) retraining optimiser."""
    return torch.optim.RMSprop(params, lr=lr)


def with_lr(optimizer, lr):
    """`optimizer` with its learning rate replaced by `lr` (None keeps the optimiser's default)."""
    return optimizer if lr is None else functools.partial(optimizer, lr=float(lr))


def scheduler(schedule, epochs):
    """The learning-rate schedule of a training: None (constant, the original's) or cosine annealing to 0."""
    if schedule == "cosine":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return None
