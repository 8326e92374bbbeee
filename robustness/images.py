"""Perturbed images for the case folder: which source image, perturbation and amplitude each one gets
(plan_images), and the PNG files written from such a plan (render_images)."""
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import ImageSet
from common.errors import HUDDError
from robustness.perturbations import PURPOSE, PerturbedSet


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
