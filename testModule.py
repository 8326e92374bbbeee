"""Step 'test': run the DNN over the data sets and decide which images are errors."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import ImageSet, ImageSpec
from common.errors import HUDDError
from common.files import write_csv
from common.inference import (TOP_POINTS, decode_keypoints, map_spread, predict, predict_keypoints,  # noqa: F401
                              stack_filled)
from common.tables import read_table
from engines import LocalEngine

RESULT_FILES = {"TrainingSet": "trainResult.csv", "TestSet": "testResult.csv", "ImprovementSet": "improveResult.csv"}
SKIPPED_COLUMNS = ["image", "reason"]


def check_classes(meta, splits, model_path):
    """The model's classes must be the class folders, in the same order.

    A model that names no classes (None or an empty list) takes the class folders' names. The model
    file is recorded in meta["model_file"], so that later checks (its output count) can name it.
    """
    meta["model_file"] = str(model_path)
    folders = next((s.classes for s in splits.values() if s.labelled), None)
    classes = meta.get("classes") or None
    if folders is None:
        if classes is None:
            raise HUDDError(f"{model_path}: the model file names no classes and no split is labelled; "
                            f"re-save the model with models.save_model(..., classes=[...])")
        return list(classes)
    if classes is not None and list(classes) != list(folders):
        raise HUDDError(f"{model_path}: model classes {list(classes)} differ from the class folders "
                        f"{list(folders)} of DataSets/; use the model trained on these classes")
    return list(folders)


def _model_name(meta):
    return (meta or {}).get("model_file") or "model file"


def check_output_count(model, meta, classes, device):
    """One blank input through the model: its output count must be the number of classes.

    Checked before any image is read, so a wrong model fails in a second, not after a pass over the
    training set.
    """
    spec = ImageSpec.from_meta(meta)
    model.eval()
    with torch.no_grad():
        outputs = model(torch.zeros(1, spec.channels, spec.height, spec.width, device=device))
    count = outputs.shape[1] if outputs.dim() >= 2 else outputs.numel()
    if count != len(classes):
        raise HUDDError(f"{_model_name(meta)}: the network has {count} outputs but there are {len(classes)} "
                        f"class folders ({', '.join(classes)}); use a model trained on these class folders")


def results_frame(images, labels, classes, logits, model_name="model file"):
    """The original's CSV layout: image,result,expected,predicted,<logit per class> (full precision)."""
    if logits.shape[1] != len(classes):
        raise HUDDError(f"{model_name}: the network has {logits.shape[1]} outputs but there are {len(classes)} "
                        f"classes ({', '.join(classes)}); use a model trained on these class folders")
    predicted = [classes[i] for i in logits.argmax(1)]
    if labels and labels[0] is not None:
        expected = list(labels)
        result = ["Correct" if e == p else "Wrong" for e, p in zip(expected, predicted)]
    else:
        expected = [""] * len(images)
        result = ["Unlabelled"] * len(images)
    frame = pd.DataFrame({"image": images, "result": result, "expected": expected, "predicted": predicted})
    logit_columns = pd.DataFrame(logits.astype(np.float64), columns=list(classes))
    return pd.concat([frame, logit_columns], axis=1)


def check_writable(case_dir, *names):
    """Fail before any work when a result file cannot be written (a read-only case folder)."""
    case_dir = Path(case_dir)
    for folder in (case_dir, case_dir / "T"):
        if folder.is_dir() and not os.access(folder, os.W_OK):
            raise HUDDError(f"{folder}: not writable, so {', '.join(names) or 'the results'} cannot be saved; "
                            f"copy the case folder somewhere writable or fix its permissions")


def _write_all(outputs):
    """Write {path: DataFrame} once every frame is computed; a permission problem is one clear line."""
    for path, frame in outputs.items():
        try:
            write_csv(path, frame)
        except PermissionError:
            raise HUDDError(f"{path.parent}: not writable, so {path.name} cannot be saved; copy the case "
                            f"folder somewhere writable or fix its permissions") from None


def _one_pass(splits, run):
    """Run `run(images)` once over every split's images (one pass: one pool of workers on the Ray engine) and
    cut its outputs (arrays, then {index: reason}) back into {split name: (arrays..., skipped)}."""
    images = [image for split in splits.values() for image in split.images]
    *arrays, skipped = run(images)
    cut, start = {}, 0
    for name, split in splits.items():
        end = start + len(split)
        cut[name] = (*(a[start:end] for a in arrays), {i - start: r for i, r in skipped.items() if start <= i < end})
        start = end
    return cut


