"""Step 3 without a simulator (issue 14): robustness curves and perturbation-based improvement sets.

A perturbation is a small declarative object: a name, what its amplitude means physically, and a
function of an image in [0, 1] and an amplitude in [0, 1] (0 is the identity, 1 the strongest level
tried). The photometric and geometric operations are torchvision.transforms.v2's functional ops;
random parts (noise, dead pixels, where the occluder sits, the sense of a rotation) come from a
numpy generator seeded by (seed, purpose, perturbation, level, image index), so every figure and
every written image is the same for a seed whatever the batch size or the number of workers.

The curves are the DNN's accuracy on the (clean) test set under each perturbation and amplitude
level. An improvement set is built from the *training* images: the test set measures the retrained
DNN, so perturbed test images in the improvement set would leak the test set into retraining and
inflate RQ2. Its amplitudes are drawn where the curves fall. Perturbed *test* copies (optional) make
the operational test set cover the degraded conditions, so that HUDD's clusters, RQ1 and the rules
of the clusters in words say which perturbation causes which errors.
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import ImageSet, ImageSpec
from common.errors import HUDDError
from common.files import write_csv, write_json

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
PURPOSE = {"curves": 0, "improvement": 1, "test": 2}


# ----------------------------------------------------------------------------------------------
# the perturbations

def _brightness(x, a, rng):
    import torchvision.transforms.v2.functional as F

    return F.adjust_brightness(x, 1.0 - 0.9 * a)


def _contrast(x, a, rng):
    import torchvision.transforms.v2.functional as F

    return F.adjust_contrast(x, 1.0 - 0.9 * a)


def _blur_sigma(a, shape):
    return a * max(shape[-2:]) / 16.0


def _blur(x, a, rng):
    import torchvision.transforms.v2.functional as F

    sigma = _blur_sigma(a, x.shape)
    largest = min(x.shape[-2:]) - (1 - min(x.shape[-2:]) % 2)      # odd and inside the image
    kernel = max(3, min(2 * math.ceil(3 * sigma) + 1, largest))
    return F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def _noise(x, a, rng):
    return x + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * (0.25 * a)


def _dead_pixels(x, a, rng):
    dead = torch.from_numpy(rng.random(x.shape[-2:]) < 0.25 * a)
    return x.masked_fill(dead, 0.0)


def _occlusion_side(a, shape):
    return int(round(0.5 * a * min(shape[-2:])))


def _occlusion(x, a, rng):
    import torchvision.transforms.v2.functional as F

    side = _occlusion_side(a, x.shape)
    if side == 0:
        return x
    top = int(rng.integers(0, x.shape[-2] - side + 1))
    left = int(rng.integers(0, x.shape[-1] - side + 1))
    return F.erase(x, top, left, side, side, torch.tensor(0.5))


def _rotation(x, a, rng):
    import torchvision.transforms.v2.functional as F

    sign = 1.0 if rng.random() < 0.5 else -1.0
    return F.rotate(x, sign * 45.0 * a, interpolation=F.InterpolationMode.BILINEAR, fill=0.0)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: `apply(image in [0, 1], amplitude in [0, 1], rng)`, with what amplitude 1 means."""

    name: str
    apply: object
    at_full: str            # the strongest level, in the image's own terms (the README's table)
    geometric: bool = False  # moves the pixels, so keypoints would move with them

    def setting(self, amplitude, shape):
        """The amplitude in physical terms, for curves.csv and the plots."""
        a = float(amplitude)
        if self.name == "brightness":
            return f"x{1 - 0.9 * a:.2f} intensity"
        if self.name == "contrast":
            return f"x{1 - 0.9 * a:.2f} contrast"
        if self.name == "blur":
            return f"sigma {_blur_sigma(a, shape):.2f} px"
        if self.name == "noise":
            return f"std {255 * 0.25 * a:.0f} grey levels"
        if self.name == "dead-pixels":
            return f"{100 * 0.25 * a:.1f}% pixels black"
        if self.name == "occlusion":
            return f"{_occlusion_side(a, shape)} px grey square"
        return f"+-{45 * a:.0f} deg"


PERTURBATIONS = {p.name: p for p in (
    Perturbation("brightness", _brightness, "intensity x0.1"),
    Perturbation("contrast", _contrast, "contrast x0.1"),
    Perturbation("blur", _blur, "Gaussian sigma = image size / 16"),
    Perturbation("noise", _noise, "Gaussian noise, std 64 grey levels"),
    Perturbation("dead-pixels", _dead_pixels, "25% of the pixels black"),
    Perturbation("occlusion", _occlusion, "a grey square of half the image's side"),
    Perturbation("rotation", _rotation, "+-45 degrees", geometric=True),
)}


def default_perturbations(keypoints=False):
    """Every perturbation; a keypoint DNN's ground truth would move with a rotation, so it gets none."""
    return [name for name, p in PERTURBATIONS.items() if not (keypoints and p.geometric)]


