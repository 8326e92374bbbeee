"""The DNN's own uncertainty per improvement image, and the ranking an engineer would label first.

Classifiers: scores of the softmax of the logits that the test step already wrote to
improveResult.csv (one column per class), so no new forward pass is needed and either engine's
results serve. GINI is DeepGini's impurity (Feng et al., ISSTA 2020); MARGIN and ENTROPY are the
softmax likelihood and entropy that Weiss and Tonella (ISSTA 2022) found to do as well.
Keypoint regressors have no softmax: their uncertainty is the spread of the decoded keypoints over
seeded forward passes with the model's own dropout layers active (MC dropout).

Every score here is "higher = more uncertain", and `rank` takes the highest first.
"""
import numbers

import numpy as np

from common.errors import HUDDError

CLASS_METHODS = ("GINI", "MARGIN", "ENTROPY")
KEYPOINT_METHOD = "MC-DROPOUT"
MC_PASSES = 20                 # forward passes per image; the spread of 20 samples varies by ~16% (1/sqrt(2*20))
MC_SEED = 0
RESULT_COLUMNS = ("image", "result", "expected", "predicted")   # testModule.results_frame's, before the class scores


# --- softmax scores ------------------------------------------------------------------------------

def _check_logits(logits, source="logits"):
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise HUDDError(f"{source}: expected class scores of shape (images, classes >= 2), got {logits.shape}; "
                        f"uncertainty of a softmax needs two classes or more")
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size:
        raise HUDDError(f"{source}: {bad.size} rows hold NaN or infinite class scores (first: row {bad[0]}); "
                        f"drop the images that could not be read, or rerun the test step")
    return logits


def log_softmax(logits):
    """(N, K) natural-log probabilities, stable for logits of any size (the row maximum is subtracted first)."""
    logits = _check_logits(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits):
    """(N, K) class probabilities; every row sums to 1."""
    return np.exp(log_softmax(logits))


def gini(logits):
    """(N,) Gini impurity 1 - sum_i p_i^2 of each row's softmax: 0 for a certain DNN, 1 - 1/K at most."""
    p = softmax(logits)
    return 1.0 - (p * p).sum(axis=1)


def margin(logits):
    """(N,) gap p_(1) - p_(2) between the two highest softmax probabilities: small = unsure between two classes."""
    p = softmax(logits)
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def entropy(logits):
    """(N,) entropy -sum_i p_i ln p_i of each row's softmax, in nats: 0 when certain, ln K at most."""
    logp = log_softmax(logits)
    return -(np.exp(logp) * logp).sum(axis=1)


def check_method(method):
    if method not in CLASS_METHODS:
        raise HUDDError(f"uncertainty {method!r}: use one of {', '.join(CLASS_METHODS)} for a classifier "
                        f"({KEYPOINT_METHOD} for a keypoint DNN)")
    return method


def uncertainty(logits, method):
    """(N,) scores under `method` (CLASS_METHODS), higher = more uncertain: GINI = gini, ENTROPY = entropy,
    MARGIN = 1 - margin (so that the lowest margin ranks first)."""
    check_method(method)
    if method == "MARGIN":
        return 1.0 - margin(logits)
    return gini(logits) if method == "GINI" else entropy(logits)


# --- ranking -------------------------------------------------------------------------------------

def check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise HUDDError(f"labelling budget {budget!r}: must be a whole number of images, 0 or more")
    return int(budget)