def write_results(case_dir, splits, model, meta, classes, device, batch_size=64, workers=0, progress=True,
                  engine=None):
    """Write trainResult.csv, testResult.csv and improveResult.csv; unreadable images go to T/skipped.csv.

    Returns {split name: DataFrame}. A corrupt or truncated image is skipped (listed with its reason),
    not fatal: a run over tens of thousands of images must not die at the last one. Nothing is written
    until every split has been predicted, so bad input in any split leaves the earlier files untouched.
    `engine` (engines.make_engine) runs the inference; None is the local one.
    """
    engine = engine or LocalEngine()
    case_dir = Path(case_dir)
    spec = ImageSpec.from_meta(meta)
    datasets = case_dir / "DataSets"
    check_writable(case_dir, *(RESULT_FILES[name] for name in splits))
    check_output_count(model, meta, classes, device)
    frames, skipped_rows = {}, []
    passes = _one_pass(splits, lambda images: engine.logits(model, ImageSet(datasets, images, spec), device, batch_size,
                                                            workers, desc="test", progress=progress))
    for name, split in splits.items():
        logits, skipped = passes[name]
        keep = [i for i in range(len(split)) if i not in skipped]
        skipped_rows += [(split.images[i], reason) for i, reason in sorted(skipped.items())]
        if not keep:
            raise HUDDError(f"{datasets / name}: none of its {len(split)} images could be read "
                            f"(first: {split.images[0]}: {skipped.get(0, '')}); replace the files")
        frames[name] = results_frame([split.images[i] for i in keep], [split.labels[i] for i in keep],
                                     classes, logits[keep], _model_name(meta))
    outputs = {case_dir / RESULT_FILES[name]: frame for name, frame in frames.items()}
    outputs[case_dir / "T" / "skipped.csv"] = pd.DataFrame(skipped_rows, columns=SKIPPED_COLUMNS)
    _write_all(outputs)
    return frames


def read_results(path):
    """Read a result CSV written by write_results, checking its columns."""
    path = Path(path)
    frame = read_table(path, missing_hint="run the test step first (python HUDD.py -o CASE -step test)")
    missing = {"image", "result", "expected", "predicted"} - set(frame.columns)
    if missing and {"image", "result", "avg_error", "worst_KP"} <= set(frame.columns):
        return frame
    if missing:
        raise HUDDError(f"{path}: not a result file (missing columns {sorted(missing)}); rerun the test step")
    return frame


def errors_of(path):
    """{image: True when the DNN gets it wrong} for the labelled rows of a result CSV; {} without the file."""
    if not Path(path).is_file():
        return {}
    frame = read_results(path)
    frame = frame[frame["result"].isin(["Correct", "Wrong"])]
    return dict(zip(frame["image"], (frame["result"] == "Wrong").tolist()))


def accuracy_of(frame):
    labelled = frame[frame["result"].isin(["Correct", "Wrong"])]
    return float((labelled["result"] == "Correct").mean()) if len(labelled) else float("nan")


# --- keypoint regressors (task "keypoints", the paper's FLD) -------------------------------------

KEYPOINT_TASK = "keypoints"
DEFAULT_THRESHOLD = 4.0       # px: an image is Wrong when its mean keypoint error is above this (the original's)
MISSING_BELOW = 1e-5          # the original's convention: a keypoint at (<= 1e-5, <= 1e-5) is missing
LABELS_FILE = "labels.csv"
ERROR_FLAG, OK_FLAG = "Error", "Correct"


def is_keypoint_task(meta):
    return (meta or {}).get("task") == KEYPOINT_TASK


def keypoint_components(meta):
    """{component: [keypoint indices]} from meta["extra"]["components"] ({component: [keypoint names]}).

    Without components every keypoint is its own component. Component names must not be keypoint
    names (both become testResult.csv columns).
    """
    names = list(meta["classes"])
    given = (meta.get("extra") or {}).get("components") or {name: [name] for name in names}
    if any(c in names and list(given[c]) != [c] for c in given):
        raise HUDDError(f"model components {list(given)}: a component may not share a name with another keypoint; "
                        f"rename it in the model's extra['components']")
    unknown = [k for members in given.values() for k in members if k not in names]
    if unknown:
        raise HUDDError(f"model components name keypoints {unknown[:3]} that are not among its keypoints; "
                        f"re-save the model with extra['components'] over its classes")
    return {str(c): [names.index(k) for k in members] for c, members in given.items()}


def label_columns(names):
    return [f"{name}_{axis}" for name in names for axis in ("x", "y")]


