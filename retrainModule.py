"""Training: the one loop that trains the case studies' DNNs and retrains them in HUDD, BL1 and BL2."""
import copy

import torch
from torch import nn

from common.data import batches


def sgd(params, lr=1e-3, momentum=0.9, weight_decay=5e-4):
    """HUDD's retraining optimiser (the original's values are the defaults)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def adam(params, lr=1e-3, weight_decay=0.0):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def seed_everything(seed):
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accuracy(model, dataset, device, batch_size=256, workers=0, desc=None):
    """Share of images of `dataset` (an ImageSet with targets) the model classifies right."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets, _, errors in batches(dataset, batch_size, workers, desc=desc):
            keep = torch.tensor([not e for e in errors])
            logits = model(inputs[keep].to(device))
            correct += (logits.argmax(1).cpu() == targets[keep]).sum().item()
            total += int(keep.sum())
    return correct / max(total, 1)


def train_classifier(model, train_set, *, epochs, device, optimizer=sgd, batch_size=128, seed=0, workers=0,
                     select="train-accuracy", val_set=None, desc="train", progress=True, scheduler=None):
    """Train `model` in place with cross-entropy and keep its best epoch.

    `select` is "train-accuracy" (the original: best epoch by training accuracy, no validation),
    "val-accuracy" (best by accuracy on `val_set`) or "last". Returns the history, one dict per epoch;
    the model ends with the best epoch's weights.
    """
    from tqdm import tqdm

    if select == "val-accuracy" and val_set is None:
        raise ValueError("select='val-accuracy' needs a val_set")
    seed_everything(seed)
    model.to(device)
    opt = optimizer(model.parameters())
    sched = scheduler(opt) if scheduler else None
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    best_score, best_state, history = -1.0, None, []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        for inputs, targets, _, errors in batches(train_set, batch_size, workers, shuffle=True, generator=generator):
            keep = torch.tensor([not e for e in errors])
            inputs, targets = inputs[keep].to(device), targets[keep].to(device)
            if len(targets) == 0:
                continue
            opt.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = loss_fn(logits, targets)
            loss.backward()
            opt.step()
            seen += len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            loss_sum += loss.item() * len(targets)
        if sched:
            sched.step()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if val_set is not None:
            record["val_accuracy"] = accuracy(model, val_set, device, workers=workers)
        history.append(record)
        score = {"train-accuracy": record["train_accuracy"], "last": epoch,
                 "val-accuracy": record.get("val_accuracy", 0.0)}[select]
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