def rank(scores, budget=None):
    """Indices of the `budget` highest scores (all when None), highest first.

    Equal scores keep image order (the lower index first), so a ranking never depends on the sort
    algorithm. NaN scores (images that could not be read) are never selected; a budget above the
    number of scored images returns them all.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise HUDDError(f"uncertainty scores: expected one score per image, got shape {scores.shape}")
    scored = np.flatnonzero(~np.isnan(scores))
    order = scored[np.argsort(-scores[scored], kind="stable")]
    return order if budget is None else order[:check_budget(budget)]


def align_scores(keys, images, scores, source="improveResult.csv"):
    """`scores` (one per entry of `images`) reordered to `keys` (e.g. the assign step's image order).

    An image of `keys` without a score is one HUDDError naming `source`.
    """
    where = {image: i for i, image in enumerate(images)}
    missing = [k for k in keys if k not in where]
    if missing:
        raise HUDDError(f"{source}: no score for {len(missing)} of the {len(keys)} improvement images "
                        f"(first: {missing[0]}); rerun the test step (python HUDD.py -o CASE -step test)")
    scores = np.asarray(scores, dtype=np.float64)
    return scores[[where[k] for k in keys]]


# --- scores from the test step's results ---------------------------------------------------------

def read_class_scores(path, classes=None):
    """(image keys, (N, K) logits) from a result CSV of testModule.write_results (improveResult.csv).

    The class scores are the columns after image,result,expected,predicted, in file order, or the
    columns named by `classes` (the model's classes) when given. Keypoint results, or a file without
    class score columns, are one HUDDError naming the file and what to use instead.
    """
    import pandas as pd

    from testModule import read_results

    frame = read_results(path)
    if "predicted" not in frame.columns:
        raise HUDDError(f"{path}: holds keypoint results, not class scores, so {', '.join(CLASS_METHODS)} cannot "
                        f"rank its images; use -mode {KEYPOINT_METHOD} (a keypoint DNN with dropout layers), "
                        f"HUDD, BL1 or BL2")
    columns = [c for c in frame.columns if c not in RESULT_COLUMNS] if classes is None else [str(c) for c in classes]
    if not columns:
        raise HUDDError(f"{path}: holds no class scores (only {','.join(RESULT_COLUMNS)}); rerun the test step "
                        f"(python HUDD.py -o CASE -step test) to write one score column per class")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise HUDDError(f"{path}: no score column for classes {missing[:5]}; rerun the test step with this model "
                        f"(python HUDD.py -o CASE -step test)")
    logits = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size:
        raise HUDDError(f"{path}: row {bad[0] + 2} ({frame['image'].iloc[bad[0]]}) holds a class score that is "
                        f"not a number; rerun the test step (python HUDD.py -o CASE -step test)")
    return list(frame["image"]), _check_logits(logits, str(path))


def results_scores(path, method, classes=None):
    """(image keys, (N,) uncertainty under `method`) for the rows of a result CSV (read_class_scores)."""
    check_method(method)
    images, logits = read_class_scores(path, classes)
    return images, uncertainty(logits, method)


# --- keypoint DNNs: MC dropout -------------------------------------------------------------------

def dropout_layers(model):
    """The model's dropout modules with a drop probability above 0 (functional dropout is not seen)."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def keypoint_spread(samples):
    """(N,) MC-dropout spread (px) from (T passes, N, K, 2) keypoint coordinates: per keypoint the root
    mean squared distance of its T positions from their mean, averaged over the K keypoints."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 4 or samples.shape[-1] != 2 or samples.shape[0] < 2:
        raise HUDDError(f"keypoint samples: expected shape (passes >= 2, images, keypoints, 2), got {samples.shape}")
    deviation = samples - samples.mean(axis=0, keepdims=True)
    per_keypoint = np.sqrt((deviation ** 2).sum(axis=3).mean(axis=0))
    return per_keypoint.mean(axis=1)


def mc_dropout_spread(model, dataset, device, passes=MC_PASSES, seed=MC_SEED, batch_size=64, workers=0,
                      progress=True, n_points=None, model_name="model file"):
    """(N,) MC-dropout spread (keypoint_spread, px) of each image of `dataset` (a common.data.ImageSet),
    NaN for unreadable images, and {index: reason} for those.

    The model runs in eval mode with only its dropout layers active, `passes` times per batch; each
    batch's passes start from a torch seed derived from (seed, batch number), inside a forked RNG, so
    the same seed, batch size and device give the same spreads and the caller's RNG is untouched.
    Coordinates are decoded as testModule.predict_keypoints decodes them. A model without dropout
    is one HUDDError naming `model_name`.
    """
    import torch

    from common.data import batches
    from testModule import TOP_POINTS, decode_keypoints

    layers = dropout_layers(model)
    if not layers:
        raise HUDDError(f"{model_name}: has no dropout layer, so {KEYPOINT_METHOD} cannot measure its uncertainty; "
                        f"use -mode HUDD, BL1 or BL2 for this keypoint DNN, or train it with dropout")
    if isinstance(passes, bool) or not isinstance(passes, numbers.Integral) or passes < 2:
        raise HUDDError(f"MC-dropout passes {passes!r}: must be a whole number, 2 or more (default {MC_PASSES})")
    n_points = TOP_POINTS if n_points is None else n_points
    device = torch.device(device)
    modes = {m: m.training for m in model.modules()}
    scores, skipped = np.full(len(dataset), np.nan), {}
    model.eval()
    for layer in layers:
        layer.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for number, (inputs, _, indices, errors) in enumerate(
                    batches(dataset, batch_size, workers, desc=KEYPOINT_METHOD, progress=progress)):
                torch.manual_seed(int(np.random.SeedSequence([int(seed), number]).generate_state(1)[0]))
                inputs = inputs.to(device)
                samples = np.stack([decode_keypoints(model(inputs).float().cpu(), n_points) for _ in range(passes)])
                spread = keypoint_spread(samples)
                for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                    if error:
                        skipped[index] = error
                    else:
                        scores[index] = spread[row]
    finally:
        for module, training in modes.items():
            module.train(training)
    return scores, skipped
