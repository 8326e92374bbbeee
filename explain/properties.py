"""Measured image properties: what an engineer checks first on an image, for cases without a simulator.

Pixel statistics per image, vectorised over the batches of the tool's one loader (common/data.py),
written to T/properties.csv in params.csv's format (column `image`, then one numeric column per property)
so that RQ1 and the rules read them unchanged. Values are on the [0, 1] pixel scale:

- brightness: mean luminance (Rec. 601 weights for colour); contrast: its standard deviation;
- sharpness: variance of the 3x3 Laplacian of the luminance;
- noise: a robust noise level, 1.4826 x the median absolute value of Immerkaer's high-pass residual / 6
  (the residual's scale for Gaussian noise), so edges and texture barely count;
- colourfulness (colour images only): Hasler and Suesstrunk's sigma_rg,yb + 0.3 mu_rg,yb;
- hue (colour images only): the hue angle (degrees, 0 red, 120 green, 240 blue) of the mean colour; empty
  for a grey image;
- foreground: the pixels whose luminance differs from the median of the image's border by more than
  FOREGROUND_THRESHOLD; area = their share of the image; centre_x / centre_y = their mean position
  (0 left/top, 1 right/bottom); extent_x / extent_y = the width / height of the box holding all but
  EXTENT_TRIM of them on each side, as a share of the image's; aspect = box width / height in pixels.
  Without foreground the position, extent and aspect are empty.
"""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import HUDDError
from common.files import file_fingerprint, json_digest, write_csv, write_json

FOREGROUND_THRESHOLD = 0.1      # luminance difference from the border's median that makes a pixel foreground
EXTENT_TRIM = 0.02              # share of the foreground left out on each side of the extent box (stray pixels)
PROPERTY_PREFIX = "prop_"       # the properties' column prefix beside the columns of an existing params.csv
GRAY_PROPERTIES = ["brightness", "contrast", "sharpness", "noise", "area", "centre_x", "centre_y", "extent_x",
                   "extent_y", "aspect"]
COLOUR_PROPERTIES = ["colourfulness", "hue"]
PROPERTIES_VERSION = 1          # part of the fingerprint: a change of the definitions recomputes the table
BATCH_SIZE = 256

_MAD_TO_STD = 1.4826


def property_names(channels):
    """The columns of properties.csv for images of `channels` channels (1 or 3)."""
    return GRAY_PROPERTIES + (COLOUR_PROPERTIES if channels == 3 else [])


def _second_difference(a, dim):
    """a[i-1] - 2 a[i] + a[i+1] along `dim` (valid part): slices, much faster than a 1-channel conv2d on CPU."""
    n = a.shape[dim]
    return a.narrow(dim, 0, n - 2) - 2 * a.narrow(dim, 1, n - 2) + a.narrow(dim, 2, n - 2)


def _laplacian(luma):
    """The 3x3 Laplacian (0 1 0 / 1 -4 1 / 0 1 0), valid part."""
    return (_second_difference(luma, 2)[:, 1:-1] + _second_difference(luma, 1)[:, :, 1:-1])


def _noise_residual(luma):
    """Immerkaer's (1996) mask (1 -2 1 / -2 4 -2 / 1 -2 1), the product of two second differences: zero on
    linear ramps, so the residual is the noise plus little of the image."""
    return _second_difference(_second_difference(luma, 1), 2)


def _extent(counts, trim):
    """Width (in pixels) of the span holding all but `trim` of the foreground on each side; counts: (B, L)."""
    cum = counts.cumsum(1)
    total = cum[:, -1:]
    first = (cum <= trim * total).sum(1)
    last = counts.shape[1] - (cum >= (1 - trim) * total).sum(1)
    return (last - first + 1).clamp(min=1).to(counts.dtype)


