"""A plain layer-by-layer LRP written for the tests only: explicit formulas, no autograd, no engine code.

A network is described as a list of steps, each ``(op, *modules)``:
conv | conv_bn | convT | linear | maxpool | avgpool | adaptive | relu | dropout | flatten (modules, each a
layer) and f_relu | f_flatten (functional glue, not layers). ``relevance`` returns the relevance at the
input of every layer in forward order (for conv_bn: the conv's input, then the batchnorm's).

The composite preset is written differently again: each conv, linear or average-pool layer is turned into
its dense matrix M (read off the layer's response to every unit input), and the rules are the papers'
sums over explicit contributions c_ij, R_i = sum_j c_ij / stab(sum_i' c_i'j + bias_j) R_j.
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


def relevance(steps, x, start, rule="hudd", eps=None, bounds=None):
    """rule: hudd | hudd-compat | epsilon (max-pool by its gradient, as zennit) | composite (bounds: zB's
    (low, high), per channel or scalars; None = each image's own per-channel min and max)."""
    eps = (1e-9 if rule.startswith("hudd") else 1e-6) if eps is None else eps
    if rule == "composite":
        return composite_relevance(steps, x, start, eps, bounds)
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


# ------------------------------------------------------------------- composite: zB, z+, epsilon, dense

def _dense(op, mods, shape):
    """The layer on one image, flattened, as y = M x + b: M (out, in) from its response to each unit
    input (no bias), b (out,) or None. conv_bn folds y = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta."""
    n = math.prod(shape)
    m = mods[0]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    if op == "linear":
        return m.weight, m.bias
    if op in ("avgpool", "adaptive"):
        return m(basis).reshape(n, -1).T, None
    if op == "convT":
        assert m.padding_mode == "zeros"
        out = F.conv_transpose2d(basis, m.weight, None, m.stride, m.padding, m.output_padding,
                                 m.groups, m.dilation)
    else:
        assert m.padding_mode == "zeros"
        out = F.conv2d(basis, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
    bias = m.bias if m.bias is not None else torch.zeros(out.shape[1], dtype=torch.float64)
    if op == "conv_bn":
        bn = mods[1]
        gamma = bn.weight if bn.weight is not None else 1.0
        beta = bn.bias if bn.bias is not None else 0.0
        scale = gamma / torch.sqrt(bn.running_var + bn.eps)
        out = out * scale[None, :, None, None]
        bias = (bias - bn.running_mean) * scale + beta
    per_position = math.prod(out.shape[2:])
    return out.reshape(n, -1).T, bias.repeat_interleave(per_position)


def _box(a, bounds):
    """zB's lowest and highest input values, flattened like a: (batch, in) each."""
    if bounds is None:
        dims = tuple(range(2, a.dim())) or (1,)
        low, high = a.amin(dim=dims, keepdim=True), a.amax(dim=dims, keepdim=True)
    else:
        low, high = (torch.as_tensor(b, dtype=a.dtype) for b in bounds)
        if low.dim() == 1 and a.dim() == 4:
            low, high = low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)
        elif low.dim() == 1 and a.dim() == 2 and low.numel() > 1:      # flattened channel-major image
            repeat = a.shape[1] // low.numel()
            low, high = low.repeat_interleave(repeat), high.repeat_interleave(repeat)
    return low.expand_as(a).reshape(a.shape[0], -1), high.expand_as(a).reshape(a.shape[0], -1)


def _redistribute(c, bias, r, eps):
    """R_i = sum_j c_ij / stab(sum_i' c_i'j + bias_j) R_j; c: (batch, out, in), stab adds eps with z's sign
    (+eps at z = 0)."""
    z = c.sum(2) if bias is None else c.sum(2) + bias
    stab = z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)
    return (c * (r / stab)[:, :, None]).sum(1)


def composite_relevance(steps, x, start, eps=1e-6, bounds=None):
    """zB on the first conv or linear layer, also behind a flatten or a pool (Montavon et al. 2017: c_ij = x_i w_ij - l_i w+_ij
    - h_i w-_ij, no bias); z+ on convolutions, also for inputs of either sign (c_ij = (x_i w_ij)+, bias b+ in
    the denominator); epsilon (c_ij = x_i w_ij, bias b) on linear and average-pool layers; max-pool by its
    gradient; ReLU, Dropout and reshapes pass relevance through."""
    assert x.dtype == torch.float64, "the reference runs in float64 (model.double())"
    with torch.no_grad():
        acts = _forward(steps, x)
        first = next(pos for pos, (op, *_) in enumerate(steps) if op in ("conv", "conv_bn", "convT", "linear"))
        r = start.clone()
        found = []
        for pos in range(len(steps) - 1, -1, -1):
            op, *mods = steps[pos]
            a = acts[pos]
            batch = a.shape[0]
            if op == "conv_bn":
                found.append(r)
            if op in ("relu", "dropout", "flatten", "f_relu", "f_flatten"):
                r = r.reshape(a.shape)
            elif op == "maxpool":
                r = _winners(mods[0], a, r)[0]
            elif op in ("conv", "conv_bn", "convT", "linear", "avgpool", "adaptive"):
                m, b = _dense(op, mods, a.shape[1:])
                flat, rf = a.reshape(batch, 1, -1), r.reshape(batch, -1)
                if pos == first:
                    low, high = _box(a, bounds)
                    c = flat * m - low[:, None] * m.clamp(min=0) - high[:, None] * m.clamp(max=0)
                    r = _redistribute(c, None, rf, eps)
                elif op in ("conv", "conv_bn", "convT"):
                    r = _redistribute((flat * m).clamp(min=0), None if b is None else b.clamp(min=0), rf, eps)
                else:
                    r = _redistribute(flat * m, b, rf, eps)
                r = r.reshape(a.shape)
            else:
                raise ValueError(op)
            if op in LAYER_OPS or op == "conv_bn":
                found.append(r)
        return list(reversed(found))
