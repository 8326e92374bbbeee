"""Training: the one loop that trains the case studies' DNNs and retrains them in HUDD, BL1 and BL2."""
import copy
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from common.data import ImageSet, ImageSpec, batches, list_case, resolve_device
from common.errors import HUDDError
from common.files import atomic_path, content_hash, json_digest, save_torch, tree_fingerprint, write_csv
from common.tables import read_table, try_read_table


def sgd(params, lr=1e-3, momentum=0.9, weight_decay=5e-4):
    """HUDD's retraining optimiser (the original's values are the defaults)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def adam(params, lr=1e-3, weight_decay=0.0):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def seed_everything(seed):
    import random

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


def rmsprop(params, lr=1e-3):
    """The original's keypoint (FLD) retraining optimiser."""
    return torch.optim.RMSprop(params, lr=lr)


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
    return _fit(model, train_set, step, validate, epochs=epochs, device=device, optimizer=optimizer,
                batch_size=batch_size, seed=seed, workers=workers, select=select, desc=desc, progress=progress,
                scheduler=scheduler, monitor=monitor, position=position, guard=guard)


GAUSSIAN_SIGMA = 5.0           # px: the original's keypoint target maps
GAUSSIAN_SCALE = 10.0          # their peak value
FROZEN_CONVS = 4               # the original's modifyToTrain froze conv2d_1 to conv2d_4 when retraining


def gaussian_targets(coords, size, sigma=GAUSSIAN_SIGMA, scale=GAUSSIAN_SCALE):
    """(B, K, 2) keypoints (x, y in pixel-index units, NaN = missing) -> (B, K, H, W) target maps:
    scale * exp(-d^2 / (2 sigma^2)) around each keypoint; a missing keypoint's map is all zero."""
    coords = torch.as_tensor(coords, dtype=torch.float32)
    h, w = int(size[0]), int(size[1])
    ys = torch.arange(h, dtype=torch.float32, device=coords.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=coords.device).view(1, 1, 1, w)
    dx = xs - coords[..., 0, None, None]
    dy = ys - coords[..., 1, None, None]
    maps = scale * torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))
    return torch.nan_to_num(maps, nan=0.0)


