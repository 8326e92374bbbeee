"""Shared fixtures: tiny generated case folders, so every test runs in seconds."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)

TINY_CLASSES = ["circle", "square", "stripe"]
TINY_SIZE = 16


def _draw(kind, rng, size=TINY_SIZE):
    """A 16x16 RGB image whose class is visible, with noise so that a tiny net makes some errors."""
    img = rng.normal(0.5, 0.25, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cx, cy = rng.uniform(5, 11, 2)
    if kind == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 16
    elif kind == "square":
        mask = (abs(xx - cx) < 3) & (abs(yy - cy) < 3)
    else:
        mask = (xx % 4) < 2
    img[mask] += 0.5
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def make_tiny_case(root, n_per_class=(12, 8, 6), seed=0, flat_improvement=False, train_epochs=2):
    """A case folder with three labelled splits of 16x16 images and a trained SmallAlexNet."""
    import models
    import retrainModule
    from common.data import ImageSet, ImageSpec, list_split

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in zip(("TrainingSet", "TestSet", "ImprovementSet"), n_per_class):
        for cls in TINY_CLASSES:
            folder = root / "DataSets" / split / ("" if split == "ImprovementSet" and flat_improvement else cls)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                name = f"{cls}_{i:03d}.png" if flat_improvement and split == "ImprovementSet" else f"{i:03d}.png"
                _draw(cls, rng).save(folder / name)
    torch.manual_seed(seed)
    model = models.SmallAlexNet(num_classes=3, in_channels=3, input_size=TINY_SIZE, width=4, hidden=16)
    meta = dict(classes=TINY_CLASSES, input_size=(3, TINY_SIZE, TINY_SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
    if train_epochs:
        split = list_split(root / "DataSets", "TrainingSet")
        targets = [TINY_CLASSES.index(c) for c in split.labels]
        dataset = ImageSet(root / "DataSets", split.images, ImageSpec(3, TINY_SIZE, TINY_SIZE, (0.5,) * 3, (0.5,) * 3),
                           targets)
        retrainModule.train_classifier(model, dataset, epochs=train_epochs, device="cpu", optimizer=retrainModule.adam,
                                       batch_size=8, progress=False)
    models.save_model(root / "DNNModels" / "OriginalModel.pth", model, "smallalexnet",
                      arch_args=dict(num_classes=3, in_channels=3, input_size=TINY_SIZE, width=4, hidden=16), **meta)
    return root


@pytest.fixture
def tiny_case(tmp_path):
    return make_tiny_case(tmp_path / "case")
