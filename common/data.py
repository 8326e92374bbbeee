"""The case folder's data sets: listing splits in ImageFolder layout and loading images.

Images are keyed by their path relative to `DataSets/` (e.g. ``TestSet/TopLeft/0001.png``),
never by splitting file names, so any name (spaces, dots, underscores, non-ASCII) works.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.errors import HUDDError

SPLITS = ("TrainingSet", "TestSet", "ImprovementSet")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclass(frozen=True)
class Split:
    """One data set of the case folder, in a stable (sorted) order."""

    name: str
    images: list            # paths relative to DataSets/
    labels: list            # class folder per image, or None for a flat (unlabelled) split
    classes: list           # class folder names, sorted; empty for a flat split

    @property
    def labelled(self):
        return bool(self.classes)

    def __len__(self):
        return len(self.images)


def _is_image(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_split(datasets_dir, name, allow_flat=False):
    """List a split: class subfolders with images, or (if `allow_flat`) images directly inside."""
    root = Path(datasets_dir) / name
    if not root.is_dir():
        raise HUDDError(f"{root}: missing data set folder; create it with one subfolder per class "
                        f"(ImageFolder layout)")
    entries = sorted(os.listdir(root))
    subdirs = [e for e in entries if (root / e).is_dir() and not e.startswith(".")]
    flat = [e for e in entries if (root / e).is_file() and _is_image(e)]
    if subdirs and flat:
        raise HUDDError(f"{root}: holds both images and class folders ({flat[0]!r}, {subdirs[0]!r}); "
                        f"put every image inside a class folder, or remove the folders")
    if flat:
        if not allow_flat:
            raise HUDDError(f"{root}: images must be in one subfolder per class (ImageFolder layout), "
                            f"found {flat[0]!r} directly inside")
        return Split(name, [f"{name}/{e}" for e in flat], [None] * len(flat), [])
    images, labels = [], []
    for cls in subdirs:
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, datasets_dir).replace(os.sep, "/")
            for fname in sorted(filenames):
                if _is_image(fname):
                    images.append(f"{rel_dir}/{fname}")
                    labels.append(cls)
    if not images:
        raise HUDDError(f"{root}: no images found (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"add images or point -o to the right case folder")
    return Split(name, images, labels, subdirs)


def list_case(case_dir, need=("TrainingSet", "TestSet")):
    """List the splits of a case folder and check that labelled splits share their class folders."""
    datasets = Path(case_dir) / "DataSets"
    if not datasets.is_dir():
        raise HUDDError(f"{datasets}: missing; a case folder needs DataSets/TrainingSet, DataSets/TestSet "
                        f"and optionally DataSets/ImprovementSet (see README, 'The case folder')")
    splits = {}
    for name in SPLITS:
        if name in need or (datasets / name).is_dir():
            splits[name] = list_split(datasets, name, allow_flat=(name == "ImprovementSet"))
    labelled = [s for s in splits.values() if s.labelled]
    for split in labelled[1:]:
        if split.classes != labelled[0].classes:
            extra = sorted(set(split.classes) ^ set(labelled[0].classes))
            raise HUDDError(f"{datasets / split.name}: class folders differ from {labelled[0].name} "
                            f"(not in both: {', '.join(extra)}); every labelled split needs the same class "
                            f"folders (an empty folder is fine)")
    return splits


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: channels, size, normalisation, and how to fit other sizes."""

    channels: int
    height: int
    width: int
    mean: tuple = field(default=(0.5,))
    std: tuple = field(default=(0.5,))
    preprocess: str = "exact"     # exact | resize | center-crop

    @classmethod
    def from_meta(cls, meta):
        c, h, w = meta["input_size"]
        return cls(int(c), int(h), int(w), tuple(meta["mean"]), tuple(meta["std"]),
                   meta.get("preprocess", "exact"))


def read_image(path, spec):
    """Load one image as a normalised float tensor (C, H, W), or raise HUDDError saying why."""
    with Image.open(path) as img:
        img.load()
        gray = img.mode in GRAY_MODES
        if gray and spec.channels == 3:
            raise HUDDError(f"{path}: grayscale image but the model expects 3 channels (RGB); convert the "
                            f"images to RGB or use a model with input_size (1, H, W)")
        if not gray and spec.channels == 1:
            raise HUDDError(f"{path}: colour image ({img.mode}) but the model expects 1 channel; convert the "
                            f"images to grayscale or use a model with input_size (3, H, W)")
        img = img.convert("L" if spec.channels == 1 else "RGB")
        if img.size != (spec.width, spec.height):
            img = _fit(img, spec, path)
        array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy())
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (tensor - mean) / std


def _fit(img, spec, path):
    if spec.preprocess == "resize":
        return img.resize((spec.width, spec.height), Image.BILINEAR)
    if spec.preprocess == "center-crop" and img.width >= spec.width and img.height >= spec.height:
        left = (img.width - spec.width) // 2
        top = (img.height - spec.height) // 2
        return img.crop((left, top, left + spec.width, top + spec.height))
    raise HUDDError(f"{path}: image is {img.width}x{img.height} but the model expects "
                    f"{spec.width}x{spec.height}; resize the images, or save the model with "
                    f"preprocess='resize' or 'center-crop'")


class ImageSet(torch.utils.data.Dataset):
    """Images of the case folder by relative path; a corrupt file yields an error string, not a crash."""

    def __init__(self, datasets_dir, images, spec, targets=None):
        self.root = Path(datasets_dir)
        self.images = list(images)
        self.spec = spec
        self.targets = None if targets is None else list(targets)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        path = self.root / self.images[index]
        target = -1 if self.targets is None else self.targets[index]
        try:
            return read_image(path, self.spec), target, index, ""
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            blank = torch.zeros(self.spec.channels, self.spec.height, self.spec.width)
            return blank, target, index, f"{type(exc).__name__}: {exc}".replace("\n", " ")


def batches(dataset, batch_size, workers=0, shuffle=False, generator=None, desc=None, progress=True):
    """Yield (inputs, targets, indices, errors) batches, with a progress bar when `desc` is given."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                         generator=generator, persistent_workers=False)
    iterator = loader
    if desc and progress:
        iterator = tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    try:
        for inputs, targets, indices, errors in iterator:
            yield inputs, targets, indices, list(errors)
    except RuntimeError as exc:
        # DataLoader workers wrap our error; surface its first line only.
        text = str(exc)
        if "HUDDError" in text:
            line = [l for l in text.splitlines() if l.startswith("common.errors.HUDDError")]
            raise HUDDError(line[-1].split(": ", 1)[1] if line else text.splitlines()[-1]) from None
        raise


def resolve_device(name="auto"):
    """'auto' means CUDA when present, else CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise HUDDError(f"--device {name!r}: {exc}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HUDDError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