def freeze_convolutions(model, count=FROZEN_CONVS):
    """Stop training the first `count` convolutions (the original froze KPNet's first four when retraining)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][:count]
    for conv in convs:
        for param in conv.parameters():
            param.requires_grad_(False)
    return len(convs)


def train_keypoints(model, train_set, *, epochs, device, optimizer=rmsprop, batch_size=128, seed=0, workers=0,
                    select="train-loss", val_set=None, desc="train", progress=True, scheduler=None,
                    sigma=GAUSSIAN_SIGMA, scale=GAUSSIAN_SCALE, threshold=None, freeze=0, monitor=None, position=None):
    """Train a keypoint regressor in place: MSE between its output maps and Gaussian target maps.

    train_set yields (image, (K, 2) keypoints with NaN for missing). `select`: "train-loss" (the
    original: lowest mean training loss), "val-accuracy" (share of `val_set` images whose mean error is
    within `threshold`), "train-accuracy" (that share on the training batches) or "last". `freeze`:
    leave the first that many convolutions untrained (the original: 4). History as train_classifier.
    """
    from testModule import DEFAULT_THRESHOLD, decode_keypoints, keypoint_errors, mean_errors, predict_keypoints

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if freeze:
        freeze_convolutions(model, freeze)
    loss_fn = nn.MSELoss()

    def step(outputs, targets):
        loss = loss_fn(outputs, gaussian_targets(targets, outputs.shape[-2:], sigma, scale))
        errors = mean_errors(keypoint_errors(decode_keypoints(outputs.detach().cpu()), targets.cpu().numpy()))
        return loss, int((errors <= threshold).sum())

    def validate():
        coords, _, _ = predict_keypoints(model, val_set, device, workers=workers, progress=False)
        errors = mean_errors(keypoint_errors(coords, np.stack(val_set.targets)))
        return float(np.mean(errors <= threshold))

    return _fit(model, train_set, step, validate if val_set is not None else None, epochs=epochs, device=device,
                optimizer=optimizer, batch_size=batch_size, seed=seed, workers=workers, select=select, desc=desc,
                progress=progress, scheduler=scheduler, monitor=monitor, position=position)


def _fit(model, train_set, step, validate, *, epochs, device, optimizer, batch_size, seed, workers, select, desc,
         progress, scheduler, monitor=None, position=None, guard=None):
    """The one training loop: `step(outputs, targets)` -> (loss, images right); keeps the best epoch by `select`.

    `position`: the progress bar's line, so that parallel trainings (RQ2 --jobs) each keep their own."""
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
        if sched:
            sched.step()
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
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
        score = {"train-accuracy": record["train_accuracy"], "train-loss": -record["train_loss"], "last": epoch,
                 "val-accuracy": record.get("val_accuracy", 0.0)}[select]
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{record['train_accuracy']:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


# --- HUDD steps 6-7: the retraining set, retraining, baselines, repetitions --------------------

DEFAULT_EPOCHS = 10            # the original's GD and OC case studies (TS 12, OD and HPD 13)
MODES = ("HUDD", "BL1", "BL2")
SELECTIONS = ("train-accuracy", "val-accuracy", "last", "train-loss")
SCHEDULES = ("constant", "cosine")   # constant = the original's fixed learning rate
DEFAULT_SCHEDULE = "cosine"         # measured on gaze: a constant rate never settles (README, "Why retraining gains little")
DEFAULT_HOLDOUT = 0.1          # share of the training set held out when select="val-accuracy"
DEFAULT_BUDGET_FACTOR = 1.0    # baselines label as many images as HUDD (the paper); 0.3 = the original code
DEFAULT_RETRAIN_FACTOR = 1.0   # HUDD retrains on the |c| closest unsafe images per cluster (the original's quota)
RETRAIN_BATCH_SIZE = 128       # the original's
ROUND_DIGITS = 9               # factor * n is rounded before ceil so that 0.3 * 10 is 3, not 4
PAD_STREAM = 1                 # padding draws from its own random stream, not the sample's
RETRAIN_COLUMNS = ["mode", "rep", "seed", "n_labelled", "labelled_errors", "precision", "base_error_rate",
                   "n_train_added", "n_distinct_added", "epochs", "best_epoch", "test_accuracy", "original_accuracy",
                   "gain", "improved", "worsened", "improved_per_cluster", "model", "inputs"]
KEYPOINT_COLUMNS = ["mean_error", "original_mean_error", "share_under_threshold", "threshold"]   # px, px, fraction, px


def rep_seed(seed, rep):
    """The seed of repetition `rep`: the same for every mode, different for every repetition."""
    return int(np.random.SeedSequence([int(seed), int(rep)]).generate_state(1)[0])


def retrain_quota(size, factor=DEFAULT_RETRAIN_FACTOR):
    """How many of a cluster's first-ranked unsafe images HUDD retrains on: ceil(factor x |c|).

    factor 1 is the original's; the assign step selects 2 x |c| (--assign-factor), all of which the
    engineer labels, so factor 2 retrains on every labelled image instead of half of them.
    """
    if not factor > 0:
        raise HUDDError(f"--retrain-factor {factor}: must be positive (1 = the original's |c| images per cluster, "
                        f"2 = the whole unsafe set at the default --assign-factor)")
    return int(math.ceil(round(factor * size, ROUND_DIGITS)))


def balance_unsafe_set(unsafe, cluster_sizes, seed, factor=DEFAULT_RETRAIN_FACTOR):
    """HUDD's bootstrap balancing (step 6): per cluster its retrain_quota first-ranked images (|c| at the
    original's factor 1), duplicated up to the largest quota.

    Faithful to the original with its bugs fixed: duplicates are drawn (seeded, with replacement)
    with weight 1 - d_i / sum(d), so closer images are repeated more, and exactly up to the target;
    each image stays in its own cluster; a cluster with one image repeats it.
    Returns DataFrame[image, cluster, duplicate], clusters in ascending order.
    """
    quota = {c: retrain_quota(size, factor) for c, size in cluster_sizes.items()}
    rng = np.random.default_rng(seed)
    present = sorted(int(c) for c in unsafe["cluster"].unique())
    unknown = [c for c in present if c not in cluster_sizes]
    if unknown:
        raise HUDDError(f"unsafe set: clusters {unknown[:5]} are not in the selected layer's clusters.csv; "
                        f"rerun the assign step (python HUDD.py -o CASE -step assign)")
    if not present:
        return pd.DataFrame({"image": [], "cluster": [], "duplicate": []})
    target = max(quota[c] for c in present)
    parts = []
    for cluster in present:
        group = unsafe[unsafe["cluster"] == cluster].sort_values("rank", kind="stable")
        group = group.head(quota[cluster])
        kept = list(group["image"])
        distance = group["distance"].to_numpy(dtype=np.float64)
        weights = None
        if len(kept) > 1 and distance.sum() > 0:
            weights = 1.0 - distance / distance.sum()
            weights /= weights.sum()
        extra = target - len(kept)
        duplicates = [kept[i] for i in rng.choice(len(kept), size=extra, replace=True, p=weights)] if extra else []
        parts.append(pd.DataFrame({"image": kept + duplicates, "cluster": cluster,
                                   "duplicate": [False] * len(kept) + [True] * len(duplicates)}))
    return pd.concat(parts, ignore_index=True)


def baseline_budget(n_labelled, factor=DEFAULT_BUDGET_FACTOR):
    """How many improvement images a baseline may label: factor x the number HUDD asked to label."""
    if not factor > 0:
        raise HUDDError(f"--baseline-budget-factor {factor}: must be positive (1 = HUDD's budget, 0.3 = the "
                        f"original code)")
    return int(math.ceil(round(factor * n_labelled, ROUND_DIGITS)))


def draw_bl2(images, budget, seed):
    """BL2: `budget` distinct improvement images drawn uniformly at random."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(budget, len(images)), replace=False)
    return [images[i] for i in sorted(picks)]


def draw_bl1(images, wrong, budget, seed):
    """BL1: the images the original DNN gets wrong among a BL2 draw from the whole improvement set."""
    wrong_of = dict(zip(images, wrong))
    return [image for image in draw_bl2(images, budget, seed) if wrong_of[image]]


def labelled_images(mode, unsafe, improvement, budget, seed):
    """The improvement images the engineer labels in `mode`: HUDD's unsafe set, or the baselines' random draw
    (BL1 labels the whole draw and keeps only its errors), so that their error shares compare at one budget."""
    return list(unsafe["image"]) if mode == "HUDD" else draw_bl2(list(improvement), budget, seed)


def pad_by_bootstrap(images, size, seed):
    """Duplicate uniformly drawn images (seeded) until the list has `size` entries, as the original padded BL1/BL2."""
    if not images or len(images) >= size:
        return list(images)
    picks = np.random.default_rng([seed, PAD_STREAM]).choice(len(images), size=size - len(images), replace=True)
    return list(images) + [images[i] for i in picks]


def retraining_images(mode, unsafe, cluster_sizes, improvement, wrong, seed, budget_factor=DEFAULT_BUDGET_FACTOR,
                      pad_baselines=True, retrain_factor=DEFAULT_RETRAIN_FACTOR):
    """The improvement images a repetition adds to the training set (with duplicates), and how many were labelled
    (labelled_images lists those).

    HUDD: the balanced unsafe set (retrain_factor x |c| images per cluster); the engineer labelled the
    whole unsafe set. BL1/BL2: a fresh draw of baseline_budget(len(unsafe)) images for this seed; with
    `pad_baselines` (the original) a draw smaller than HUDD's balanced set is bootstrapped up to its
    size, so no mode adds fewer training images.
    """
    if mode not in MODES:
        raise HUDDError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    balanced = balance_unsafe_set(unsafe, cluster_sizes, seed, retrain_factor)
    if mode == "HUDD":
        return list(balanced["image"]), len(unsafe)
    budget = baseline_budget(len(unsafe), budget_factor)
    if mode == "BL2":
        sample = draw_bl2(list(improvement), budget, seed)
    else:
        sample = draw_bl1(list(improvement), list(wrong), budget, seed)
    if pad_baselines:
        sample = pad_by_bootstrap(sample, len(balanced), seed)
    return sample, min(budget, len(improvement))


def read_cluster_members(case_dir):
    """The selected layer's clusters: DataFrame[image, cluster] of the test error images, from T/ClusterAnalysis/."""
    import clusterModule

    t_dir = Path(case_dir) / "T"
    frame = clusterModule.read_summary(t_dir)
    selected = frame[frame["selected"].astype(str).str.lower() == "true"]["layer"].tolist()
    if len(selected) != 1:
        raise HUDDError(f"{t_dir / 'ClusterAnalysis' / 'summary.csv'}: {len(selected)} layers marked selected; "
                        f"rerun the clusters step")
    return clusterModule.read_clusters(t_dir, selected[0])


def read_unsafe(case_dir):
    return read_table(Path(case_dir) / "T" / "UnsafeSet" / "unsafe.csv", required=("image", "cluster", "distance", "rank"),
                      missing_hint="run the assign step first (python HUDD.py -o CASE -step assign)")


def _unsafe_labels(case_dir, unsafe, splits, classes, keypoints=False):
    """Labels of the unsafe set: the class folders (simulated step 5) or the engineer's labels.csv.

    For keypoints, the rows of DataSets/ImprovementSet/labels.csv (which the engineer extends with the
    unsafe set's keypoints in real use, HUDD step 5).
    """
    import assignModule

    improvement = splits["ImprovementSet"]
    if keypoints:
        label_of = _split_labels(improvement)
        todo = [i for i in unsafe["image"] if i not in label_of]
        if todo:
            raise HUDDError(f"{Path(case_dir) / 'DataSets' / 'ImprovementSet' / 'labels.csv'}: no keypoints for "
                            f"{len(todo)} unsafe-set images (first: {todo[0]}); add their rows (image,<keypoint>_x,"
                            f"<keypoint>_y,...) for the images of T/UnsafeSet/unsafe.csv, then rerun -step retrain")
        return {i: label_of[i] for i in unsafe["image"]}
    if not improvement.labelled:
        return assignModule.read_labels(Path(case_dir) / "T", classes)
    label_of = dict(zip(improvement.images, improvement.labels))
    gone = [i for i in unsafe["image"] if i not in label_of]
    if gone:
        raise HUDDError(f"T/UnsafeSet/unsafe.csv: {len(gone)} images are no longer in DataSets/ImprovementSet "
                        f"(first: {gone[0]}); rerun the assign step")
    return {i: label_of[i] for i in unsafe["image"]}


def _holdout_split(n, fraction, seed):
    if not 0 < fraction < 1:
        raise HUDDError(f"holdout {fraction}: must be between 0 and 1 (e.g. 0.1)")
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(fraction * n)))
    return sorted(order[held:]), sorted(order[:held])