def check_perturbations(names, keypoints=False):
    """The perturbation names, validated; None means the default list."""
    if names is None:
        return default_perturbations(keypoints)
    names = list(names)
    if not names:
        raise HUDDError(f"--perturbations: no perturbation named; choose from {','.join(PERTURBATIONS)}")
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise HUDDError(f"--perturbations {','.join(names)}: unknown {', '.join(unknown)}; "
                        f"choose from {','.join(PERTURBATIONS)}")
    moving = [n for n in names if keypoints and PERTURBATIONS[n].geometric]
    if moving:
        raise HUDDError(f"--perturbations: {', '.join(moving)} moves the keypoints of a keypoint DNN, whose ground "
                        f"truth would then be wrong; leave it out")
    if len(set(names)) != len(names):
        raise HUDDError(f"--perturbations {','.join(names)}: a perturbation is named twice; name each once")
    return names


def amplitudes(levels):
    """Amplitude of each level: 0 (the clean image), then `levels` steps up to 1."""
    if int(levels) < 1:
        raise HUDDError(f"--levels {levels}: needs at least 1 amplitude level")
    return np.linspace(0.0, 1.0, int(levels) + 1)


def rng_for(seed, purpose, perturbation, level, index):
    """The generator of one perturbed image: independent of batches, workers and the other images."""
    return np.random.default_rng([int(seed), PURPOSE[purpose], list(PERTURBATIONS).index(perturbation),
                                  int(level), int(index)])


def perturb(image, name, amplitude, rng):
    """`image` (C, H, W) in [0, 1] perturbed by `name` at `amplitude` in [0, 1], clipped to [0, 1]."""
    if not 0.0 <= float(amplitude) <= 1.0:
        raise HUDDError(f"perturbation amplitude {amplitude}: must lie in [0, 1]")
    if float(amplitude) == 0.0:
        return image.clone()
    return PERTURBATIONS[name].apply(image, float(amplitude), rng).clamp(0.0, 1.0)


class PerturbedSet(torch.utils.data.Dataset):
    """Images of the case folder perturbed on the fly: the same (input, target, index, error) items as
    ImageSet, with the perturbation applied in [0, 1] before the model's normalisation."""

    def __init__(self, base, names, amplitudes_, seed, purpose, levels=None):
        self.base, self.names, self.amplitudes = base, list(names), list(amplitudes_)
        self.levels = list(levels) if levels is not None else [0] * len(self.names)
        self.seed, self.purpose = seed, purpose
        spec = base.spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.base)

    def image01(self, index):
        tensor, target, _, error = self.base[index]
        clean = (tensor * self.std + self.mean).clamp(0.0, 1.0)
        name = self.names[index]
        if error or name is None:
            return clean, target, error
        rng = rng_for(self.seed, self.purpose, name, self.levels[index], index)
        return perturb(clean, name, self.amplitudes[index], rng), target, error

    def __getitem__(self, index):
        image, target, error = self.image01(index)
        return (image - self.mean) / self.std, target, index, error


