"""The modified weights of a rule term (positive, negative or zero parts; a BatchNorm folded into its
convolution), cached per module until its parameters change, and the layer forward that uses them."""
import weakref

import torch
import torch.nn.functional as F
from torch import nn

_WEIGHTS = weakref.WeakKeyDictionary()     # conv/linear module -> {(term, norm id): (stamp, (w, b))}


def _modify(tensor, how):
    if tensor is None or how == "zero":
        return None
    if how == "positive":
        return tensor.clamp(min=0)
    if how == "negative":
        return tensor.clamp(max=0)
    return tensor


def merged(conv, norm):
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


def term_params(module, norm, term):
    """(weight, bias) of one rule term, cached per module until its parameters change."""
    cache = _WEIGHTS.setdefault(module, {})
    key = (term, id(norm))
    stamp = _stamp((module, norm))
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    weight, bias = merged(module, norm)
    weight, bias = _modify(weight, term.weights), _modify(bias, term.bias)
    cache[key] = (stamp, (weight, bias))
    return weight, bias


def apply(module, x, weight, bias):
    """The layer's forward on x with the given (modified) weight and bias."""
    if isinstance(module, nn.Conv2d):
        return module._conv_forward(x, weight, bias)
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, bias, module.stride, module.padding, module.output_padding,
                                  module.groups, module.dilation)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module.forward(x)