def _save_retrained(case_dir, model, meta, model_path, mode, rep, test_accuracy, info):
    """Save DNNModels/<mode>_<rep>_<accuracy>.pth with the original's metadata; drop this rep's older file."""
    import models

    folder = Path(case_dir) / "DNNModels"
    pattern = re.compile(rf"^{re.escape(mode)}_{rep}_\d+(\.\d+)?\.pth$")
    target = folder / f"{mode}_{rep}_{100 * test_accuracy:.2f}.pth"
    if meta.get("trusted_pickle"):
        save_torch(target, model.cpu())
    else:
        extra = dict(meta.get("extra") or {})
        extra["retrained"] = dict(info, base_model=Path(model_path).name)
        models.save_model(target, model, meta["arch"], meta["classes"], meta["input_size"], meta["mean"],
                          meta["std"], arch_args=meta.get("arch_args"), task=meta.get("task", "classification"),
                          preprocess=meta.get("preprocess", "exact"), extra=extra)
    for old in folder.glob(f"{mode}_{rep}_*.pth"):
        if pattern.match(old.name) and old != target and old.resolve() != Path(model_path).resolve():
            old.unlink()
    return target


def _per_cluster(improved_images, members):
    improved = set(improved_images)
    counts = members.assign(hit=members["image"].isin(improved)).groupby("cluster")["hit"].sum()
    return ";".join(f"{int(c)}:{int(n)}" for c, n in counts.items())