class DecodedSet(torch.utils.data.Dataset):
    """An ImageSet's items decoded once and kept: every perturbed pass of the curves then starts from
    memory instead of decoding each file again (a third to a half of a pass on small images)."""

    def __init__(self, base):
        self.spec = base.spec
        self.items = [base[i] for i in range(len(base))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


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
        paths.append(_plot_curve(out_dir / f"{name}.png", name, rows, keypoints))
    return paths


def _plot_curve(path, name, rows, keypoints):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.files import atomic_path

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    ax.plot(rows["amplitude"], 100 * rows["accuracy"], marker="o", color="#1f5f8b")
    ax.set_ylim(0, 100)
    ax.set_xlabel("amplitude (0 = clean, 1 = " + PERTURBATIONS[name].at_full + ")", fontsize=7)
    ax.set_ylabel("within threshold %" if keypoints else "accuracy %")
    ax.set_title(name)
    for a, acc, setting in zip(rows["amplitude"], rows["accuracy"], rows["setting"]):
        ax.annotate(setting, (a, 100 * acc), textcoords="offset points", xytext=(0, 6), fontsize=5, ha="center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_examples(path, datasets_dir, image, spec, perturbations, levels, seed=0):
    """One test image under every perturbation and level (rows = perturbations, columns = levels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.files import atomic_path

    amps = amplitudes(levels)
    base = ImageSet(datasets_dir, [image], spec)
    fig, axes = plt.subplots(len(perturbations), len(amps), figsize=(1.1 * len(amps), 1.15 * len(perturbations)),
                             dpi=100, squeeze=False)
    for r, name in enumerate(perturbations):
        for level, a in enumerate(amps):
            shown = PerturbedSet(base, [name], [a], seed, "curves", [level]).image01(0)[0]
            ax = axes[r][level]
            ax.imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if level == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(f"{a:.1f}", fontsize=7)
    fig.tight_layout(pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# perturbed images for the case folder

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


def plan_images(n, n_sources, ranges, seed, purpose):
    """N perturbed images: which source image (without replacement while there are enough), which
    perturbation (uniform over `ranges`) and which amplitude (uniform in its range, never 0)."""
    if n < 1:
        raise HUDDError(f"perturbed images: asked for {n}; ask for 1 or more")
    if n_sources < 1:
        raise HUDDError("perturbed images: the source data set has no images")
    rng = np.random.default_rng([int(seed), PURPOSE[purpose], 99])
    names = list(ranges)
    sources = rng.choice(n_sources, size=n, replace=n > n_sources)
    chosen = rng.integers(0, len(names), size=n)
    low = np.array([ranges[names[c]][0] for c in chosen])
    high = np.array([ranges[names[c]][1] for c in chosen])
    amps = high - (high - low) * rng.random(n)       # in (low, high]: never the clean image
    return pd.DataFrame({"source": sources, "perturbation": [names[c] for c in chosen], "amplitude": amps})


def _save_png(image01, path):
    from PIL import Image

    array = (image01.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path, format="PNG")


def render_images(datasets_dir, split, spec, plan, seed, purpose, rel_path, progress=True):
    """Write one PNG per row of `plan` at DataSets/<rel_path(i, row, label)>; returns the sources table
    (image, source, perturbation, amplitude, label). Images that cannot be read are left out."""
    from tqdm import tqdm

    datasets_dir = Path(datasets_dir)
    base = ImageSet(datasets_dir, [split.images[s] for s in plan["source"]], spec)
    dataset = PerturbedSet(base, plan["perturbation"].tolist(), plan["amplitude"].tolist(), seed, purpose)
    rows = []
    for i in tqdm(range(len(plan)), desc=f"perturbed {purpose} images", unit="img", leave=False,
                  dynamic_ncols=True, disable=not progress):
        image, _, error = dataset.image01(i)
        if error:
            continue
        source = int(plan["source"].iloc[i])
        label = split.labels[source]
        rel = rel_path(i, plan.iloc[i], label)
        (datasets_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        _save_png(image, datasets_dir / rel)
        rows.append({"image": rel, "source": split.images[source], "perturbation": plan["perturbation"].iloc[i],
                     "amplitude": float(plan["amplitude"].iloc[i]), "label": label})
    return pd.DataFrame(rows, columns=["image", "source", "perturbation", "amplitude", "label"])


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


def params_rows(sources, perturbations, clean_images=()):
    """params.csv rows: perturbation (its name, 'none' for a clean image), amplitude, and one numeric
    column per perturbation (its amplitude, 0 when another or none is applied), for RQ1's variance ratios."""
    frame = pd.DataFrame({"image": list(sources["image"]) + list(clean_images),
                          "source": list(sources["source"]) + list(clean_images),
                          "perturbation": list(sources["perturbation"]) + ["none"] * len(clean_images),
                          "amplitude": list(sources["amplitude"]) + [0.0] * len(clean_images)})
    for name in perturbations:
        frame[f"perturb_{name}"] = np.where(frame["perturbation"] == name, frame["amplitude"], 0.0)
    return frame


def merge_params(params_path, rows, replace_prefixes, moved=None):
    """Write `rows` (with a column 'source') into DataSets/params.csv and return the table written.

    Rows of images under `replace_prefixes` (e.g. 'ImprovementSet/': the set just replaced) go, or, when
    `moved` maps such a prefix to another ('ImprovementSet/' -> 'ImprovementSet.before-perturb/'), follow
    their images there; every other row and column stays. A perturbed image inherits the parameters of
    its source image (a simulator's, when the case has them), so the conditions it was rendered in stay known.
    """
    from clusterModule import read_params

    params_path = Path(params_path)
    new = rows.drop(columns=["source"]).set_index("image")
    if not params_path.is_file():
        merged = new
    else:
        old = read_params(params_path)
        old = old.assign(image=old["image"].astype(str)).drop_duplicates("image")
        for before, after in (moved or {}).items():
            old["image"] = old["image"].where(~old["image"].str.startswith(before),
                                              after + old["image"].str.slice(len(before)))
        old = old[~old["image"].str.startswith(tuple(replace_prefixes))].set_index("image")
        known = old.index.intersection(rows["source"].astype(str))
        source_of = rows.set_index("image")["source"].astype(str)
        for column in old.columns:
            if column not in new.columns:
                values = old[column].reindex(source_of.where(source_of.isin(known)).to_numpy())
                new[column] = values.to_numpy()
        rest = old.drop(index=old.index.intersection(new.index))
        merged = pd.concat([rest, new], sort=False)
        merged = merged[list(old.columns) + [c for c in merged.columns if c not in old.columns]]
    merged = merged.rename_axis("image").reset_index()
    write_csv(params_path, merged)
    return merged


def describe_curves(curves):
    """One console line per perturbation: accuracy clean and at each level's end."""
    lines = []
    for name, rows in curves.groupby("perturbation", sort=False):
        rows = rows.sort_values("level")
        steps = " ".join(f"{100 * a:.1f}" for a in rows["accuracy"])
        lines.append(f"{name:<12} accuracy % by level: {steps} (strongest: {rows['setting'].iloc[-1]})")
    return lines
