"""LRP heatmaps: the relevance at the input of every layer of a CNN, from one forward and one backward pass.

One engine serves every rule (zennit-style): hooks placed around each layer for a single forward pass
insert small autograd functions, so that one ``torch.autograd.grad`` call returns relevance instead of
the gradient at every layer input. A rule only declares how a layer's inputs, weights and denominator
are modified; presets map layer kinds to rules. Works on any chain of supported layers (the built-in
models, torchvision AlexNet and VGG) with no ``relprop`` method in the user's model. Functional ReLUs
between modules keep their gradient, which equals pass-through wherever relevance arrives (every rule
here multiplies by its layer's input, which is zero where such a ReLU clipped); BatchNorm2d is merged
into the convolution before it for the computation only; modified weights (z+, zB) are cached per
module until its parameters change.

    rel = layer_relevance(model, images)                 # {"Layer0": (B,3,256,256), "Layer1": ...}
    rel = layer_relevance(model, images, rule="composite", layers=["Layer0"])
    write_heatmaps(model, image_set, "CASE/T/Heatmaps")  # streamed to <Layer>.npy + layers.csv
"""
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import HUDDError
from common.memory import retain_freed_memory

HUDD_EPSILON = 1e-9         # the original's Z = Y + 1e-9 for convolutions, pools and z+ layers
ZENNIT_EPSILON = 1e-6       # zennit's default stabiliser, used by the epsilon and composite presets
STORAGE_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class Term:
    """One summand of a layer's modified forward: z += layer(inputs, weights, bias).

    inputs: x | x+ | x- | x-low | x-high (x minus the zB bounds); weights/bias: all | positive |
    negative | zero. Relevance = sum over terms of input ⊙ gradient of the term.
    """

    inputs: str = "x"
    weights: str = "all"
    bias: str = "all"


PLAIN = (Term(),)


@dataclass(frozen=True)
class Rule:
    """How a layer maps the relevance R at its output to its input.

    kind: "lrp" = x ⊙ J_z^T (R / stabilised z) with z the sum of `terms`; "winner" = the same for a
    max-pool (winner takes all, summed where windows overlap); "pass" = R unchanged; "gradient" = the
    layer's own gradient; "unpool" = the original's max_unpool2d (overwrites where pooling windows share
    a maximum). `signed`: add epsilon with the sign of z (zennit), else add it.
    """

    name: str
    kind: str = "lrp"
    terms: tuple = PLAIN
    epsilon: float = HUDD_EPSILON
    signed: bool = False


@dataclass(frozen=True)
class Preset:
    """Layer kind -> rule; `first` overrides the rule of the first conv or linear layer in forward order
    (the input layer, also behind a Flatten or a pool, as zennit's first-layer composites)."""

    name: str
    conv: Rule
    linear: Rule
    maxpool: Rule
    avgpool: Rule
    first: Rule = None
    description: str = ""


PASS = Rule("pass", kind="pass")
GRADIENT = Rule("gradient", kind="gradient")
LRP_HUDD = Rule("z (Y + 1e-9)")
WINNER_HUDD = Rule("winner takes all (Y + 1e-9)", kind="winner")
ZPLUS_HUDD = Rule("z+ (bias ignored)", terms=(Term(weights="positive", bias="zero"),))
UNPOOL_COMPAT = Rule("max-unpool (overwrites)", kind="unpool")
EPSILON = Rule("epsilon", epsilon=ZENNIT_EPSILON, signed=True)
ZPLUS = Rule("z+", terms=(Term("x+", "positive", "positive"), Term("x-", "negative", "zero")),
             epsilon=ZENNIT_EPSILON, signed=True)
# zB: z = W x + b - (W+ l + b+) - (W- h + b-) = W+ (x - l) + W- (x - h), since W = W+ + W- and b = b+ + b-;
# two terms instead of three, and R = (x - l) ⊙ J+^T S + (x - h) ⊙ J-^T S is the same relevance.
ZBOX = Rule("zB", terms=(Term("x-low", "positive", "zero"), Term("x-high", "negative", "zero")),
            epsilon=ZENNIT_EPSILON, signed=True)