def image_properties(images, threshold=FOREGROUND_THRESHOLD, trim=EXTENT_TRIM):
    """{property: (B,) float64 array} for a (B, C, H, W) batch of images in [0, 1] (C = 1 or 3; torch or numpy)."""
    import torch

    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).to(torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 3:
        raise HUDDError(f"image_properties needs a (B, 1 or 3, H, W) batch with H, W >= 3 (got {tuple(x.shape)})")
    b, c, h, w = x.shape
    luma = x[:, 0] if c == 1 else 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]      # (B, H, W)
    flat = luma.flatten(1)
    out = {"brightness": flat.mean(1), "contrast": flat.std(1, unbiased=False),
           "sharpness": _laplacian(luma).flatten(1).var(1, unbiased=False),
           "noise": _noise_residual(luma).abs().flatten(1).median(1).values * _MAD_TO_STD / 6.0}
    border = torch.cat([luma[:, 0, :], luma[:, -1, :], luma[:, 1:-1, 0], luma[:, 1:-1, -1]], dim=1)
    mask = ((luma - border.median(1).values.view(b, 1, 1)).abs() > threshold).to(torch.float32)
    area = mask.flatten(1).sum(1)
    none = area == 0
    cols, rows = mask.sum(1), mask.sum(2)                  # (B, W) and (B, H)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    safe = area.clamp(min=1)
    width, height = _extent(cols, trim), _extent(rows, trim)
    nan = torch.tensor(float("nan"))
    out.update({"area": area / (h * w),
                "centre_x": torch.where(none, nan, (cols * xs).sum(1) / safe),
                "centre_y": torch.where(none, nan, (rows * ys).sum(1) / safe),
                "extent_x": torch.where(none, nan, width / w), "extent_y": torch.where(none, nan, height / h),
                "aspect": torch.where(none, nan, width / height)})
    if c == 3:
        r, g, bl = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
        rg, yb = r - g, 0.5 * (r + g) - bl
        out["colourfulness"] = (torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
                                + 0.3 * torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2))
        alpha = (r - 0.5 * (g + bl)).mean(1)
        beta = (math.sqrt(3) / 2 * (g - bl)).mean(1)
        hue = torch.rad2deg(torch.atan2(beta, alpha)) % 360.0
        out["hue"] = torch.where(torch.sqrt(alpha ** 2 + beta ** 2) < 1e-3, nan, hue)
    return {name: out[name].to(torch.float64).numpy() for name in property_names(c)}


# ----------------------------------------------------------------------------------------------
# the case folder's table

def properties_path(t_dir):
    return Path(t_dir) / "properties.csv"


def _fingerprint_path(t_dir):
    return Path(t_dir) / "properties.json"


def image_spec(datasets_dir, image):
    """The spec properties are measured at when no model gives one: the first image's channels and size,
    other sizes resized to it."""
    from PIL import Image

    from common.data import GRAY_MODES, ImageSpec

    path = Path(datasets_dir) / image
    try:
        with Image.open(path) as img:
            channels, (width, height) = (1 if img.mode in GRAY_MODES else 3), img.size
    except OSError as exc:
        raise HUDDError(f"{path}: cannot be read ({exc}); replace or remove it") from None
    return ImageSpec(channels, height, width, preprocess="resize")


def _unit(spec):
    """The same images, unnormalised: values in [0, 1]."""
    return replace(spec, mean=(0.0,) * spec.channels, std=(1.0,) * spec.channels)


def fingerprint(datasets_dir, images, spec, threshold=FOREGROUND_THRESHOLD, trim=EXTENT_TRIM):
    """One hash over the image keys with their size and modification time, the spec and the definitions."""
    root = Path(datasets_dir)
    files = [(key, file_fingerprint(root / key) if (root / key).exists() else "missing") for key in images]
    return json_digest({"images": files, "spec": [spec.channels, spec.height, spec.width, spec.preprocess],
                        "threshold": threshold, "trim": trim, "version": PROPERTIES_VERSION})


def measure_properties(datasets_dir, images, spec, batch_size=BATCH_SIZE, workers=0, progress=True,
                       threshold=FOREGROUND_THRESHOLD, trim=EXTENT_TRIM, notes=None):
    """A DataFrame image + one column per property for `images` (keys relative to DataSets/); an image that
    does not decode gets an empty row, with one line in `notes`."""
    from common.data import ImageSet, batches

    names = property_names(spec.channels)
    values = np.full((len(images), len(names)), np.nan)
    unreadable = []
    dataset = ImageSet(datasets_dir, images, _unit(spec))
    for inputs, _, indices, errors in batches(dataset, batch_size, workers=workers, desc="properties",
                                              progress=progress):
        ok = np.array([not e for e in errors])
        unreadable += [(images[int(i)], e) for i, e in zip(indices, errors) if e]
        if ok.any():
            measured = image_properties(inputs[ok], threshold, trim)
            values[indices.numpy()[ok]] = np.column_stack([measured[n] for n in names])
    if unreadable and notes is not None:
        notes.append(f"{len(unreadable)} image{'s' if len(unreadable) > 1 else ''} could not be read "
                     f"(e.g. {unreadable[0][0]}: {unreadable[0][1]}); their properties are empty")
    return pd.concat([pd.DataFrame({"image": list(images)}), pd.DataFrame(values, columns=names)], axis=1)


