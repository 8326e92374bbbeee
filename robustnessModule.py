"""Step 3 without a simulator: robustness curves and perturbation-based improvement sets.

The curves are the DNN's accuracy on the (clean) test set under each perturbation (robustness.perturbations)
and amplitude level. An improvement set is built from the *training* images: the test set measures the
retrained DNN, so perturbed test images in the improvement set would leak the test set into retraining
and inflate RQ2. Its amplitudes are drawn where the curves fall. Perturbed *test* copies (optional) make
the operational test set cover the degraded conditions, so that HUDD's clusters, RQ1 and the rules of
the clusters in words say which perturbation causes which errors. Every figure and every written image
is the same for a seed whatever the batch size or the number of workers.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import ImageSet, ImageSpec
from common.errors import HUDDError
from common.files import write_csv, write_json
from robustness.images import plan_images, render_images
from robustness.params import merge_params, params_rows
from robustness.perturbations import (PERTURBATIONS, PURPOSE, DecodedSet, Perturbation, PerturbedSet,  # noqa: F401
                                      amplitudes, check_perturbations, default_perturbations, perturb, rng_for)
from robustness.plots import plot_curve, write_examples  # noqa: F401

ROBUSTNESS = "Robustness"            # T/Robustness/
CURVES_FILE = "curves.csv"
EXAMPLES_FILE = "examples.png"
RECORD_FILE = "perturbations.json"   # DataSets/perturbations.json: what this module wrote into DataSets/
SOURCES_FILE = "perturbations.csv"   # beside the written images: image, source, perturbation, amplitude
PERTURBED_FOLDER = "perturbed"       # TestSet/<class>/perturbed/: the added perturbed test copies
MOVED_ASIDE = "ImprovementSet.before-perturb"
DEFAULT_LEVELS = 5
DECODED_BYTES = 1 << 30              # test images up to 1 GB decoded are kept in memory between passes
MIN_DROP = 0.02                      # a perturbation "falls" once accuracy is 2 points below the clean one
CURVE_COLUMNS = ["perturbation", "level", "amplitude", "setting", "images", "errors", "accuracy", "drop",
                 "mean_error"]


# ----------------------------------------------------------------------------------------------
# the curves

def _score(model, meta, dataset, split, device, batch_size, workers, threshold):
    """(images scored, errors, mean keypoint error or NaN) of the model on one perturbed pass."""
    import testModule

    keypoints = testModule.is_keypoint_task(meta)
    if keypoints:
        coords, _, skipped = testModule.predict_keypoints(model, dataset, device, batch_size, workers, progress=False)
        keep = [i for i in range(len(dataset)) if i not in skipped]
        names = list(meta["classes"])
        frame = testModule.keypoint_frame([split.images[i] for i in keep], [split.labels[i] for i in keep],
                                          coords[keep], names, testModule.keypoint_components(meta), threshold)
        scored = frame[frame["result"] != "Unlabelled"]
        return len(scored), int((scored["result"] == "Wrong").sum()), float(scored["avg_error"].mean())
    logits, skipped = testModule.predict(model, dataset, device, batch_size, workers, progress=False)
    keep = [i for i in range(len(dataset)) if i not in skipped]
    classes = list(meta["classes"])
    predicted = logits[keep].argmax(1)
    expected = np.array([classes.index(split.labels[i]) for i in keep], dtype=np.int64)
    return len(keep), int((predicted != expected).sum()), float("nan")


def robustness_curves(model, meta, datasets_dir, split, perturbations=None, levels=DEFAULT_LEVELS, seed=0,
                      device="cpu", batch_size=64, workers=0, threshold=4.0, progress=True):
    """One row per (perturbation, level): the DNN's accuracy (share of images within the threshold for a
    keypoint DNN, with its mean error) on `split` (a labelled common.data.Split) under that perturbation.

    The clean pass (level 0) is computed once and shared by every perturbation.
    """
    from tqdm import tqdm

    import testModule

    keypoints = testModule.is_keypoint_task(meta)
    names = check_perturbations(perturbations, keypoints)
    if not split.images:
        raise HUDDError(f"{split.name}: no images to measure robustness on")
    spec = ImageSpec.from_meta(meta)
    base = ImageSet(datasets_dir, split.images, spec)
    if len(base) * spec.channels * spec.height * spec.width * 4 <= DECODED_BYTES:
        base = DecodedSet(base)
    amps = amplitudes(levels)
    shape = (spec.channels, spec.height, spec.width)
    passes = [(None, 0)] + [(name, level) for name in names for level in range(1, len(amps))]
    scores = {}
    bar = tqdm(passes, desc="robustness", unit="pass", leave=False, dynamic_ncols=True, disable=not progress)
    for name, level in bar:
        bar.set_postfix_str(f"{name or 'clean'} {level}")
        dataset = PerturbedSet(base, [name] * len(base), [amps[level]] * len(base), seed, "curves",
                               [level] * len(base))
        scores[(name, level)] = _score(model, meta, dataset, split, device, batch_size, workers, threshold)
    clean_images, clean_errors, clean_mean = scores[(None, 0)]
    clean_accuracy = 1.0 - clean_errors / max(clean_images, 1)
    rows = []
    for name in names:
        for level, a in enumerate(amps):
            images, errors, mean_error = scores[(None, 0)] if level == 0 else scores[(name, level)]
            accuracy = 1.0 - errors / max(images, 1)
            rows.append({"perturbation": name, "level": level, "amplitude": float(a),
                         "setting": PERTURBATIONS[name].setting(a, shape) if level else "clean",
                         "images": images, "errors": errors, "accuracy": accuracy,
                         "drop": clean_accuracy - accuracy, "mean_error": mean_error})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def write_curves(out_dir, curves, keypoints=False):
    """T/Robustness/curves.csv and one plot per perturbation (<perturbation>.png); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / CURVES_FILE]
    write_csv(paths[0], curves)
    for name, rows in curves.groupby("perturbation", sort=False):
        paths.append(plot_curve(out_dir / f"{name}.png", name, rows, keypoints))
    return paths