def read_keypoint_labels(path, names, split_name):
    """{image (relative to DataSets/): (K, 2) float array, NaN where missing} from a split's labels.csv.

    Columns: image, then <keypoint>_x, <keypoint>_y per keypoint, in pixel-index units ((0, 0) is the
    centre of the top-left pixel). A keypoint is missing when a value is empty/NaN or when both
    values are <= 1e-5 (the original's zeros). `image` is the path relative to DataSets/ or to the split.
    """
    path = Path(path)
    frame = read_table(path)
    missing = {"image", *label_columns(names)} - set(frame.columns)
    if missing:
        raise HUDDError(f"{path}: missing columns {sorted(missing)[:4]}; a keypoint labels.csv has image, then "
                        f"<keypoint>_x,<keypoint>_y for each of the model's {len(names)} keypoints")
    try:
        values = frame[label_columns(names)].to_numpy(dtype=np.float64).reshape(len(frame), len(names), 2)
    except ValueError:
        raise HUDDError(f"{path}: keypoint columns hold values that are not numbers; write pixel coordinates "
                        f"(empty for a missing keypoint)") from None
    values[np.isnan(values).any(axis=2) | (values <= MISSING_BELOW).all(axis=2)] = np.nan
    prefix = f"{split_name}/"
    images = [i if i.startswith(prefix) else prefix + i for i in frame["image"]]
    if len(set(images)) != len(images):
        raise HUDDError(f"{path}: an image appears twice; keep one row per image")
    return dict(zip(images, values))


def list_keypoint_case(case_dir, names, need=("TrainingSet", "TestSet")):
    """The splits of a keypoint case: images directly in DataSets/<split>/, ground truth in its labels.csv.

    Returns {name: common.data.Split}; a labelled split has classes = keypoint names and labels =
    (K, 2) arrays; a split without labels.csv (only the improvement set may lack it) is unlabelled.
    """
    from common.data import SPLITS, Split, list_split

    datasets = Path(case_dir) / "DataSets"
    if not datasets.is_dir():
        raise HUDDError(f"{datasets}: missing; a keypoint case folder needs DataSets/TrainingSet and "
                        f"DataSets/TestSet, each with its images and a labels.csv")
    splits = {}
    for name in SPLITS:
        if name not in need and not (datasets / name).is_dir():
            continue
        split = list_split(datasets, name, allow_flat=True)
        if split.labelled:
            raise HUDDError(f"{datasets / name}: holds subfolders ({split.classes[0]!r}); a keypoint data set "
                            f"keeps its images directly inside, with their keypoints in {LABELS_FILE}")
        labels_path = datasets / name / LABELS_FILE
        if not labels_path.is_file():
            if name != "ImprovementSet":
                raise HUDDError(f"{labels_path}: missing; write image,<keypoint>_x,<keypoint>_y,... for every image")
            splits[name] = split
            continue
        truth = read_keypoint_labels(labels_path, names, name)
        unlabelled = [i for i in split.images if i not in truth]
        if unlabelled and name != "ImprovementSet":
            raise HUDDError(f"{labels_path}: no row for {len(unlabelled)} images (first: {unlabelled[0]}); "
                            f"add their keypoints or remove the images")
        labels = [truth.get(i) for i in split.images]
        splits[name] = Split(name, split.images, labels, list(names))
    return splits


def keypoint_errors(predicted, truth):
    """(N, K) Euclidean pixel distances; NaN where the ground truth is missing."""
    return np.sqrt(((np.asarray(predicted, np.float64) - np.asarray(truth, np.float64)) ** 2).sum(axis=2))


def mean_errors(errors):
    """Per image, the mean over its labelled keypoints (NaN when none is labelled)."""
    errors = np.asarray(errors, np.float64)
    counts = (~np.isnan(errors)).sum(1)
    return np.where(counts > 0, np.nansum(errors, 1) / np.maximum(counts, 1), np.nan)


