"""The engine: hooks placed around each layer for a single forward pass insert the autograd functions
of lrp.functions, so that one ``torch.autograd.grad`` call returns the relevance at the input of every
layer under the rules of a preset."""
import torch
import torch.nn.functional as F

from common.errors import HUDDError
from common.memory import retain_freed_memory
from lrp.functions import Contribution, Output, Pass, Unpool, Winner
from lrp.rules import PASS, PLAIN, preset as find_preset
from lrp.tracing import Evaluation, model_device, plan as layer_plan
from lrp.weights import apply, term_params


class Session:
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
                return (Contribution.apply(x, x.detach()),)
            return (x.detach(),)
        return hook

    def _hook(self, layer, rule):
        def hook(module, args, output):
            if layer.kind == "batchnorm":
                out = self._finish(self.plan[layer.merged], self._group_rule(layer), output, layer.module)
                self.captures[layer.layer] = out
                return out
            if rule.kind == "pass":
                return Pass.apply(self.inputs[layer.index], output)
            if rule.kind == "winner":
                return Winner.apply(output, rule.epsilon)
            if rule.kind == "gradient" or layer.norm is not None:
                return None
            return self._finish(layer, rule, output, None)
        return hook

    def _finish(self, layer, rule, output, norm):
        """Wrap the output of a layer (or conv+batchnorm group) so that backward applies `rule`."""
        x = self.inputs[layer.index]
        if rule.kind == "lrp" and rule.terms == PLAIN:
            if output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x.device.type != "meta":
                output = output.clone()       # Output divides in place: never in the layer's input
            return Output.apply(output, output.detach(), rule.epsilon, rule.signed)
        if rule.kind == "unpool":
            pool = layer.module
            _, indices = F.max_pool2d(x.detach(), pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                      pool.ceil_mode, return_indices=True)
            source = Contribution.apply(x, x.detach())
            return Unpool.apply(source, output.detach(), indices, pool, rule.epsilon)
        z = None
        nonnegative = _nonnegative(x) if any(t.inputs in ("x+", "x-") for t in rule.terms) else False
        for term in rule.terms:
            if nonnegative and term.inputs == "x-":
                continue                          # x- is all zeros: the term adds nothing to z or to R
            value = x.detach() if nonnegative and term.inputs == "x+" else self._term_input(x.detach(), term.inputs)
            source = Contribution.apply(x, value)
            if layer.kind in ("conv", "linear"):
                weight, bias = term_params(layer.module, norm, term)
                part = apply(layer.module, source, weight, bias)
            else:
                part = apply(layer.module, source, None, None)
            z = part if z is None else z + part
        return Output.apply(z, output.detach(), rule.epsilon, rule.signed)

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
    preset = find_preset(rule)
    if not torch.is_tensor(inputs) or inputs.dim() < 2:
        raise HUDDError("inputs must be a tensor (batch, ...) of images")
    device, dtype = model_device(model)
    with Evaluation(model), torch.inference_mode(False), torch.enable_grad():
        plan = layer_plan(model, inputs.shape[1:], device, dtype)
        names = [layer.layer for layer in plan]
        wanted = names if layers is None else list(layers)
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise HUDDError(f"unknown layer {unknown[0]!r}; this model has Layer0 to Layer{len(names) - 1}")
        x = inputs.detach().to(device=device, dtype=dtype)
        if x.is_inference():
            x = x.clone()
        x.requires_grad_(True)
        session = Session(plan, preset, bounds)
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
    device, dtype = model_device(model)
    with Evaluation(model), torch.inference_mode(False), torch.enable_grad():
        plan = layer_plan(model, shape, device, dtype)
    return [{"index": layer.index, "layer": layer.layer, "module": layer.name,
             "type": type(layer.module).__name__, "shape": layer.shape, "kept": layer.kept} for layer in plan]