def retrain(case_dir, model_path, mode="HUDD", *, reps=1, seed=0, epochs=DEFAULT_EPOCHS, select="train-accuracy",
            holdout=DEFAULT_HOLDOUT, budget_factor=DEFAULT_BUDGET_FACTOR, pad_baselines=True, device="auto",
            batch_size=RETRAIN_BATCH_SIZE, workers=0, progress=True, trust=False, threshold=None, freeze=FROZEN_CONVS,
            lr=None, schedule=DEFAULT_SCHEDULE, monitor_test=False, resume=False, bar_position=None,
            retrain_factor=DEFAULT_RETRAIN_FACTOR):
    """HUDD step 7 (or a baseline), `reps` times: retrain the analysed model on the training set + the mode's images.

    Each repetition starts from the model file's weights, trains with SGD (lr 1e-3, momentum 0.9,
    weight decay 5e-4) for `epochs` epochs and keeps the best epoch by `select` ("train-accuracy":
    the original; "val-accuracy": accuracy on a held-out `holdout` share of the training set; "last").
    `schedule`: "cosine" (the learning rate falls from `lr` to 0 over the epochs, so the last epochs
    settle instead of drifting) or "constant" (the original's). Every epoch's training (and held-out)
    accuracy goes to T/retrain_<mode>_history.csv; `monitor_test` adds the test accuracy per epoch there
    (a diagnosis: it costs a test pass per epoch and never chooses the kept epoch).
    Rows also hold the labelling precision: the share of the images labelled for this mode
    (labelled_images) that the original DNN gets wrong, from improveResult.csv (NaN when unlabelled).
    Saves DNNModels/<mode>_<rep>_<test accuracy %>.pth and T/retrain_<mode>.csv (RETRAIN_COLUMNS, one
    row per repetition, written after each one; test_accuracy a fraction, gain in percentage points;
    improved/worsened = test images whose result changed against testResult.csv). Returns that table.

    A keypoint regressor (task "keypoints") is retrained as the original's retrainKP: RMSprop lr 1e-3,
    MSE on Gaussian target maps, best epoch by training loss ("train-accuracy" means that for it),
    the first `freeze` convolutions frozen (the original's 4; 0 trains all: on the landmarks case study,
    train-all at lr 1e-3 lost 8 points of test accuracy where frozen gained 0.9); `lr` replaces either optimiser's
    learning rate (None: the original's 1e-3); its ground truth comes from the
    splits' labels.csv; test_accuracy is the share of test images whose mean keypoint error is within
    `threshold` px, and KEYPOINT_COLUMNS add the mean keypoint errors before and after.

    resume: keep the rows of an earlier T/retrain_<mode>.csv whose repetition had the same seed and
    inputs (column `inputs`: a digest of the model file, training set, clusters, unsafe set, labels and
    options) and whose model file is still there, and train only the other repetitions (RQ2.py).
    retrain_factor: HUDD's images per cluster, times |c| (retrain_quota; the baselines are padded to
    the balanced set's size, so it changes theirs too).
    """
    import models
    import testModule

    if mode not in MODES:
        raise HUDDError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    if select not in SELECTIONS:
        raise HUDDError(f"select {select!r}: use one of {', '.join(SELECTIONS)}")
    if schedule not in SCHEDULES:
        raise HUDDError(f"--schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if reps < 1 or epochs < 1:
        raise HUDDError(f"reps={reps}, epochs={epochs}: both must be at least 1")
    retrain_quota(1, retrain_factor)
    case_dir = Path(case_dir)
    device = resolve_device(device)
    datasets = case_dir / "DataSets"
    _, meta = models.load_model(model_path, "cpu", trust=trust)
    keypoints = testModule.is_keypoint_task(meta)
    threshold = testModule.DEFAULT_THRESHOLD if threshold is None else float(threshold)
    need = ("TrainingSet", "TestSet", "ImprovementSet")
    if keypoints:
        classes = list(meta["classes"])
        splits = testModule.list_keypoint_case(case_dir, classes, need=need)
        encode = lambda label: label
    else:
        splits = list_case(case_dir, need=need)
        classes = testModule.check_classes(meta, splits, model_path)
        encode = classes.index
    spec = ImageSpec.from_meta(meta)
    unsafe = read_unsafe(case_dir)
    members = read_cluster_members(case_dir)
    cluster_sizes = members["cluster"].value_counts().to_dict()
    tested = testModule.read_results(case_dir / "testResult.csv")
    wrong_of = testModule.errors_of(case_dir / "improveResult.csv")
    base_error_rate = float(np.mean(list(wrong_of.values()))) if wrong_of else float("nan")
    if mode == "HUDD":
        label_of = _unsafe_labels(case_dir, unsafe, splits, classes, keypoints)
        pool, wrong = [], []
    elif not splits["ImprovementSet"].labelled:
        raise HUDDError(f"{datasets / 'ImprovementSet'}: {mode} simulates labelling random improvement images, "
                        f"so it needs the improvement set in class folders; use -mode HUDD for a flat set")
    else:
        improvement = testModule.read_results(case_dir / "improveResult.csv")
        label_of = _split_labels(splits["ImprovementSet"]) if keypoints else \
            dict(zip(improvement["image"], improvement["expected"]))
        labelled = improvement[improvement["result"].isin(["Correct", "Wrong"])]
        pool, wrong = labelled["image"].tolist(), (labelled["result"] == "Wrong").tolist()
    train = splits["TrainingSet"]
    test_images = list(tested["image"])
    test_labels = [_split_labels(splits["TestSet"])[i] for i in test_images] if keypoints else list(tested["expected"])
    test_targets = [encode(label) for label in test_labels]
    was_correct = (tested["result"] == "Correct").to_numpy()
    original_accuracy = float(was_correct.mean())
    test_set = ImageSet(datasets, test_images, spec, test_targets)
    out_csv = case_dir / "T" / f"retrain_{mode}.csv"
    columns = RETRAIN_COLUMNS + (KEYPOINT_COLUMNS if keypoints else [])
    inputs = _inputs_digest(case_dir, model_path, mode, epochs=epochs, select=select, holdout=holdout,
                            budget_factor=budget_factor, pad_baselines=pad_baselines, batch_size=batch_size,
                            threshold=threshold, freeze=freeze if keypoints else None, lr=lr, schedule=schedule,
                            # only when changed, so that the repetitions of earlier runs still resume
                            **({"retrain_factor": retrain_factor} if retrain_factor != DEFAULT_RETRAIN_FACTOR else {}))
    earlier = _finished_reps(out_csv, inputs, case_dir) if resume else {}
    history_csv = case_dir / "T" / f"retrain_{mode}_history.csv"
    old_history = try_read_table(history_csv) if resume else None
    rows, histories = [], []
    for rep in range(1, reps + 1):
        seed_r = rep_seed(seed, rep)
        if earlier.get((rep, seed_r)) is not None:
            rows.append(earlier[(rep, seed_r)])
            if old_history is not None and {"rep", "inputs"} <= set(old_history.columns):
                histories += old_history[(old_history["rep"] == rep) & (old_history["inputs"] == inputs)].to_dict("records")
            print(f"[retrain] {mode} repetition {rep}/{reps} finished in an earlier run "
                  f"({rows[-1]['model']}); kept")
            write_csv(out_csv, pd.DataFrame(rows, columns=columns))
            continue
        added, n_labelled = retraining_images(mode, unsafe, cluster_sizes, pool, wrong, seed_r, budget_factor,
                                              pad_baselines, retrain_factor)
        labelled = labelled_images(mode, unsafe, pool, baseline_budget(len(unsafe), budget_factor), seed_r)
        known = [wrong_of[i] for i in labelled if i in wrong_of]
        labelled_errors = int(sum(known)) if known else None
        images = list(train.images)
        targets = [encode(label) for label in train.labels]
        val_set = None
        if select == "val-accuracy":
            fit, held = _holdout_split(len(images), holdout, seed_r)
            val_set = ImageSet(datasets, [images[i] for i in held], spec, [targets[i] for i in held])
            images, targets = [images[i] for i in fit], [targets[i] for i in fit]
        images += added
        targets += [encode(label_of[i]) for i in added]
        model, _ = models.load_model(model_path, device, trust=trust)
        train_set = ImageSet(datasets, images, spec, targets)
        common = dict(epochs=epochs, device=device, batch_size=batch_size, seed=seed_r, workers=workers,
                      val_set=val_set, desc=f"{mode} rep {rep}/{reps}", progress=progress,
                      scheduler=_scheduler(schedule, epochs), position=bar_position)
        if keypoints:
            select_used = "train-loss" if select == "train-accuracy" else select

            def test_errors():
                coords, _, skipped = testModule.predict_keypoints(model, test_set, device, batch_size, workers,
                                                                  progress=False)
                return testModule.mean_errors(testModule.keypoint_errors(coords, np.stack(test_targets))), skipped

            monitor = (lambda: {"test_accuracy": float(np.mean(test_errors()[0] <= threshold))}) \
                if monitor_test else None
            history = train_keypoints(model, train_set, optimizer=_with_lr(rmsprop, lr), select=select_used,
                                      threshold=threshold, freeze=freeze, monitor=monitor, **common)
            errors, skipped = test_errors()
            now_correct = np.array([i not in skipped for i in range(len(test_images))]) & (errors <= threshold)
        else:
            select_used = select
            monitor = (lambda: {"test_accuracy": accuracy(model, test_set, device, batch_size, workers)}) \
                if monitor_test else None
            history = train_classifier(model, train_set, optimizer=_with_lr(sgd, lr), select=select, monitor=monitor,
                                       **common)
            logits, skipped = testModule.predict(model, test_set, device, batch_size, workers)
            now_correct = np.array([i not in skipped and int(np.argmax(row)) == t
                                    for i, (row, t) in enumerate(zip(logits, test_targets))])
        test_accuracy = float(now_correct.mean())
        improved = [img for img, a, b in zip(test_images, was_correct, now_correct) if not a and b]
        best = _best_epoch(history, select_used)
        info = {"mode": mode, "rep": rep, "seed": seed_r, "epochs": epochs, "best_epoch": best, "select": select_used}
        if keypoints:
            info.update(frozen_convolutions=int(freeze), threshold=threshold)
        saved = _save_retrained(case_dir, model, meta, model_path, mode, rep, test_accuracy, info)
        row = {"mode": mode, "rep": rep, "seed": seed_r, "n_labelled": n_labelled,
               "labelled_errors": labelled_errors,
               "precision": labelled_errors / len(known) if known else float("nan"),
               "base_error_rate": base_error_rate, "n_train_added": len(added), "n_distinct_added": len(set(added)), "epochs": epochs,
               "best_epoch": best, "test_accuracy": test_accuracy, "original_accuracy": original_accuracy,
               "gain": 100 * (test_accuracy - original_accuracy), "improved": len(improved),
               "worsened": int((was_correct & ~now_correct).sum()),
               "improved_per_cluster": _per_cluster(improved, members), "model": saved.name, "inputs": inputs}
        if keypoints:
            row.update({"mean_error": float(np.nanmean(errors)),
                        "original_mean_error": float(tested["avg_error"].astype(float).mean()),
                        "share_under_threshold": test_accuracy, "threshold": threshold})
        rows.append(row)
        histories += [{"mode": mode, "rep": rep, **h, "kept": h["epoch"] == best, "inputs": inputs} for h in history]
        write_csv(history_csv, pd.DataFrame(histories))
        write_history_plot(pd.DataFrame(histories), history_csv.with_suffix(".png"), original_accuracy)
        write_csv(out_csv, pd.DataFrame(rows, columns=columns))
    return pd.DataFrame(rows, columns=columns)


HISTORY_CURVES = (("train_accuracy", "training", "-"), ("val_accuracy", "held-out", "--"), ("test_accuracy", "test", ":"))


def write_history_plot(history, path, original_accuracy=None):
    """One PNG of the accuracies per retraining epoch (every repetition; the kept epoch marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history is None or not len(history):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for rep, part in history.groupby("rep"):
        for column, name, style in HISTORY_CURVES:
            if column in part.columns and part[column].notna().any():
                line, = ax.plot(part["epoch"], 100 * part[column], style, label=f"{name}, rep {rep}")
                kept = part[part["kept"].astype(str) == "True"]
                ax.plot(kept["epoch"], 100 * kept[column], "o", color=line.get_color())
    if original_accuracy is not None:
        ax.axhline(100 * original_accuracy, color="grey", lw=0.8, label="test, before retraining")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{history['mode'].iloc[0]}: accuracy per epoch (dot: kept epoch)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


def _scheduler(schedule, epochs):
    """The learning-rate schedule of a retraining: None (constant, the original's) or cosine annealing to 0."""
    if schedule == "cosine":
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return None



def _inputs_digest(case_dir, model_path, mode, **options):
    """A short digest of everything a repetition's result depends on, but its seed."""
    t = Path(case_dir) / "T"
    parts = {"mode": mode, "options": options, "model": content_hash(model_path),
             "training": tree_fingerprint(Path(case_dir) / "DataSets" / "TrainingSet"),
             "improvement": tree_fingerprint(Path(case_dir) / "DataSets" / "ImprovementSet")}
    for name in ("UnsafeSet/unsafe.csv", "UnsafeSet/labels.csv", "ClusterAnalysis/summary.csv"):
        parts[name] = content_hash(t / name) if (t / name).is_file() else None
    return json_digest(parts)[:16]


def _finished_reps(out_csv, inputs, case_dir):
    """{(rep, seed): row} of an earlier run with the same inputs whose model file still exists."""
    if not out_csv.is_file():
        return {}
    frame = try_read_table(out_csv)
    if frame is None:
        return {}
    if "inputs" not in frame.columns:
        return {}
    frame = frame[(frame["inputs"] == inputs)]
    models_dir = Path(case_dir) / "DNNModels"
    return {(int(row["rep"]), int(row["seed"])): row for row in frame.to_dict("records")
            if (models_dir / row["model"]).is_file()}


def _with_lr(optimizer, lr):
    import functools

    return optimizer if lr is None else functools.partial(optimizer, lr=float(lr))


def _split_labels(split):
    """{image: its keypoints} of a keypoint split (only its labelled images)."""
    return {i: label for i, label in zip(split.images, split.labels) if label is not None}


def _best_epoch(history, select):
    if select == "train-loss":
        losses = [h["train_loss"] for h in history]
        return 1 + losses.index(min(losses))
    key = {"train-accuracy": "train_accuracy", "val-accuracy": "val_accuracy"}.get(select)
    if key is None:
        return len(history)
    scores = [h[key] for h in history]
    return 1 + scores.index(max(scores))


def retrain_summary(frame):
    """What the run summary prints: the mode, mean test accuracy (fraction), mean gain and each repetition's (points)."""
    summary = {"mode": str(frame["mode"].iloc[0]), "reps": int(len(frame)),
               "test_accuracy": float(frame["test_accuracy"].mean()), "gain": float(frame["gain"].mean()),
               "gains": [float(g) for g in frame["gain"]],
               "improved": float(frame["improved"].mean()), "worsened": float(frame["worsened"].mean()),
               "precision": float(frame["precision"].mean()) if "precision" in frame.columns else float("nan")}
    if "mean_error" in frame.columns:
        summary.update(mean_error=float(frame["mean_error"].mean()),
                       original_mean_error=float(frame["original_mean_error"].mean()))
    return summary


# --- RQ2: HUDD against BL1 and BL2 -----------------------------------------------------------

def a12(x, y):
    """Vargha-Delaney A12: the probability that a value of x beats one of y (ties count half)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    greater = (x[:, None] > y[None, :]).sum()
    ties = (x[:, None] == y[None, :]).sum()
    return float((greater + 0.5 * ties) / (x.size * y.size))


def mann_whitney_p(x, y):
    """Two-sided Mann-Whitney U p-value (scipy; exact for small samples without ties)."""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return float("nan")
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def rq2_table(results, reference="HUDD"):
    """Per mode: repetitions, mean/std/min/max of test accuracy (%) and gain (points), and for each
    other mode the Mann-Whitney p-value and A12 of `reference` against it (on test accuracy). For keypoint
    regressors test accuracy is the share of images within the error threshold, and mean_error_* (px) are added."""
    missing = {"mode", "test_accuracy", "gain"} - set(results.columns)
    if missing:
        raise HUDDError(f"RQ2 results: missing columns {sorted(missing)}; pass the retrain_<mode>.csv rows")
    order = [m for m in MODES if m in set(results["mode"])] + sorted(set(results["mode"]) - set(MODES))
    ref = results.loc[results["mode"] == reference, "test_accuracy"].to_numpy()
    rows = []
    for mode in order:
        part = results[results["mode"] == mode]
        acc, gain = 100 * part["test_accuracy"], part["gain"]
        row = {"mode": mode, "reps": len(part)}
        for name, values in (("accuracy", acc), ("gain", gain)):
            row.update({f"{name}_mean": values.mean(), f"{name}_std": values.std(ddof=1) if len(values) > 1 else
                        float("nan"), f"{name}_min": values.min(), f"{name}_max": values.max()})
        if "mean_error" in part.columns and part["mean_error"].notna().any():
            error = part["mean_error"]     # keypoints: mean keypoint error (px); accuracy = share under threshold
            row.update({"mean_error_mean": error.mean(), "mean_error_std": error.std(ddof=1) if len(error) > 1 else
                        float("nan"), "mean_error_min": error.min(), "mean_error_max": error.max()})
        if "precision" in part.columns and part["precision"].notna().any():
            # labelling precision: share of the images labelled for this mode that the original DNN got wrong
            row.update({"precision_mean": part["precision"].mean(), "base_error_rate": part["base_error_rate"].mean()})
        other = part["test_accuracy"].to_numpy()
        row[f"p_value_{reference}_vs"] = float("nan") if mode == reference else mann_whitney_p(ref, other)
        row[f"a12_{reference}_vs"] = float("nan") if mode == reference else a12(ref, other)
        rows.append(row)
    return pd.DataFrame(rows)


def write_rq2(case_dir, results, reference="HUDD"):
    """Write CASE/RQ2.csv, CASE/RQ2.xlsx (table + repetitions) and CASE/RQ2_boxplot.png; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_dir = Path(case_dir)
    table = rq2_table(results, reference)
    write_csv(case_dir / "RQ2.csv", table)
    with atomic_path(case_dir / "RQ2.xlsx") as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            table.to_excel(writer, sheet_name="RQ2", index=False)
            results.to_excel(writer, sheet_name="repetitions", index=False)
    modes = list(table["mode"])
    keypoints = "mean_error" in results.columns and results["mean_error"].notna().any()
    panels = [("test_accuracy", 100, "test images within the threshold (%)" if keypoints else "test accuracy (%)"),
              ("gain", 1, "gain over the original (points)")]
    if keypoints:
        panels.append(("mean_error", 1, "mean keypoint error (px)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (column, scale, title) in zip(axes, panels):
        ax.boxplot([scale * results.loc[results["mode"] == m, column].to_numpy() for m in modes])
        ax.set_xticks(range(1, len(modes) + 1), modes)
        ax.set_title(title)
    fig.suptitle(f"RQ2: {case_dir.name}, {int(table['reps'].max())} repetitions per mode")
    fig.tight_layout()
    with atomic_path(case_dir / "RQ2_boxplot.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return table


def run_rq2(case_dir, model_path, modes=MODES, reps=10, jobs=1, threads=None, **options):
    """RQ2: `reps` retrainings per mode with the same seeds per repetition, then write_rq2. Returns (table, results).

    `options` go to retrain (seed, epochs, select, budget_factor, device, batch_size, ...). Repetitions
    finished by an earlier, interrupted run with the same inputs are kept, not retrained.
    `jobs` > 1 retrains up to that many modes at once, each in its own process with `threads` torch
    threads (None: the usable CPUs divided by the jobs): on a CPU a small DNN keeps two cores busier as
    two one-thread processes than as one two-thread process. Each mode writes only its own files, so
    the results are those of a serial run with the same threads.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise HUDDError(f"-modes {','.join(modes)}: use a comma-separated subset of {','.join(MODES)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise HUDDError(f"--jobs {jobs!r}: use a positive integer (1 retrains the modes one after another)")
    jobs = min(jobs, len(modes))
    if jobs == 1:
        frames = [retrain(case_dir, model_path, mode, reps=reps, resume=True, **options) for mode in modes]
    else:
        frames = _retrain_in_processes(case_dir, model_path, modes, reps, jobs, threads, options)
    results = pd.concat(frames, ignore_index=True)
    reference = "HUDD" if "HUDD" in modes else modes[0]
    return write_rq2(case_dir, results, reference), results


def threads_per_job(jobs):
    """Torch threads for each of `jobs` processes sharing the CPUs this process may use (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // jobs)


def _retrain_in_processes(case_dir, model_path, modes, reps, jobs, threads, options):
    """The modes in `jobs` processes; the first mode that fails stops the others (their finished
    repetitions are on disk already) instead of letting them train for hours before the error shows."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = threads or threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")      # a fork after torch started its threads can hang
    others = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        futures = [pool.submit(retrain, case_dir, model_path, mode, reps=reps, resume=True, bar_position=i,
                               **options) for i, mode in enumerate(modes)]
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
