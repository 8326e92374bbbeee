"""The one training loop: an epoch over shuffled batches, an optional measurement, the best epoch kept."""
import copy
import math
import random

import numpy as np
import torch

from common.data import batches

SELECTIONS = ("train-accuracy", "val-accuracy", "last", "train-loss")   # which epoch a training keeps


def seed_everything(seed):
    """Seed Python's, NumPy's and torch's global generators (dropout masks, weight initialisation)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_epoch(model, train_set, step, opt, *, device, batch_size, workers, generator):
    """One pass over `train_set` in a shuffled order; returns the mean loss and the share of images right."""
    model.train()
    seen = correct = 0
    loss_sum = 0.0
    for inputs, targets, _, errors in batches(train_set, batch_size, workers, shuffle=True, generator=generator):
        keep = torch.tensor([not e for e in errors])
        inputs, targets = inputs[keep].to(device), targets[keep].to(device)
        if len(targets) == 0:
            continue
        opt.zero_grad(set_to_none=True)
        loss, right = step(model(inputs), targets)
        loss.backward()
        opt.step()
        seen += len(targets)
        correct += right
        loss_sum += loss.item() * len(targets)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _score(record, select, epoch):
    return {"train-accuracy": record["train_accuracy"], "train-loss": -record["train_loss"], "last": epoch,
            "val-accuracy": record.get("val_accuracy", 0.0)}[select]


def fit(model, train_set, step, validate, *, epochs, device, optimizer, batch_size, seed, workers, select, desc,
        progress, scheduler, monitor=None, position=None, guard=None):
    """Train `model` in place, `step(outputs, targets)` -> (loss, images right), and keep the best epoch by `select`.

    `validate()` (or None) gives the held-out accuracy, `monitor()` a dict to record (neither moves the
    training), `guard(record)` may raise to stop a training gone wrong. `position`: the progress bar's
    line, so that parallel trainings (RQ2 --jobs) each keep their own. Returns one dict per epoch.
    """
    from tqdm import tqdm

    if select == "val-accuracy" and validate is None:
        raise ValueError("select='val-accuracy' needs a val_set")
    seed_everything(seed)
    model.to(device)
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    sched = scheduler(opt) if scheduler else None
    generator = torch.Generator().manual_seed(seed)
    best_score, best_state, history = -math.inf, None, []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", dynamic_ncols=True, disable=not progress, position=position)
    for epoch in bar:
        loss, right = train_one_epoch(model, train_set, step, opt, device=device, batch_size=batch_size,
                                      workers=workers, generator=generator)
        if sched:
            sched.step()
        record = {"epoch": epoch + 1, "train_loss": loss, "train_accuracy": right}
        # Measuring must not move the training: a DataLoader draws its seed from the global generator,
        # which would otherwise shift the dropout masks of every later epoch.
        with torch.random.fork_rng(devices=[]):
            if validate is not None:
                record["val_accuracy"] = validate()
            if monitor is not None:
                record.update(monitor())
        history.append(record)
        if guard is not None:
            guard(record)
        score = _score(record, select, epoch)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def best_epoch(history, select):
    """The epoch (from 1) that `fit` kept under `select`: the first of equal best scores."""
    if select == "train-loss":
        losses = [h["train_loss"] for h in history]
        return 1 + losses.index(min(losses))
    key = {"train-accuracy": "train_accuracy", "val-accuracy": "val_accuracy"}.get(select)
    if key is None:
        return len(history)
    scores = [h[key] for h in history]
    return 1 + scores.index(max(scores))