RULES = {
    "hudd": Preset("hudd", conv=LRP_HUDD, linear=ZPLUS_HUDD, maxpool=WINNER_HUDD, avgpool=LRP_HUDD,
                   description="the original's rules; winner-takes-all max-pool summed where windows overlap"),
    "hudd-compat": Preset("hudd-compat", conv=LRP_HUDD, linear=ZPLUS_HUDD, maxpool=UNPOOL_COMPAT,
                          avgpool=LRP_HUDD,
                          description="hudd plus the original's max_unpool2d overwriting at overlapping pools"),
    "epsilon": Preset("epsilon", conv=EPSILON, linear=EPSILON, maxpool=GRADIENT, avgpool=EPSILON,
                      description="LRP-epsilon (1e-6) everywhere, max-pool by its gradient (as zennit)"),
    "composite": Preset("composite", conv=ZPLUS, linear=EPSILON, maxpool=GRADIENT, avgpool=EPSILON,
                        first=ZBOX,
                        description="zB on the input layer, z+ on convolutions, epsilon on dense layers"),
}

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


# ----------------------------------------------------------------------------- autograd building blocks

class _Contribution(torch.autograd.Function):
    """Forward: `value` (a modified copy of the layer input); backward: gradient ⊙ value, sent to `source`."""

    @staticmethod
    def forward(ctx, source, value):
        ctx.save_for_backward(value)
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        return grad.mul_(value), None     # grad is the fresh input gradient of this layer alone


class _Output(torch.autograd.Function):
    """Forward: the layer's true output `value`; backward: gradient / stabilised z, sent to `z`.

    z is kept without autograd's version check: an in-place ReLU after the layer may clip it to
    max(z, 0), which changes z only where the relevance arriving is zero (as in the original).
    The backward divides in z's own memory: in a chain of layers every reader of z (the layers
    after this one) has finished its backward by then, and a big fresh tensor costs page faults.
    """

    @staticmethod
    def forward(ctx, z, value, epsilon, signed):
        ctx.z = z.detach()
        ctx.epsilon, ctx.signed = epsilon, signed
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        z, ctx.z = ctx.z, None
        if ctx.signed:
            denominator = _stabilise(z, ctx.epsilon, ctx.signed)
        else:
            denominator = z.add_(ctx.epsilon)
        return torch.div(grad, denominator, out=denominator), None, None, None


class _Winner(torch.autograd.Function):
    """Max-pool LRP, x ⊙ J^T (R / (Y + eps)), computed on the pooled side: at each window's winner x = Y,
    so the pool's own gradient applied to R ⊙ Y / (Y + eps) is the same, summed where windows overlap."""

    @staticmethod
    def forward(ctx, value, epsilon):
        ctx.value = value.detach()        # unchecked, like _Output.z: an in-place ReLU may clip it
        ctx.epsilon = epsilon
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value = ctx.value
        share = value + ctx.epsilon
        torch.div(value, share, out=share)
        return share.mul_(grad), None


class _Pass(torch.autograd.Function):
    """Forward: the module's output; backward: relevance unchanged (reshaped to the input's shape)."""

    @staticmethod
    def forward(ctx, source, value):
        ctx.shape = source.shape
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None


class _Unpool(torch.autograd.Function):
    """The original's max-pool rule: C = max_unpool2d(R / (Y + eps)); where windows share a maximum the
    last write wins, so relevance is lost (reproduced for hudd-compat)."""

    @staticmethod
    def forward(ctx, source, value, indices, pool, epsilon):
        ctx.value, ctx.indices = value, indices      # unchecked, like _Output.z
        ctx.pool, ctx.epsilon, ctx.size = pool, epsilon, source.shape[-2:]
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value, indices, pool = ctx.value, ctx.indices, ctx.pool
        scaled = grad / (value + ctx.epsilon)
        routed = F.max_unpool2d(scaled, indices, pool.kernel_size, pool.stride, pool.padding,
                                output_size=ctx.size)
        return routed, None, None, None, None


def _stabilise(z, epsilon, signed):
    if signed:
        return torch.where(z >= 0, z + epsilon, z - epsilon)
    return z + epsilon


# ------------------------------------------------------------------------------------ the layer plan

@dataclass
class _Layer:
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


_PLANS = weakref.WeakKeyDictionary()       # model -> {(shape, device, dtype, structure): [_Layer]}
_WEIGHTS = weakref.WeakKeyDictionary()     # conv/linear module -> {(term, norm id): (stamp, (w, b))}


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