def falling_ranges(curves, min_drop=MIN_DROP):
    """{perturbation: (low, high)}: the amplitudes where accuracy falls, from the level before the first
    one `min_drop` below the clean accuracy up to the strongest level. Perturbations that never fall
    that far are left out; when none does, every perturbation over its whole range."""
    ranges = {}
    for name, rows in curves.groupby("perturbation", sort=False):
        rows = rows.sort_values("level")
        falling = rows[rows["drop"] >= min_drop]
        if len(falling):
            first = int(falling["level"].iloc[0])
            low = float(rows.loc[rows["level"] == first - 1, "amplitude"].iloc[0])
            ranges[name] = (low, float(rows["amplitude"].max()))
    if not ranges:
        ranges = {name: (0.0, float(rows["amplitude"].max())) for name, rows in curves.groupby("perturbation",
                                                                                                 sort=False)}
    return ranges


# ----------------------------------------------------------------------------------------------
# perturbed images for the case folder

def read_record(datasets_dir):
    path = Path(datasets_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:
        raise HUDDError(f"{path}: not valid JSON; delete it (it only records which perturbed images this tool "
                        f"wrote) and rerun") from None


def write_perturbed_improvement(datasets_dir, split, spec, curves, n, seed=0, keypoint_names=None, progress=True):
    """DataSets/ImprovementSet: `n` perturbed training images at the amplitudes where the curves fall,
    labelled by their source image (its class folder; for a keypoint DNN its keypoints, in labels.csv).

    An improvement set this tool did not write is moved aside to DataSets/ImprovementSet.before-perturb,
    never deleted. The new one is written beside and renamed into place, so a killed run leaves the old
    one. Returns (sources table, written, moved): written is False when the same set is already there,
    moved is True when an improvement set of the user's went to ImprovementSet.before-perturb just now.
    """
    datasets_dir = Path(datasets_dir)
    ranges = falling_ranges(curves)
    identity = {"n": int(n), "seed": int(seed), "ranges": {k: list(v) for k, v in ranges.items()},
                "source": split.name, "source_images": len(split.images)}
    record = read_record(datasets_dir)
    target = datasets_dir / "ImprovementSet"
    sources_path = target / SOURCES_FILE
    if record.get("improvement") == identity and sources_path.is_file():
        from common.tables import read_table
        return read_table(sources_path, text=("image", "source", "perturbation", "label")), False, False
    moved = False
    if target.exists() and "improvement" not in record:
        aside = datasets_dir / MOVED_ASIDE
        if aside.exists():
            raise HUDDError(f"{target}: would be replaced by a perturbed improvement set, but {aside} exists already; "
                            f"move one of them away first")
        target.rename(aside)
        moved = True
        print(f"[robustness] the improvement set you had is kept in {aside}")
    plan = plan_images(n, len(split.images), ranges, seed, "improvement")
    staging = datasets_dir / ".ImprovementSet.partial"
    shutil.rmtree(staging, ignore_errors=True)
    width = len(str(n - 1))
    if keypoint_names is None:
        rel = lambda i, row, label: f"{staging.name}/{label}/p{i:0{width}d}.png"
    else:
        rel = lambda i, row, label: f"{staging.name}/p{i:0{width}d}.png"
    sources = render_images(datasets_dir, split, spec, plan, seed, "improvement", rel, progress)
    if keypoint_names is None:
        for cls in split.classes:                   # every class folder, as the other splits
            (staging / cls).mkdir(parents=True, exist_ok=True)
    else:
        from testModule import label_columns

        truth = dict(zip(split.images, split.labels))
        points = np.stack([truth[s] for s in sources["source"]]) if len(sources) \
            else np.zeros((0, len(keypoint_names), 2))
        labels = pd.DataFrame(points.reshape(len(sources), -1), columns=label_columns(keypoint_names))
        labels.insert(0, "image", [Path(i).name for i in sources["image"]])
        write_csv(staging / "labels.csv", labels)
    sources["image"] = sources["image"].str.replace(staging.name, "ImprovementSet", n=1, regex=False)
    write_csv(staging / SOURCES_FILE, sources.drop(columns=["label"]))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    record["improvement"] = identity
    write_json(datasets_dir / RECORD_FILE, record)
    return sources.drop(columns=["label"]), True, moved


def write_perturbed_test(datasets_dir, split, spec, curves, n, seed=0, progress=True):
    """Add `n` perturbed copies of test images (classifiers) in DataSets/TestSet/<class>/perturbed/, at the
    amplitudes where the curves fall; the original test images stay as they are. Copies written before
    by this tool are replaced. Returns (sources table, written)."""
    datasets_dir = Path(datasets_dir)
    ranges = falling_ranges(curves)
    clean_test = clean_split(split)
    identity = {"n": int(n), "seed": int(seed), "ranges": {k: list(v) for k, v in ranges.items()},
                "source_images": len(clean_test)}
    record = read_record(datasets_dir)
    sources_path = datasets_dir / "TestSet" / SOURCES_FILE
    if record.get("test") == identity and sources_path.is_file():
        from common.tables import read_table
        return read_table(sources_path, text=("image", "source", "perturbation")), False
    for cls in split.classes:
        shutil.rmtree(datasets_dir / "TestSet" / cls / PERTURBED_FOLDER, ignore_errors=True)
    record.pop("test", None)
    write_json(datasets_dir / RECORD_FILE, record)
    plan = plan_images(n, len(clean_test), ranges, seed, "test")
    width = len(str(n - 1))
    sources = render_images(datasets_dir, clean_test, spec, plan, seed, "test",
                            lambda i, row, label: f"TestSet/{label}/{PERTURBED_FOLDER}/t{i:0{width}d}.png", progress)
    sources = sources.drop(columns=["label"])
    write_csv(sources_path, sources)
    record["test"] = identity
    write_json(datasets_dir / RECORD_FILE, record)
    return sources, True


def clean_split(split):
    """The split without the perturbed copies this tool added (TestSet/<class>/perturbed/)."""
    keep = [i for i, image in enumerate(split.images) if f"/{PERTURBED_FOLDER}/" not in image]
    return type(split)(split.name, [split.images[i] for i in keep], [split.labels[i] for i in keep], split.classes)


def check_perturb_test(n_test, keypoints):
    """Perturbed test copies are for classifiers: a keypoint case's test labels are the user's file."""
    if n_test and keypoints:
        raise HUDDError("--perturb-test: a keypoint case keeps its test keypoints in DataSets/TestSet/labels.csv, "
                        "which this tool does not rewrite; build perturbed test images yourself, or leave it out")


def write_perturbed_images(datasets_dir, splits, spec, curves, perturbations, n_improvement=0, n_test=0, seed=0,
                           keypoint_names=None, progress=True):
    """--perturb-improvement and --perturb-test: the perturbed images, then their params.csv rows.
    Returns what the run's summary says about them."""
    check_perturb_test(n_test, keypoint_names is not None)
    summary, written, prefixes, moved = {}, [], [], False
    test = splits["TestSet"]
    if n_improvement:
        sources, new, moved = write_perturbed_improvement(datasets_dir, splits["TrainingSet"], spec, curves,
                                                          n_improvement, seed, keypoint_names, progress)
        written.append(sources)
        prefixes.append("ImprovementSet/")
        summary["improvement_images"] = len(sources)
        print(f"[robustness] improvement set: {len(sources)} perturbed training images"
              f"{'' if new else ' (already there; kept)'} in {Path(datasets_dir) / 'ImprovementSet'}")
    if n_test:
        sources, new = write_perturbed_test(datasets_dir, test, spec, curves, n_test, seed, progress)
        written.append(sources)
        prefixes += [f"TestSet/{c}/{PERTURBED_FOLDER}/" for c in test.classes]
        summary["test_copies"] = len(sources)
        print(f"[robustness] test set: {len(sources)} perturbed copies{'' if new else ' (already there; kept)'} "
              f"beside its {len(clean_split(test))} images")
    rows = params_rows(pd.concat(written, ignore_index=True), perturbations,
                       clean_split(test).images if n_test else ())
    aside = {"ImprovementSet/": f"{MOVED_ASIDE}/"} if moved else None
    merge_params(Path(datasets_dir) / "params.csv", rows, prefixes, aside)
    return summary


def describe_curves(curves):
    """One console line per perturbation: accuracy clean and at each level's end."""
    lines = []
    for name, rows in curves.groupby("perturbation", sort=False):
        rows = rows.sort_values("level")
        steps = " ".join(f"{100 * a:.1f}" for a in rows["accuracy"])
        lines.append(f"{name:<12} accuracy % by level: {steps} (strongest: {rows['setting'].iloc[-1]})")
    return lines