def _constant_note(frame):
    """One line naming the properties constant over a split (kept: RQ1 gives them ratio 1, no rule uses them)."""
    split = frame["image"].str.split("/", n=1).str[0]
    parts = []
    for name, group in frame.groupby(split, sort=True):
        constant = [c for c in frame.columns[1:] if group[c].nunique(dropna=True) <= 1]
        if constant:
            parts.append(f"{name}: {', '.join(constant)}")
    return (f"properties constant over a split, kept (they explain no cluster): {'; '.join(parts)}"
            if parts else None)


def write_properties(case_dir, spec=None, splits=None, batch_size=BATCH_SIZE, workers=0, progress=True,
                     threshold=FOREGROUND_THRESHOLD, trim=EXTENT_TRIM, force=False):
    """T/properties.csv for every image of every split (atomic), reused when T/properties.json's fingerprint
    of the image list, the spec and the definitions matches, recomputed otherwise. `spec`: the model's
    ImageSpec (the images as the DNN sees them), else image_spec of the first image. `splits`: common.data
    list_case's result (listed here when None). Returns (frame, notes); notes are one-line warnings."""
    from common.data import list_case

    case_dir = Path(case_dir)
    datasets, t_dir = case_dir / "DataSets", case_dir / "T"
    splits = list_case(case_dir) if splits is None else splits
    images = [key for split in splits.values() for key in split.images]
    if not images:
        raise HUDDError(f"{datasets}: no images to measure; add images to the splits")
    spec = image_spec(datasets, images[0]) if spec is None else spec
    stamp = fingerprint(datasets, images, spec, threshold, trim)
    path, stamp_path = properties_path(t_dir), _fingerprint_path(t_dir)
    if not force and path.is_file() and stamp_path.is_file():
        import json

        try:
            fresh = json.loads(stamp_path.read_text(encoding="utf-8")).get("fingerprint") == stamp
        except (ValueError, OSError):
            fresh = False
        if fresh:
            frame = read_properties(t_dir)
            if frame["image"].astype(str).tolist() == images:
                return frame, []
    notes = []
    frame = measure_properties(datasets, images, spec, batch_size, workers, progress, threshold, trim, notes)
    constant = _constant_note(frame)
    if constant:
        notes.append(constant)
    write_csv(path, frame)
    write_json(stamp_path, {"fingerprint": stamp, "images": len(images), "columns": list(frame.columns[1:])})
    return frame, notes


def read_properties(t_dir):
    from common.tables import read_table

    return read_table(properties_path(t_dir), required=["image"],
                      missing_hint="run the properties step (-step properties)")


def merge_properties(params, properties, prefix=PROPERTY_PREFIX):
    """params.csv with the measured properties beside it: every image of either, params' columns as they are,
    each property as `<prefix><name>` unless params already has that column (params win)."""
    if "image" not in params.columns or "image" not in properties.columns:
        raise HUDDError("merging properties needs a column 'image' in params.csv and in properties.csv")
    params = params.assign(image=params["image"].astype(str)).drop_duplicates("image")
    extra = properties.assign(image=properties["image"].astype(str)).drop_duplicates("image")
    extra = extra.rename(columns={c: f"{prefix}{c}" for c in extra.columns if c != "image"})
    extra = extra[[c for c in extra.columns if c == "image" or c not in params.columns]]
    return params.merge(extra, on="image", how="outer", sort=False)


def parameter_table(case_dir):
    """(the table RQ1 and the rules read, its source): DataSets/params.csv with T/properties.csv merged in
    ('params+properties'), either alone ('params' or 'properties'), or (None, None)."""
    from explain.rq1 import read_params

    case_dir = Path(case_dir)
    params_path, props_path = case_dir / "DataSets" / "params.csv", properties_path(case_dir / "T")
    params = read_params(params_path) if params_path.is_file() else None
    props = read_properties(case_dir / "T") if props_path.is_file() else None
    if params is not None and props is not None:
        return merge_properties(params, props), "params+properties"
    if params is not None:
        return params, "params"
    if props is not None:
        return props, "properties"
    return None, None
