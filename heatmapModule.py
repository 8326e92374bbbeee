"""LRP heatmaps: the relevance at the input of every layer of a CNN, from one forward and one backward pass.

One engine serves every rule (zennit-style, package lrp): hooks placed around each layer for a single
forward pass insert small autograd functions, so that one ``torch.autograd.grad`` call returns relevance
instead of the gradient at every layer input. A rule only declares how a layer's inputs, weights and
denominator are modified; presets map layer kinds to rules. Works on any chain of supported layers (the
built-in models, torchvision AlexNet and VGG) with no ``relprop`` method in the user's model. Functional
ReLUs between modules keep their gradient, which equals pass-through wherever relevance arrives (every
rule here multiplies by its layer's input, which is zero where such a ReLU clipped); BatchNorm2d is
merged into the convolution before it for the computation only; modified weights (z+, zB) are cached
per module until its parameters change.

    rel = layer_relevance(model, images)                 # {"Layer0": (B,3,256,256), "Layer1": ...}
    rel = layer_relevance(model, images, rule="composite", layers=["Layer0"])
    write_heatmaps(model, image_set, "CASE/T/Heatmaps")  # streamed to <Layer>.npy + layers.csv
"""
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.errors import HUDDError
from lrp.engine import layer_relevance, layer_table
from lrp.rules import HUDD_EPSILON, RULES, ZENNIT_EPSILON, Preset, Rule, Term, preset as _preset  # noqa: F401
from lrp.tracing import KINDS, SUPPORTED, model_device as _model_device  # noqa: F401

STORAGE_DTYPES = ("float32", "float16")


def _image_shape(dataset):
    spec = getattr(dataset, "spec", None)
    if spec is not None:
        return (spec.channels, spec.height, spec.width)
    return tuple(dataset[0][0].shape)


def _default_bounds(dataset):
    spec = getattr(dataset, "spec", None)
    if spec is None:
        return None
    mean = torch.tensor(spec.mean, dtype=torch.float32)
    std = torch.tensor(spec.std, dtype=torch.float32)
    return (0 - mean) / std, (1 - mean) / std


def write_heatmaps(model, dataset, out_dir, *, rule="hudd", batch_size=32, device="cpu", workers=0,
                   dtype="float32", start_fn=None, layers=None, progress=True, bounds=None):
    """Stream the relevance of every kept layer (or `layers`) of every image to out_dir/<Layer>.npy.

    Rows follow the dataset order; each file is written under a temporary name and renamed into place
    only when complete, so a killed run leaves no half file under a final name. Also writes
    out_dir/layers.csv. start_fn(outputs, indices) -> start relevance (default: the predicted logit).
    Returns the layer names written.
    """
    from common.data import batches, resolve_device

    preset = _preset(rule)
    if dtype not in STORAGE_DTYPES:
        raise HUDDError(f"heatmap dtype {dtype!r}; use float32 or float16")
    if int(batch_size) < 1:
        raise HUDDError(f"batch size {batch_size}; use 1 or more")
    device = resolve_device(device)
    if preset.first is not None and bounds is None:
        bounds = _default_bounds(dataset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_device, _ = _model_device(model)
    model.to(device)
    temps = {}
    try:
        names, shapes = _write_layer_table(model, dataset, out_dir, layers)
        arrays = _open_outputs(out_dir, names, shapes, len(dataset), dtype, temps)
        for inputs, _, indices, errors in batches(dataset, batch_size, workers=workers, desc="heatmaps",
                                                  progress=progress):
            _check_errors(dataset, indices, errors)
            start = None
            if start_fn is not None:
                start = (lambda outputs, idx=indices: start_fn(outputs, idx))
            relevance = layer_relevance(model, inputs.to(device), rule=preset, start=start, layers=names,
                                        bounds=bounds)
            rows_at = indices.numpy()
            for name in names:
                arrays[name][rows_at] = relevance[name].cpu().numpy().astype(dtype, copy=False)
            del relevance
        for array in arrays.values():
            array.flush()
        arrays.clear()
        for name in names:
            os.replace(temps.pop(name), out_dir / f"{name}.npy")
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        model.to(model_device)
    return names


def _write_layer_table(model, dataset, out_dir, layers):
    """out_dir/layers.csv; returns the layer names to write (the kept ones by default) and their shapes."""
    import pandas as pd

    from common.files import write_csv

    table = layer_table(model, _image_shape(dataset))
    names = [row["layer"] for row in table if row["kept"]] if layers is None else list(layers)
    known = {row["layer"]: row for row in table}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise HUDDError(f"unknown layer {unknown[0]!r}; this model has Layer0 to Layer{len(table) - 1}")
    rows = pd.DataFrame([{**row, "shape": "x".join(str(v) for v in row["shape"])} for row in table])
    write_csv(out_dir / "layers.csv", rows[["index", "layer", "module", "type", "shape", "kept"]])
    return names, {name: known[name]["shape"] for name in names}


def _open_outputs(out_dir, names, shapes, count, dtype, temps):
    """A memory-mapped .npy per layer under a temporary name (recorded in `temps`); none for no images."""
    arrays = {}
    for name in names:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.npy.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        temps[name] = tmp
        if count:
            arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(count, *shapes[name]))
        else:
            with open(tmp, "wb") as handle:
                np.save(handle, np.zeros((0, *shapes[name]), dtype=dtype))
    return arrays


def _check_errors(dataset, indices, errors):
    for index, error in zip(indices.tolist(), errors):
        if error:
            images = getattr(dataset, "images", None)
            root = getattr(dataset, "root", None)
            where = Path(root) / images[index] if images is not None and root is not None else f"image {index}"
            raise HUDDError(f"{where}: cannot be read ({error}); fix or remove the image and rerun the test step")
