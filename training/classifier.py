"""Training and measuring an image classifier: cross-entropy over the shared loop."""
import torch
from torch import nn

from common.data import batches
from training.loop import fit
from training.optimisers import sgd


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
                     select="train-accuracy", val_set=None, desc="train", progress=True, scheduler=None,
                     monitor=None, position=None, guard=None):
    """Train `model` in place with cross-entropy and keep its best epoch.

    `select` is "train-accuracy" (the original: best epoch by training accuracy, no validation),
    "val-accuracy" (best by accuracy on `val_set`) or "last". Returns the history, one dict per epoch;
    the model ends with the best epoch's weights. `monitor()`, if given, is called after every epoch
    and its dict is recorded in the history (e.g. the test accuracy, for a diagnosis; never selects).
    `guard(record)`, if given, sees each epoch's record and may raise to stop a training gone wrong.
    """
    loss_fn = nn.CrossEntropyLoss()

    def step(outputs, targets):
        return loss_fn(outputs, targets), (outputs.argmax(1) == targets).sum().item()

    validate = (lambda: accuracy(model, val_set, device, workers=workers)) if val_set is not None else None
    return fit(model, train_set, step, validate, epochs=epochs, device=device, optimizer=optimizer,
               batch_size=batch_size, seed=seed, workers=workers, select=select, desc=desc, progress=progress,
               scheduler=scheduler, monitor=monitor, position=position, guard=guard)
