"""The model zoo and the one model file format.

A model file is a ``.pth`` holding a plain dict (loadable with ``torch.load(weights_only=True)``):

    format       "hudd-model"            version   1
    arch         "alexnet" | "smallalexnet" | "kpnet" | "torchvision.<name>"
    arch_args    keyword arguments of the architecture's constructor
    state_dict   the weights
    task         "classification" | "keypoints"
    classes      class names in output order (keypoint names for "keypoints")
    input_size   [C, H, W]
    mean, std    per-channel normalisation applied after scaling pixels to [0, 1]
    preprocess   "exact" (images must be H x W) | "resize" | "center-crop"
    extra        free metadata; for task "keypoints": "components" = {component: [keypoint names]}
                 (the FLD result columns; no component may share a keypoint's name)

so ``-m NAME`` is all a user passes. Your own torchvision classifier is one call away:

    models.save_model("CASE/DNNModels/vgg.pth", net, arch="torchvision.vgg11",
                      arch_args={"num_classes": 3}, classes=["a", "b", "c"],
                      input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""
import pickle
from pathlib import Path

import torch

from common.errors import HUDDError
from common.files import save_torch
from models.alexnet import AlexNet, SmallAlexNet
from models.kpnet import KPNet

FORMAT = "hudd-model"
VERSION = 1
ARCHITECTURES = {"alexnet": AlexNet, "smallalexnet": SmallAlexNet, "kpnet": KPNet}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_model(arch, arch_args=None):
    """Instantiate an architecture by name: a built-in one, or ``torchvision.<name>`` (untrained)."""
    arch_args = dict(arch_args or {})
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](**arch_args)
    if arch.startswith("torchvision."):
        import torchvision

        factory = getattr(torchvision.models, arch.split(".", 1)[1], None)
        if callable(factory):
            return factory(weights=None, **arch_args)
    known = ", ".join(sorted(ARCHITECTURES))
    raise HUDDError(f"unknown architecture {arch!r}; use one of {known} or torchvision.<model name>")


def save_model(path, model, arch, classes, input_size, mean, std, arch_args=None,
               task="classification", preprocess="exact", extra=None):
    """Save `model` in the project's format (atomically); see the module docstring."""
    if preprocess not in ("exact", "resize", "center-crop"):
        raise HUDDError(f"preprocess={preprocess!r}; use exact, resize or center-crop")
    if len(input_size) != 3 or len(mean) != input_size[0] or len(std) != input_size[0]:
        raise HUDDError(f"input_size {tuple(input_size)} must be (C, H, W) with C values in mean and std")
    record = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "arch_args": dict(arch_args or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "task": task,
        "classes": [str(c) for c in classes],
        "input_size": [int(v) for v in input_size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "preprocess": preprocess,
        "extra": dict(extra or {}),
    }
    save_torch(path, record)
    return Path(path)


def resolve_model_path(case_dir, name):
    """`-m NAME` is a file in CASE/DNNModels (with or without .pth) or a path."""
    candidates = [Path(name), Path(case_dir) / "DNNModels" / name, Path(case_dir) / "DNNModels" / f"{name}.pth"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise HUDDError(f"{Path(case_dir) / 'DNNModels' / name}: no such model file; put the model in "
                    f"CASE/DNNModels/ or pass its path with -m")


def load_model(path, device="cpu", trust=False):
    """Load a model file; return (model in eval mode, metadata dict without the weights).

    Never unpickles arbitrary objects unless `trust` is True (``--trust-model``).
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Only a pickle that names classes to import ("Unsupported global") is a full pickle; any other
        # failure of the weights-only unpickler means the file is not a pickle at all.
        if "weights only" not in str(exc).lower() or "unsupported global" not in str(exc).lower():
            raise HUDDError(f"{path}: not a model file (unreadable pickle); pass a .pth written by "
                            f"models.save_model") from None
        if not trust:
            raise HUDDError(f"{path}: a full pickle, which can run code when loaded; re-save it with "
                            f"models.save_model, or pass --trust-model if you trust its source") from None
        return _load_trusted(path, device)
    except Exception as exc:  # an arbitrary file fails the unpickler in arbitrary ways
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise HUDDError(f"{path}: not a model file ({reason}); pass a .pth written by models.save_model") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        if isinstance(record, dict) and record and all(torch.is_tensor(v) for v in record.values()):
            raise HUDDError(f"{path}: a bare state_dict without its architecture; load it into your "
                            f"network and re-save with models.save_model(path, net, arch=...)")
        raise HUDDError(f"{path}: not a HUDD model file (no 'format': {FORMAT!r}); save it with models.save_model")
    model = build_model(record["arch"], record["arch_args"])
    missing, unexpected = _load_state(model, record["state_dict"])
    if missing or unexpected:
        raise HUDDError(f"{path}: weights do not fit architecture {record['arch']} {record['arch_args']} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-save the model")
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def _load_state(model, state):
    result = model.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _load_trusted(path, device):
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        model = build_model(obj["arch"], obj["arch_args"])
        _load_state(model, obj["state_dict"])
        return model.to(device).eval(), {k: v for k, v in obj.items() if k != "state_dict"}
    if not isinstance(obj, torch.nn.Module):
        raise HUDDError(f"{path}: holds a {type(obj).__name__}, not a model; pass a .pth written by models.save_model")
    meta = {"format": FORMAT, "arch": type(obj).__name__, "arch_args": {}, "task": "classification",
            "classes": None, "input_size": None, "mean": None, "std": None, "preprocess": "exact",
            "trusted_pickle": True}
    return obj.to(device).eval(), meta
