"""A plain layer-by-layer LRP written for the tests only: explicit formulas, no autograd, no engine code.

A network is described as a list of steps, each ``(op, *modules)``:
conv | conv_bn | convT | linear | maxpool | avgpool | adaptive | relu | dropout | flatten (modules, each a
layer) and f_relu | f_flatten (functional glue, not layers). ``relevance`` returns the relevance at the
input of every layer in forward order (for conv_bn: the conv's input, then the batchnorm's).
"""
import math

import torch
import torch.nn.functional as F

LAYER_OPS = {"conv", "convT", "linear", "maxpool", "avgpool", "adaptive", "relu", "dropout", "flatten"}


def bn_merged(conv, bn):
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight.detach() * scale[:, None, None, None]
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(scale)
    return weight, (bias - bn.running_mean) * scale + bn.bias.detach()


def _forward(steps, x):
    acts = [x]
    for op, *mods in steps:
        if op == "conv_bn":
            x = mods[1](mods[0](x))
        elif op == "f_relu":
            x = F.relu(x)
        elif op == "f_flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            x = mods[0](x)
        acts.append(x)
    return acts


def _conv_back(conv, s, x, weight):
    out_pad = [x.shape[2 + d] - ((s.shape[2 + d] - 1) * conv.stride[d] - 2 * conv.padding[d]
                                 + conv.dilation[d] * (conv.kernel_size[d] - 1) + 1) for d in range(2)]
    return F.conv_transpose2d(s, weight, None, conv.stride, conv.padding, out_pad, conv.groups, conv.dilation)


def _winners(pool, x, s):
    _, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, return_indices=True)
    flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=s.dtype)
    flat.scatter_add_(2, idx.flatten(2), s.flatten(2))
    return flat.view_as(x), idx


def _avg_back(pool, x, s):
    k, st, p = (pool.kernel_size, pool.stride, pool.padding)
    c = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 2 * p, x.shape[3] + 2 * p, dtype=s.dtype)
    for i in range(s.shape[2]):
        for j in range(s.shape[3]):
            c[:, :, i * st:i * st + k, j * st:j * st + k] += s[:, :, i:i + 1, j:j + 1] / (k * k)
    return c[:, :, p:p + x.shape[2], p:p + x.shape[3]]


def _adaptive_back(x, s):
    c = torch.zeros_like(x)
    h, w = x.shape[2:]
    oh, ow = s.shape[2:]
    for i in range(oh):
        r0, r1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
        for j in range(ow):
            c0, c1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
            c[:, :, r0:r1, c0:c1] += s[:, :, i:i + 1, j:j + 1] / ((r1 - r0) * (c1 - c0))
    return c


def _denominator(y, rule, eps):
    if rule == "epsilon":
        return y + eps * torch.where(y >= 0, 1.0, -1.0).to(y)
    return y + eps


def relevance(steps, x, start, rule="hudd", eps=None):
    """rule: hudd | hudd-compat | epsilon (max-pool by its gradient, as zennit)."""
    eps = (1e-9 if rule.startswith("hudd") else 1e-6) if eps is None else eps
    with torch.no_grad():
        acts = _forward(steps, x)
        r = start.clone()
        found = []
        for pos in range(len(steps) - 1, -1, -1):
            op, *mods = steps[pos]
            a, y = acts[pos], acts[pos + 1]
            if op in ("relu", "dropout", "flatten", "f_relu", "f_flatten"):
                r = r.reshape(a.shape)
            elif op in ("conv", "conv_bn"):
                weight = bn_merged(*mods)[0] if op == "conv_bn" else mods[0].weight
                if op == "conv_bn":
                    found.append(r)
                r = a * _conv_back(mods[0], r / _denominator(y, rule, eps), a, weight)
            elif op == "convT":
                m = mods[0]
                r = a * F.conv2d(r / _denominator(y, rule, eps), m.weight, None, m.stride, m.padding, m.dilation)
            elif op == "linear":
                w = mods[0].weight
                if rule.startswith("hudd"):
                    w = w.clamp(min=0)
                    z = a @ w.T + eps
                else:
                    z = _denominator(y, rule, eps)
                r = a * ((r / z) @ w)
            elif op == "maxpool":
                pool = mods[0]
                if rule == "epsilon":
                    r = _winners(pool, a, r)[0]
                elif rule == "hudd-compat":
                    _, idx = _winners(pool, a, r)
                    s = r / (y + eps)
                    r = a * F.max_unpool2d(s, idx, pool.kernel_size, pool.stride, pool.padding,
                                           output_size=a.shape[2:])
                else:
                    r = a * _winners(pool, a, r / (y + eps))[0]
            elif op == "avgpool":
                r = a * _avg_back(mods[0], a, r / _denominator(y, rule, eps))
            elif op == "adaptive":
                r = a * _adaptive_back(a, r / _denominator(y, rule, eps))
            else:
                raise ValueError(op)
            if op in LAYER_OPS or op == "conv_bn":
                found.append(r)
        return list(reversed(found))