def keypoint_frame(images, truth, predicted, names, components, threshold=DEFAULT_THRESHOLD):
    """The original's FLD layout: image,result,avg_error,max_error,worst_component,worst_KP,<component flag
    per component>,<error per keypoint (px)>, then the predicted <keypoint>_x/_y (pixel-index units).

    result is Wrong iff the mean error over the labelled keypoints exceeds `threshold`; a component's
    flag is Error iff one of its keypoints does (empty when none of them is labelled); worst_component
    has the highest mean error, worst_KP the highest error.
    Unlabelled images (truth None) get result Unlabelled and empty error columns.
    """
    names = list(names)
    predicted = np.asarray(predicted, np.float64).reshape(len(images), len(names), 2)
    gt = np.stack([t if t is not None else np.full((len(names), 2), np.nan) for t in truth])
    errors = keypoint_errors(predicted, gt)
    avg = mean_errors(errors)
    scored = ~np.isnan(avg)
    with np.errstate(invalid="ignore"):
        comp_errors = np.stack([mean_errors(errors[:, idx]) for idx in components.values()], 1)
    lowest = lambda a: np.where(np.isnan(a), -np.inf, a)
    frame = pd.DataFrame({"image": list(images),
                          "result": np.where(scored, np.where(avg > threshold, "Wrong", "Correct"), "Unlabelled"),
                          "avg_error": avg,
                          "max_error": np.where(scored, lowest(errors).max(1), np.nan),
                          "worst_component": np.where(scored, np.array(list(components))[lowest(comp_errors).argmax(1)], ""),
                          "worst_KP": np.where(scored, np.array(names)[lowest(errors).argmax(1)], "")})
    comp_columns = {c: np.where(scored & ~np.isnan(comp_errors[:, j]),
                                np.where((errors[:, idx] > threshold).any(1), ERROR_FLAG, OK_FLAG), "")
                    for j, (c, idx) in enumerate(components.items())}
    kp_columns = {name: errors[:, i] for i, name in enumerate(names)}
    pred_columns = {col: predicted.reshape(len(images), -1)[:, j] for j, col in enumerate(predicted_columns(names))}
    return pd.concat([frame, pd.DataFrame(comp_columns), pd.DataFrame(kp_columns), pd.DataFrame(pred_columns)], axis=1)


def predicted_columns(names):
    """The result CSVs' columns of the predicted coordinates, in label_columns' order."""
    return [f"pred_{col}" for col in label_columns(names)]


def write_keypoint_results(case_dir, splits, model, meta, device, batch_size=64, workers=0, progress=True,
                           threshold=DEFAULT_THRESHOLD, engine=None):
    """write_results for a keypoint regressor: the FLD columns (keypoint_frame) per split."""
    engine = engine or LocalEngine()
    case_dir = Path(case_dir)
    spec = ImageSpec.from_meta(meta)
    datasets = case_dir / "DataSets"
    names, components = list(meta["classes"]), keypoint_components(meta)
    frames, skipped_rows = {}, []
    passes = _one_pass(splits, lambda images: engine.keypoints(model, ImageSet(datasets, images, spec), device,
                                                               batch_size, workers, desc="test", progress=progress))
    for name, split in splits.items():
        coords, _, skipped = passes[name]
        keep = [i for i in range(len(split)) if i not in skipped]
        skipped_rows += [(split.images[i], reason) for i, reason in sorted(skipped.items())]
        if not keep:
            raise HUDDError(f"{datasets / name}: none of its {len(split)} images could be read "
                            f"(first: {split.images[0]}: {skipped.get(0, '')}); replace the files")
        if coords.shape[1] != len(names):
            raise HUDDError(f"{_model_name(meta)}: the network has {coords.shape[1]} output maps but names "
                            f"{len(names)} keypoints; re-save it with one name per output map")
        frames[name] = keypoint_frame([split.images[i] for i in keep], [split.labels[i] for i in keep],
                                      coords[keep], names, components, threshold)
    outputs = {case_dir / RESULT_FILES[name]: frame for name, frame in frames.items()}
    outputs[case_dir / "T" / "skipped.csv"] = pd.DataFrame(skipped_rows, columns=SKIPPED_COLUMNS)
    _write_all(outputs)
    return frames


def worst_keypoint_start(outputs, channels):
    """Start relevance: each image's output map `channels[i]` alone (the others zero), as the original's FLD."""
    channels = torch.as_tensor(np.asarray(channels), dtype=torch.long, device=outputs.device)
    start = torch.zeros_like(outputs)
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    start[rows, channels] = outputs[rows, channels]
    return start


def least_peaked_keypoint(outputs):
    """Per image, the keypoint whose map is the least peaked (widest spread of its 64 highest pixels):
    the stand-in for the worst keypoint when there is no ground truth.

    On the landmarks case study (default scale, 106 test errors) it is the worst keypoint itself for 14%
    of the errors, one of the 3 worst for 34%, in the worst keypoint's component for 46%; the lowest map
    peak scores 3%, 8% and 26% (maps of hidden keypoints are trained to be flat, so they peak lowest).
    """
    return map_spread(outputs.detach().float().cpu()).argmax(1)


def least_peaked_start(outputs):
    """Start relevance for images without ground truth (the improvement set): the least peaked map alone."""
    return worst_keypoint_start(outputs, least_peaked_keypoint(outputs).numpy())