def _trace(model, sample_shape, device, dtype):
    """Run one image through `model` and record the chain of leaf modules, their shapes and glue."""
    calls, versions = [], []
    leaves = {m: name for name, m in _leaves(model)}

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

    layers, glue = [], []
    for index, (module, inp, out, node) in enumerate(calls):
        name = leaves[module]
        kind = _kind(name, module)
        if index == 0:
            ops = _glue(inp.grad_fn, None, f"the input of {name!r}", accept_leaf=x)
        else:
            ops = _glue(inp.grad_fn, calls[index - 1][3], f"the path from {layers[-1].name!r} to {name!r}")
        glue.append(ops)
        layers.append(_Layer(index, name, module, kind, tuple(inp.shape[1:])))
    _glue(output.grad_fn, calls[-1][3], f"the path from {layers[-1].name!r} to the model output")

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
    for layer, ops in zip(layers[1:], glue[1:]):
        before = layers[layer.index - 1]
        passes = before.kind in ("pass", "batchnorm")
        layer.kept = not (passes and all(op in SAME_VALUE_OPS for op in ops))
    return layers


def _plan(model, sample_shape, device, dtype):
    key = (tuple(sample_shape), str(device), dtype, _structure(model))
    plans = _PLANS.setdefault(model, {})
    if key not in plans:
        with _Evaluation(model, out_of_place=True):
            plans[key] = _trace(model, sample_shape, device, dtype)
    return plans[key]


class _Evaluation:
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


def _model_device(model):
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------- modified parameters

def _modify(tensor, how):
    if tensor is None or how == "zero":
        return None
    if how == "positive":
        return tensor.clamp(min=0)
    if how == "negative":
        return tensor.clamp(max=0)
    return tensor


def _merged(conv, norm):
    """Weights and bias of `conv` with the batchnorm `norm` (eval statistics) folded in."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    if norm is None:
        return weight, bias
    scale = torch.rsqrt(norm.running_var.detach() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean.detach() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    if bias is not None:
        shift = shift + bias * scale
    if isinstance(conv, nn.ConvTranspose2d):
        groups = conv.groups
        w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], *weight.shape[2:])
        w = w * scale.reshape(groups, 1, -1, 1, 1)
        return w.reshape(weight.shape), shift
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def _stamp(modules):
    stamp = []
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            stamp.append((tensor._version, tensor.data_ptr(), tensor.device.type))
    return tuple(stamp)


def _term_params(module, norm, term):
    """(weight, bias) of one rule term, cached per module until its parameters change."""
    cache = _WEIGHTS.setdefault(module, {})
    key = (term, id(norm))
    stamp = _stamp((module, norm))
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    weight, bias = _merged(module, norm)
    weight, bias = _modify(weight, term.weights), _modify(bias, term.bias)
    cache[key] = (stamp, (weight, bias))
    return weight, bias


def _apply(module, x, weight, bias):
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module.forward(x)


# ------------------------------------------------------------------------------------- the engine

class _Session:
    """Hooks for one forward pass: they record each layer's input and wire the relevance graph."""

    def __init__(self, plan, preset, bounds):
        self.plan = plan
        self.bounds = bounds
        self.captures = {}
        self.inputs = {}
        first = next((layer.index for layer in plan if layer.kind in ("conv", "linear")), None)
        self.rules = [self._rule(layer, preset, layer.index == first) for layer in plan]

    @staticmethod
    def _rule(layer, preset, is_first):
        if layer.kind == "pass":
            return PASS
        if layer.kind == "batchnorm":
            return None
        if is_first and preset.first is not None:
            return preset.first
        rule = getattr(preset, layer.kind)
        if rule.kind == "unpool" and (layer.module.dilation not in (1, (1, 1))):
            raise HUDDError(f"module {layer.name!r}: the hudd-compat max-unpool rule needs dilation 1; "
                            f"use rule hudd")
        return rule

    def install(self):
        handles = []
        for layer, rule in zip(self.plan, self.rules):
            module = layer.module
            handles.append(module.register_forward_pre_hook(self._pre_hook(layer, rule)))
            handles.append(module.register_forward_hook(self._hook(layer, rule)))
        return handles

    def _group_rule(self, layer):
        """The rule that governs a batchnorm: that of the convolution merged with it."""
        return self.rules[layer.merged]

    def _pre_hook(self, layer, rule):
        def hook(module, args):
            (x,) = args
            if layer.kind != "batchnorm":
                self.captures[layer.layer] = x
            self.inputs[layer.index] = x
            if rule is None or rule.kind in ("gradient", "winner"):
                return None
            if rule.kind == "lrp" and rule.terms == PLAIN:
                return (_Contribution.apply(x, x.detach()),)
            return (x.detach(),)
        return hook

    def _hook(self, layer, rule):
        def hook(module, args, output):
            if layer.kind == "batchnorm":
                out = self._finish(self.plan[layer.merged], self._group_rule(layer), output, layer.module)
                self.captures[layer.layer] = out
                return out
            if rule.kind == "pass":
                return _Pass.apply(self.inputs[layer.index], output)
            if rule.kind == "winner":
                return _Winner.apply(output, rule.epsilon)
            if rule.kind == "gradient" or layer.norm is not None:
                return None
            return self._finish(layer, rule, output, None)
        return hook

    def _finish(self, layer, rule, output, norm):
        """Wrap the output of a layer (or conv+batchnorm group) so that backward applies `rule`."""
        x = self.inputs[layer.index]
        if rule.kind == "lrp" and rule.terms == PLAIN:
            if output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x.device.type != "meta":
                output = output.clone()       # _Output divides in place: never in the layer's input
            return _Output.apply(output, output.detach(), rule.epsilon, rule.signed)
        if rule.kind == "unpool":
            pool = layer.module
            _, indices = F.max_pool2d(x.detach(), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                      pool.ceil_mode, return_indices=True)
            source = _Contribution.apply(x, x.detach())
            return _Unpool.apply(source, output.detach(), indices, pool, rule.epsilon)
        z = None
        nonnegative = _nonnegative(x) if any(t.inputs in ("x+", "x-") for t in rule.terms) else False
        for term in rule.terms:
            if nonnegative and term.inputs == "x-":
                continue                          # x- is all zeros: the term adds nothing to z or to R
            value = x.detach() if nonnegative and term.inputs == "x+" else self._term_input(x.detach(), term.inputs)
            source = _Contribution.apply(x, value)
            if layer.kind in ("conv", "linear"):
                weight, bias = _term_params(layer.module, norm, term)
                part = _apply(layer.module, source, weight, bias)
            else:
                part = _apply(layer.module, source, None, None)
            z = part if z is None else z + part
        return _Output.apply(z, output.detach(), rule.epsilon, rule.signed)

    def _term_input(self, x, which):
        if which == "x":
            return x
        if which == "x+":
            return x.clamp(min=0)
        if which == "x-":
            return x.clamp(max=0)
        low, high = self._bounds(x)
        return x - (low if which == "x-low" else high)

    def _bounds(self, x):
        if self.bounds is None:
            dims = tuple(range(2, x.dim()))
            if dims:
                return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
            return x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in self.bounds)
        return tuple(_channelwise(b, x) for b in (low, high))


