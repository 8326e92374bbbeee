"""The real-image case study: Fashion-MNIST (70,000 28x28 grayscale photos, MIT licence) from Debian's
``dataset-fashion-mnist`` package, written as PNG files in ImageFolder layout.

TestSet is the official 10,000 test images; the 60,000 training images are split (seeded) into
TrainingSet and a labelled ImprovementSet. File names keep the official index (``train-012345.png``).
"""
import functools
import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from casestudies.casefolder import run_chunks
from common.errors import HUDDError

SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")     # official label order, safe as folder names
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
IMPROVEMENT_SHARE = 1 / 6   # of the 60,000 training images: 10,000
SCALES = {"small": {"TrainingSet": 400, "TestSet": 150, "ImprovementSet": 150}, "default": None}
CHUNK = 1000


def available(source=SOURCE):
    return all((Path(source) / name).is_file() for pair in FILES.values() for name in pair)


def read_idx(path, magic):
    """Read one idx file (gzip): images as (N, rows, cols) uint8, labels as (N,) uint8."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise HUDDError(f"{path}: cannot read ({exc}); reinstall with `apt-get install --reinstall -y "
                        f"dataset-fashion-mnist`") from None
    dims = magic & 0xFF
    header = 4 + 4 * dims
    found, *shape = struct.unpack(f">I{dims}I", data[:header])
    if found != magic or len(data) != header + int(np.prod(shape)):
        raise HUDDError(f"{path}: not an idx file of the expected kind (magic {found}, size {len(data)}); "
                        f"reinstall with `apt-get install --reinstall -y dataset-fashion-mnist`")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load(source=SOURCE):
    if not available(source):
        raise HUDDError(f"{source}: Fashion-MNIST is missing; run `apt-get install -y dataset-fashion-mnist` "
                        f"(or `make demo`, which installs it)")
    out = {}
    for part, (images, labels) in FILES.items():
        out[part] = (read_idx(Path(source) / images, IMAGES_MAGIC), read_idx(Path(source) / labels, LABELS_MAGIC))
    return out


def write_datasets(root, seed, scale, progress=True, source=SOURCE):
    """Write TrainingSet, ImprovementSet and TestSet PNGs into `root`; return the training images' (mean, std)."""
    data = load(source)
    rng = np.random.default_rng([seed, 3])
    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    order = rng.permutation(len(train_images))
    n_improve = round(len(train_images) * IMPROVEMENT_SHARE)
    parts = {"TrainingSet": ("train", train_images, train_labels, np.sort(order[n_improve:])),
             "TestSet": ("test", test_images, test_labels, np.arange(len(test_images))),
             "ImprovementSet": ("train", train_images, train_labels, np.sort(order[:n_improve]))}
    if SCALES[scale] is not None:
        parts = {split: (*spec[:3], np.sort(rng.permutation(spec[3])[:SCALES[scale][split]]))
                 for split, spec in parts.items()}
    for split, (prefix, images, labels, indices) in parts.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        jobs = [(f"{split}/{CLASSES[labels[i]]}/{prefix}-{i:06d}.png", images[i]) for i in indices]
        chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
        run_chunks(functools.partial(_save_chunk, str(root)), chunks, progress, f"fmnist {split}", len(jobs))
    pixels = train_images[parts["TrainingSet"][3]].astype(np.float64) / 255.0
    return (round(float(pixels.mean()), 4),), (round(float(pixels.std()), 4),)


def _save_chunk(root, jobs):
    for name, pixels in jobs:
        Image.fromarray(pixels).save(f"{root}/{name}", compress_level=1)
    return len(jobs)
