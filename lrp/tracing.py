"""Tracing a model into a plan: one image through the model records the chain of leaf modules, their
input shapes and the functional glue between them; BatchNorm2d is paired with the convolution before
it, and a layer whose relevance copies the previous one's is marked not kept. Plans are cached per
model, input shape, device, dtype and module structure."""
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import HUDDError

# layer kind -> module types whose own forward we understand (subclasses must not override forward)
KINDS = {
    "conv": (nn.Conv2d, nn.ConvTranspose2d),
    "linear": (nn.Linear,),
    "maxpool": (nn.MaxPool2d,),
    "avgpool": (nn.AvgPool2d, nn.AdaptiveAvgPool2d),
    "batchnorm": (nn.BatchNorm2d,),
    "pass": (nn.ReLU, nn.Dropout, nn.Flatten, nn.Identity),
}
SUPPORTED = ", ".join(t.__name__ for types in KINDS.values() for t in types)

# autograd nodes allowed between two modules (functional glue), and those that keep values in place
GLUE_OPS = {"ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "CloneBackward", "AliasBackward",
            "SqueezeBackward", "UnsqueezeBackward", "ReluBackward", "PermuteBackward", "TransposeBackward",
            "TBackward"}
SAME_VALUE_OPS = {"ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward", "CloneBackward",
                  "AliasBackward", "SqueezeBackward", "UnsqueezeBackward"}


@dataclass
class Layer:
    """One leaf module of the plan, in forward order."""

    index: int
    name: str                 # dotted module name
    module: nn.Module
    kind: str
    shape: tuple              # relevance shape of one image (the module's input shape)
    merged: int = None        # batchnorm: index of the convolution it is merged into
    norm: int = None          # convolution: index of the batchnorm merged into it
    kept: bool = True

    @property
    def layer(self):
        return f"Layer{self.index}"


_PLANS = weakref.WeakKeyDictionary()       # model -> {(shape, device, dtype, structure): [Layer]}


def _kind(name, module):
    for kind, types in KINDS.items():
        if isinstance(module, types):
            base = next(t for t in types if isinstance(module, t))
            if type(module).forward is base.forward:
                return kind
    raise HUDDError(f"module {name!r} ({type(module).__name__}) is not supported by the LRP engine; "
                    f"supported layers: {SUPPORTED} and functional reshapes/ReLUs between them; replace it "
                    f"or pick another model")


def _leaves(model):
    return [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]


def _structure(model):
    return tuple((name, type(m).__name__, id(m)) for name, m in model.named_modules())


def _glue(node, target, what, accept_leaf=None):
    """Walk the autograd nodes from `node` back to `target`; return their names, or raise if not glue."""
    ops = []
    while node is not target:
        name = node.name() if node is not None else "nothing"
        if accept_leaf is not None and node is not None and getattr(node, "variable", None) is accept_leaf:
            break
        base = name.rstrip("0123456789")
        nxt = [n for n, _ in node.next_functions if n is not None] if node is not None else []
        if base not in GLUE_OPS or len(nxt) != 1:
            raise HUDDError(f"{what} goes through {name}, which the LRP engine cannot follow; it needs a chain "
                            f"of layers joined only by reshapes and ReLUs (no residual adds, concatenations "
                            f"or branches)")
        ops.append(base)
        node = nxt[0]
    return ops