def _nonnegative(x):
    """True when x has no negative entry (inputs after a ReLU), so that x+ = x and x- = 0."""
    return x.device.type != "meta" and bool(x.min() >= 0)


def _channelwise(bound, x):
    """Per-channel bounds shaped for x; for a first layer behind a Flatten, repeated per flattened channel."""
    if bound.dim() == 1 and x.dim() > 2:
        return bound.reshape(1, -1, *([1] * (x.dim() - 2)))
    if bound.dim() == 1 and x.dim() == 2 and bound.numel() > 1:
        if x.shape[1] % bound.numel():
            raise HUDDError(f"zB bounds: {bound.numel()} per-channel values for a first layer with "
                            f"{x.shape[1]} inputs; pass scalar bounds or one per input channel")
        return bound.repeat_interleave(x.shape[1] // bound.numel()).reshape(1, -1)
    return bound


def _start_relevance(output, start):
    if callable(start):
        start = start(output.detach().clone())      # the stabiliser later writes into the output's memory
    if start is None:
        if output.dim() != 2:
            raise HUDDError(f"the model output has shape {tuple(output.shape)}, not (batch, classes); pass "
                            f"start= (e.g. the worst keypoint's output map)")
        winner = output.detach().argmax(dim=1, keepdim=True)
        return torch.zeros_like(output).scatter_(1, winner, output.detach().gather(1, winner))
    start = torch.as_tensor(start).to(device=output.device, dtype=output.dtype)
    if start.shape != output.shape:
        raise HUDDError(f"start relevance has shape {tuple(start.shape)} but the model output has shape "
                        f"{tuple(output.shape)}; pass a tensor of the output's shape")
    return start


def _preset(rule):
    if isinstance(rule, Preset):
        return rule
    if rule not in RULES:
        raise HUDDError(f"unknown LRP rule {rule!r}; use one of {', '.join(RULES)}")
    return RULES[rule]


def layer_relevance(model, inputs, rule="hudd", start=None, layers=None, *, bounds=None):
    """Relevance at the input of each leaf module, forward order: {"Layer0": (batch, ...), ...}.

    start: None = the predicted class's logit alone (others zero), a tensor of the output's shape, or a
    callable(outputs) -> such a tensor. layers: names to return (the others are not kept in memory).
    bounds: (low, high) input range for the composite's zB rule (scalars or per-channel); default: each
    image's own per-channel min and max. The model is left as it was (training flags, in-place flags,
    weights); no hook stays registered, also when an error is raised. The first call sets glibc to keep
    freed memory in the process (common.memory: every batch reallocates the same few hundred MB, and
    faulting them in again cost up to 30% of the throughput); HUDD_RETAIN_MEMORY=0 leaves glibc as it is.
    """
    retain_freed_memory()
    preset = _preset(rule)
    if not torch.is_tensor(inputs) or inputs.dim() < 2:
        raise HUDDError("inputs must be a tensor (batch, ...) of images")
    device, dtype = _model_device(model)
    with _Evaluation(model), torch.inference_mode(False), torch.enable_grad():
        plan = _plan(model, inputs.shape[1:], device, dtype)
        names = [layer.layer for layer in plan]
        wanted = names if layers is None else list(layers)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise HUDDError(f"unknown layer {unknown[0]!r}; this model has Layer0 to Layer{len(names) - 1}")
        x = inputs.detach().to(device=device, dtype=dtype)
        if x.is_inference():
            x = x.clone()
        x.requires_grad_(True)
        session = _Session(plan, preset, bounds)
        handles = session.install()
        try:
            output = model(x)
        finally:
            for handle in handles:
                handle.remove()
        relevance = _start_relevance(output, start)
        targets = [session.captures[name] for name in wanted]
        grads = torch.autograd.grad(output, targets, grad_outputs=relevance, allow_unused=True)
    return {name: (g if g is not None else torch.zeros_like(t)).detach()
            for name, g, t in zip(wanted, grads, targets)}


def layer_table(model, input_shape):
    """One row per leaf module in forward order: index, layer, module, type, shape, kept.

    kept is False when the layer's relevance is an exact copy of the previous layer's (the input of a
    module right after a pass-through ReLU, Dropout, Flatten or merged BatchNorm).
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    device, dtype = _model_device(model)
    with _Evaluation(model), torch.inference_mode(False), torch.enable_grad():
        plan = _plan(model, shape, device, dtype)
    return [{"index": layer.index, "layer": layer.layer, "module": layer.name,
             "type": type(layer.module).__name__, "shape": layer.shape, "kept": layer.kept} for layer in plan]


# --------------------------------------------------------------------------------------- streaming

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
    import pandas as pd

    from common.data import batches, resolve_device
    from common.files import write_csv

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
        table = layer_table(model, _image_shape(dataset))
        names = [row["layer"] for row in table if row["kept"]] if layers is None else list(layers)
        known = {row["layer"]: row for row in table}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise HUDDError(f"unknown layer {unknown[0]!r}; this model has Layer0 to Layer{len(table) - 1}")
        rows = pd.DataFrame([{**row, "shape": "x".join(str(v) for v in row["shape"])} for row in table])
        write_csv(out_dir / "layers.csv", rows[["index", "layer", "module", "type", "shape", "kept"]])
        count = len(dataset)
        arrays = {}
        for name in names:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.npy.", suffix=".tmp", dir=out_dir)
            os.close(fd)
            temps[name] = tmp
            if count:
                arrays[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                         shape=(count, *known[name]["shape"]))
            else:
                with open(tmp, "wb") as handle:
                    np.save(handle, np.zeros((0, *known[name]["shape"]), dtype=dtype))
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


def _check_errors(dataset, indices, errors):
    for index, error in zip(indices.tolist(), errors):
        if error:
            images = getattr(dataset, "images", None)
            root = getattr(dataset, "root", None)
            where = Path(root) / images[index] if images is not None and root is not None else f"image {index}"
            raise HUDDError(f"{where}: cannot be read ({error}); fix or remove the image and rerun the test step")
