"""The autograd functions the engine inserts around each layer, so that one backward pass returns
relevance instead of the gradient: each passes the layer's true value forward and maps the incoming
relevance in its backward."""
import torch
import torch.nn.functional as F


class Contribution(torch.autograd.Function):
    """Forward: `value` (a modified copy of the layer input); backward: gradient ⊙ value, sent to `source`."""

    @staticmethod
    def forward(ctx, source, value):
        ctx.save_for_backward(value)
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        return grad.mul_(value), None     # grad is the fresh input gradient of this layer alone


class Output(torch.autograd.Function):
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
            denominator = stabilise(z, ctx.epsilon, ctx.signed)
        else:
            denominator = z.add_(ctx.epsilon)
        return torch.div(grad, denominator, out=denominator), None, None, None


class Winner(torch.autograd.Function):
    """Max-pool LRP, x ⊙ J^T (R / (Y + eps)), computed on the pooled side: at each window's winner x = Y,
    so the pool's own gradient applied to R ⊙ Y / (Y + eps) is the same, summed where windows overlap."""

    @staticmethod
    def forward(ctx, value, epsilon):
        ctx.value = value.detach()        # unchecked, like Output.z: an in-place ReLU may clip it
        ctx.epsilon = epsilon
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value = ctx.value
        share = value + ctx.epsilon
        torch.div(value, share, out=share)
        return share.mul_(grad), None


class Pass(torch.autograd.Function):
    """Forward: the module's output; backward: relevance unchanged (reshaped to the input's shape)."""

    @staticmethod
    def forward(ctx, source, value):
        ctx.shape = source.shape
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None


class Unpool(torch.autograd.Function):
    """The original's max-pool rule: C = max_unpool2d(R / (Y + eps)); where windows share a maximum the
    last write wins, so relevance is lost (reproduced for hudd-compat)."""

    @staticmethod
    def forward(ctx, source, value, indices, pool, epsilon):
        ctx.value, ctx.indices = value, indices      # unchecked, like Output.z
        ctx.pool, ctx.epsilon, ctx.size = pool, epsilon, source.shape[-2:]
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        value, indices, pool = ctx.value, ctx.indices, ctx.pool
        scaled = grad / (value + ctx.epsilon)
        routed = F.max_unpool2d(scaled, indices, pool.kernel_size, pool.stride, pool.padding,
                                output_size=ctx.size)
        return routed, None, None, None, None


def stabilise(z, epsilon, signed):
    """z + epsilon, or z moved away from 0 by epsilon with its own sign (zennit's stabiliser)."""
    if signed:
        return torch.where(z >= 0, z + epsilon, z - epsilon)
    return z + epsilon