def _record(model, leaves, sample_shape, device, dtype):
    """One zero image through `model`: [module, input, output, output's grad_fn] per leaf call, the
    input tensor and the model output; raises for what the engine cannot follow."""
    calls, versions = [], []

    def pre_hook(module, args):
        tensors = [a for a in args if torch.is_tensor(a)]
        if len(args) != 1 or len(tensors) != 1:
            raise HUDDError(f"module {leaves[module]!r} ({type(module).__name__}) is called with "
                            f"{len(args)} positional inputs; the LRP engine needs exactly one tensor per layer")
        if any(m is module for m, *_ in calls):
            raise HUDDError(f"module {leaves[module]!r} is called twice in one forward pass; give each use "
                            f"its own module")
        calls.append([module, args[0], None, None])

    def hook(module, args, output):
        if not torch.is_tensor(output):
            raise HUDDError(f"module {leaves[module]!r} returns a {type(output).__name__}, not a tensor")
        calls[-1][2] = output
        calls[-1][3] = output.grad_fn
        versions.append((output, output._version, leaves[module]))

    handles = []
    try:
        for module in leaves:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        x = torch.zeros((1, *sample_shape), device=device, dtype=dtype, requires_grad=True)
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not torch.is_tensor(output):
        raise HUDDError(f"the model returns a {type(output).__name__}; the LRP engine needs a single tensor")
    if not calls:
        raise HUDDError("the model has no layers the LRP engine could see (no leaf modules were called)")
    for tensor, version, name in versions:
        if tensor._version != version:
            raise HUDDError(f"the output of module {name!r} is modified in place after it returns (e.g. "
                            f"F.relu(x, inplace=True)); use the out-of-place form")
    return calls, x, output


def _merge_batchnorms(layers, glue):
    """Pair each BatchNorm2d with the convolution right before it (merged for the computation only)."""
    for layer, ops in zip(layers, glue):
        if layer.kind != "batchnorm":
            continue
        before = layers[layer.index - 1] if layer.index else None
        if before is None or before.kind != "conv" or ops:
            raise HUDDError(f"module {layer.name!r} (BatchNorm2d) does not directly follow a convolution, so it "
                            f"cannot be merged into one; put it right after a Conv2d/ConvTranspose2d")
        if layer.module.running_mean is None:
            raise HUDDError(f"module {layer.name!r} (BatchNorm2d) has no running statistics "
                            f"(track_running_stats=False); the LRP engine needs them to merge it")
        layer.merged, before.norm = before.index, layer.index


def _trace(model, sample_shape, device, dtype):
    """Run one image through `model` and record the chain of leaf modules, their shapes and glue."""
    leaves = {m: name for name, m in _leaves(model)}
    calls, x, output = _record(model, leaves, sample_shape, device, dtype)
    layers, glue = [], []
    for index, (module, inp, out, node) in enumerate(calls):
        name = leaves[module]
        kind = _kind(name, module)
        if index == 0:
            ops = _glue(inp.grad_fn, None, f"the input of {name!r}", accept_leaf=x)
        else:
            ops = _glue(inp.grad_fn, calls[index - 1][3], f"the path from {layers[-1].name!r} to {name!r}")
        glue.append(ops)
        layers.append(Layer(index, name, module, kind, tuple(inp.shape[1:])))
    _glue(output.grad_fn, calls[-1][3], f"the path from {layers[-1].name!r} to the model output")
    _merge_batchnorms(layers, glue)
    for layer, ops in zip(layers[1:], glue[1:]):
        before = layers[layer.index - 1]
        passes = before.kind in ("pass", "batchnorm")
        layer.kept = not (passes and all(op in SAME_VALUE_OPS for op in ops))
    return layers


def plan(model, sample_shape, device, dtype):
    """The model's chain of Layers for inputs of `sample_shape`, traced once and cached."""
    key = (tuple(sample_shape), str(device), dtype, _structure(model))
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        with Evaluation(model, out_of_place=True):
            plans[key] = _trace(model, sample_shape, device, dtype)
    return plans[key]


class Evaluation:
    """Eval mode (and, for tracing, out-of-place activations); the model is restored afterwards.

    The relevance pass keeps in-place ReLUs in place: each one gets a detached alias of its input,
    so it saves the memory traffic of a copy without touching the autograd graph.
    """

    def __init__(self, model, out_of_place=False):
        self.model = model
        self.out_of_place = out_of_place

    def __enter__(self):
        self.training = [(m, m.training) for m in self.model.modules()]
        self.inplace = [(m, m.inplace) for m in self.model.modules() if isinstance(getattr(m, "inplace", None), bool)]
        self.model.eval()
        if self.out_of_place:
            for m, _ in self.inplace:
                m.inplace = False
        return self

    def __exit__(self, *exc):
        for m, flag in self.training:
            m.training = flag
        for m, flag in self.inplace:
            m.inplace = flag


def model_device(model):
    """(device, dtype) of the model's first parameter or buffer; CPU float32 for a model with neither."""
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
