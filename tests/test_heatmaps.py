"""The LRP engine against independent references: a plain per-layer loop (tests/lrp_reference.py) and zennit."""
import copy
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import heatmapModule as hm
from common.data import ImageSet, ImageSpec
from common.errors import HUDDError
from models.alexnet import AlexNet, SmallAlexNet
from models.kpnet import KPNet
from tests import lrp_reference as ref

ATOL = 1e-10
RTOL = 1e-7


class Mixed(nn.Module):
    """Every supported layer kind, with functional ReLU/flatten between modules, overlapping max-pool."""

    def __init__(self, inplace=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.pool2 = nn.AvgPool2d(2)
        self.up = nn.ConvTranspose2d(8, 5, 2, stride=2)
        self.relu2 = nn.ReLU()
        self.adapt = nn.AdaptiveAvgPool2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(45, 10)
        self.relu3 = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.conv2(x)))
        x = self.adapt(self.relu2(self.up(x)))
        x = self.drop(torch.flatten(x, 1))
        return self.fc2(self.relu3(self.fc1(x)))

    def steps(self):
        return [("conv_bn", self.conv1, self.bn1), ("relu", self.relu1), ("maxpool", self.pool1),
                ("conv", self.conv2), ("f_relu",), ("avgpool", self.pool2), ("convT", self.up),
                ("relu", self.relu2), ("adaptive", self.adapt), ("f_flatten",), ("dropout", self.drop),
                ("linear", self.fc1), ("relu", self.relu3), ("linear", self.fc2)]


def mixed(seed=0, inplace=True, zero_bias=False):
    torch.manual_seed(seed)
    net = Mixed(inplace)
    with torch.no_grad():
        net.bn1.running_mean.normal_(0, 0.3)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.normal_(0, 0.2)
        if zero_bias:
            for m in net.modules():
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            net.bn1.running_mean.zero_()
    return net.double().eval()


class Signed(nn.Module):
    """Convolutions fed inputs of both signs (z+ must keep the products of negative inputs and negative
    weights), batchnorms merged into z+ convolutions, a strided convolution, a dense layer fed negatives."""

    def __init__(self, bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6) if bn else None
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4) if bn else None
        self.pool2 = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.conv2(x) if self.bn2 is None else self.bn2(self.conv2(x))
        x = self.conv3(x) if self.bn3 is None else self.bn3(self.conv3(x))
        return self.fc2(self.fc1(torch.flatten(self.pool2(x), 1)))

    def steps(self):
        convs = [("conv", self.conv2), ("conv", self.conv3)] if self.bn2 is None else \
            [("conv_bn", self.conv2, self.bn2), ("conv_bn", self.conv3, self.bn3)]
        return [("conv", self.conv1), ("relu", self.relu1), ("maxpool", self.pool1), *convs,
                ("avgpool", self.pool2), ("f_flatten",), ("linear", self.fc1), ("linear", self.fc2)]


def signed(seed=0, bn=True):
    torch.manual_seed(seed)
    net = Signed(bn)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)       # negative scales flip the signs of merged weights
                m.bias.normal_(0, 0.2)
    return net.double().eval()


class Dense(nn.Module):
    """A dense input layer (zB on a Linear, bounds over the flattened features) after a functional flatten."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.reshape(x.shape[0], -1))))

    def steps(self):
        return [("f_flatten",), ("linear", self.fc1), ("relu", self.relu), ("linear", self.fc2)]


def dense(seed=0):
    torch.manual_seed(seed)
    return Dense().double().eval()


class PoolFirst(nn.Module):
    """The input layer is an average pool, then a Flatten module: zB belongs on the first conv, not on Layer0."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.flat(self.relu(self.conv(self.pool(x)))))

    def steps(self):
        return [("avgpool", self.pool), ("conv", self.conv), ("relu", self.relu), ("flatten", self.flat),
                ("linear", self.fc)]


def flatten_first(seed=0):
    """nn.Flatten as the first leaf module: zB on the Linear behind it."""
    torch.manual_seed(seed)
    flat, fc1, relu, fc2 = nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3)
    net = nn.Sequential(flat, fc1, relu, fc2).double().eval()
    net.steps = lambda: [("flatten", flat), ("linear", fc1), ("relu", relu), ("linear", fc2)]
    return net


def kpnet_steps(k):
    steps = []
    for name in ("conv2d_1", "conv2d_2", "maxpool_1", "conv2d_3", "conv2d_4", "maxpool_2", "conv2d_5",
                 "conv2d_6", "conv2d_trans_1", "conv2d_trans_2"):
        module = getattr(k, name)
        op = "maxpool" if "pool" in name else "convT" if "trans" in name else "conv"
        steps.append((op, module))
        if op != "maxpool" and name != "conv2d_trans_2":
            steps.append(("f_relu",))
    return steps


def small_kpnet(seed=0):
    torch.manual_seed(seed)
    return KPNet(num_keypoints=3, input_size=16, width=0.05).double().eval()


def predicted_logit(out):
    start = torch.zeros_like(out)
    winner = out.argmax(1, keepdim=True)
    return start.scatter_(1, winner, out.gather(1, winner))


def worst_keypoint(out):
    """Stand-in for the keypoint case: keep one map per image (a different one for each image)."""
    start = torch.zeros_like(out)
    for i in range(out.shape[0]):
        start[i, i % out.shape[1]] = out[i, i % out.shape[1]]
    return start


def assert_layers_match(got, expected):
    assert len(got) == len(expected)
    for i, exp in enumerate(expected):
        rel = got[f"Layer{i}"]
        scale = exp.abs().max().item() or 1.0
        torch.testing.assert_close(rel, exp.reshape(rel.shape), rtol=RTOL, atol=ATOL * scale,
                                   msg=lambda m: f"Layer{i}: {m}")


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ------------------------------------------------------------------ (a) against the plain per-layer loop

@pytest.mark.parametrize("rule", ["hudd", "hudd-compat", "epsilon"])
def test_every_layer_matches_plain_loop_on_mixed_net(rule):
    net = mixed()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    start = predicted_logit(net(x).detach())
    expected = ref.relevance(net.steps(), x, start, rule)
    got = hm.layer_relevance(net, x, rule=rule)
    assert_layers_match(got, expected)


@pytest.mark.parametrize("rule", ["hudd", "hudd-compat"])
def test_alexnet_shape_matches_plain_loop(rule):
    """The original's architecture in small: in-place ReLUs, overlapping pools, torch.flatten, Dropout."""
    torch.manual_seed(4)
    net = SmallAlexNet(num_classes=3, in_channels=1, input_size=28, width=4, hidden=16).double().eval()
    kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "maxpool", nn.Dropout: "dropout", nn.Linear: "linear"}
    steps = [(kinds[type(m)], m) for m in net.features] + [("f_flatten",)]
    steps += [(kinds[type(m)], m) for m in net.classifier]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    start = predicted_logit(net(x).detach())
    assert_layers_match(hm.layer_relevance(net, x, rule=rule), ref.relevance(steps, x, start, rule))


@pytest.mark.parametrize("rule", ["hudd", "hudd-compat"])
def test_kpnet_start_tensor_matches_plain_loop(rule):
    k = small_kpnet()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    start = worst_keypoint(k(x).detach())
    expected = ref.relevance(kpnet_steps(k), x, start, rule)
    assert_layers_match(hm.layer_relevance(k, x, rule=rule, start=start), expected)
    from_callable = hm.layer_relevance(k, x, rule=rule, start=worst_keypoint, layers=["Layer0"])
    torch.testing.assert_close(from_callable["Layer0"], expected[0], rtol=RTOL, atol=0)


BOX = (torch.tensor([-2.0, -1.5, -2.5], dtype=torch.float64), torch.tensor([2.0, 2.5, 1.5], dtype=torch.float64))


def small_alexnet_steps(net):
    kinds = {nn.Conv2d: "conv", nn.ReLU: "relu", nn.MaxPool2d: "maxpool", nn.Dropout: "dropout", nn.Linear: "linear"}
    return [(kinds[type(m)], m) for m in net.features] + [("f_flatten",)] + \
        [(kinds[type(m)], m) for m in net.classifier]


def composite_case(name):
    """(model, its steps, inputs, start relevance or None) for the composite's plain-loop comparison."""
    torch.manual_seed(11)
    if name == "kpnet":
        k = small_kpnet(seed=1)
        x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
        return k, kpnet_steps(k), x, worst_keypoint(k(x).detach())
    if name == "small-alexnet":
        torch.manual_seed(4)
        net = SmallAlexNet(num_classes=3, in_channels=1, input_size=28, width=4, hidden=16).double().eval()
        return net, small_alexnet_steps(net), torch.randn(3, 1, 28, 28, dtype=torch.float64), None
    if name in ("dense", "flatten-first"):
        net = dense() if name == "dense" else flatten_first()
        return net, net.steps(), torch.randn(3, 3, 4, 4, dtype=torch.float64), None
    if name == "pool-first":
        torch.manual_seed(3)
        net = PoolFirst().double().eval()
        return net, net.steps(), torch.randn(3, 3, 16, 16, dtype=torch.float64), None
    net = {"mixed": mixed(seed=2), "signed-bn": signed(seed=2), "signed": signed(seed=2, bn=False)}[name]
    return net, net.steps(), torch.randn(3, 3, 16, 16, dtype=torch.float64), None


@pytest.mark.parametrize("bounds", ["per-image", "given"])
@pytest.mark.parametrize("name", ["mixed", "signed-bn", "signed", "kpnet", "small-alexnet", "dense", "flatten-first",
                                  "pool-first"])
def test_composite_every_layer_matches_plain_loop(name, bounds):
    """zB (first conv or linear layer), z+ (convolutions, inputs of both signs), epsilon (dense, average pools)."""
    net, steps, x, start = composite_case(name)
    box = None
    if bounds == "given":
        box = (-3.0, 3.5) if x.shape[1] != 3 or name == "dense" else BOX
    if start is None:
        start = predicted_logit(net(x).detach())
    expected = ref.relevance(steps, x, start, "composite", bounds=box)
    got = hm.layer_relevance(net, x, rule="composite", start=start, bounds=box)
    assert_layers_match(got, expected)


def test_composite_weights_changed_in_place_are_not_served_from_cache():
    """The composite's z+ and zB weights are cached per module: an in-place change must invalidate them."""
    net = signed(seed=3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    hm.layer_relevance(net, x, rule="composite", layers=["Layer0"])
    with torch.no_grad():
        net.conv1.weight.mul_(-1.0)
        net.conv3.bias.add_(0.5)
        net.bn2.running_var.mul_(3.0)
    start = predicted_logit(net(x).detach())
    assert_layers_match(hm.layer_relevance(net, x, rule="composite"),
                        ref.relevance(net.steps(), x, start, "composite"))


def test_keypoint_output_without_start_asks_for_one():
    k = small_kpnet()
    with pytest.raises(HUDDError, match="start="):
        hm.layer_relevance(k, torch.randn(1, 1, 16, 16, dtype=torch.float64))


def test_weights_changed_in_place_are_not_served_from_cache():
    net = mixed()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    hm.layer_relevance(net, x, layers=["Layer0"])
    with torch.no_grad():
        net.fc1.weight.mul_(-1.5)
        net.bn1.running_var.mul_(3.0)
    start = predicted_logit(net(x).detach())
    expected = ref.relevance(net.steps(), x, start, "hudd")
    assert_layers_match(hm.layer_relevance(net, x), expected)


def test_batch_rows_are_independent():
    net = mixed()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    whole = hm.layer_relevance(net, x, layers=["Layer0", "Layer4"])
    one = hm.layer_relevance(net, x[2:3], layers=["Layer0", "Layer4"])
    for name in whole:
        torch.testing.assert_close(whole[name][2:3], one[name], rtol=RTOL, atol=0)


# ---------------------------------------------------------------------------------- (b) against zennit

def test_input_relevance_matches_zennit():
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass, ZBox, ZPlus
    from zennit.types import Activation, AvgPool, Convolution

    net = mixed(seed=3, inplace=False)
    net.bn1.eps = 0.0   # zennit's merged batchnorm still divides by sqrt(1 + eps); with eps 0 it is exact
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    low = torch.tensor([-2.0, -1.5, -2.5], dtype=torch.float64)
    high = torch.tensor([2.0, 2.5, 1.5], dtype=torch.float64)
    base = [(Activation, Pass()), (AvgPool, Norm())]
    composites = {
        "epsilon": LayerMapComposite(base + [(Convolution, Epsilon()), (nn.Linear, Epsilon())],
                                     canonizers=[SequentialMergeBatchNorm()]),
        "composite": SpecialFirstLayerMapComposite(
            base + [(Convolution, ZPlus()), (nn.Linear, Epsilon())],
            first_map=[(Convolution, ZBox(low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)))],
            canonizers=[SequentialMergeBatchNorm()]),
    }
    torch.manual_seed(5)
    signed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(),
                           nn.Linear(5 * 14 * 14, 3)).double().eval()    # the second conv sees negative inputs
    for model in (net, signed):
        start = predicted_logit(model(x).detach())
        for rule, composite in composites.items():
            with Gradient(model=model, composite=composite) as attributor:
                _, expected = attributor(x, start)
            got = hm.layer_relevance(model, x, rule=rule, bounds=(low, high), layers=["Layer0"])["Layer0"]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item(),
                                       msg=lambda m: f"{type(model).__name__} {rule}: {m}")


def zennit_layer_relevance(model, composite, x, start):
    """zennit's relevance at the input of every leaf module, in call order: the gradient of its attribution
    pass with respect to each module's input, taken from pre-hooks that run before zennit's own (which
    swap the input for an identity whose backward returns the rule's relevance)."""
    inputs = []
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0]), prepend=True)
               for m in leaves]
    try:
        with composite.context(model) as modified:
            output = modified(x.detach().clone().requires_grad_(True))
            grads = torch.autograd.grad(output, inputs, grad_outputs=start)
    finally:
        for handle in handles:
            handle.remove()
    return [g.detach() for g in grads]


def test_composite_matches_zennit_at_every_layer():
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import SpecialFirstLayerMapComposite
    from zennit.rules import Epsilon, Norm, Pass, ZBox, ZPlus
    from zennit.types import Activation, AvgPool, Convolution

    low, high = BOX
    for model in (mixed(seed=3, inplace=False), signed(seed=4)):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0   # zennit's merged batchnorm still divides by sqrt(1 + eps); with eps 0 it is exact
        composite = SpecialFirstLayerMapComposite(
            [(Activation, Pass()), (AvgPool, Norm()), (Convolution, ZPlus()), (nn.Linear, Epsilon())],
            first_map=[(Convolution, ZBox(low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)))],
            canonizers=[SequentialMergeBatchNorm()])
        x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
        start = predicted_logit(model(x).detach())
        expected = zennit_layer_relevance(model, composite, x, start)
        got = hm.layer_relevance(model, x, rule="composite", start=start, bounds=BOX)
        assert len(expected) == len(got)
        for i, exp in enumerate(expected):
            torch.testing.assert_close(got[f"Layer{i}"], exp, rtol=1e-6, atol=1e-9 * exp.abs().max().item(),
                                       msg=lambda m: f"{type(model).__name__} Layer{i}: {m}")
        assert no_hooks(model)


# ------------------------------------------------------------------------------------ (c) conservation

def test_hudd_conserves_relevance_at_every_layer_without_biases():
    net = mixed(seed=1, zero_bias=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    start = predicted_logit(net(x).detach()).sum(1)
    for name, rel in hm.layer_relevance(net, x).items():
        torch.testing.assert_close(rel.flatten(1).sum(1), start, rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------- (d) hudd-compat

def test_compat_equals_hudd_where_pools_do_not_overlap():
    k = small_kpnet(seed=2)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    start = worst_keypoint(k(x).detach())
    hudd = hm.layer_relevance(k, x, rule="hudd", start=start)
    compat = hm.layer_relevance(k, x, rule="hudd-compat", start=start)
    for name in hudd:
        torch.testing.assert_close(compat[name], hudd[name], rtol=1e-12, atol=1e-15)


def test_compat_loses_relevance_at_overlapping_pools_as_the_original():
    net = mixed(seed=1, zero_bias=True)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    hudd = hm.layer_relevance(net, x, rule="hudd", layers=["Layer3", "Layer4"])
    compat = hm.layer_relevance(net, x, rule="hudd-compat", layers=["Layer3", "Layer4"])
    above, below = (compat[n].flatten(1).sum(1) for n in ("Layer4", "Layer3"))
    torch.testing.assert_close(hudd["Layer4"], compat["Layer4"], rtol=0, atol=0)
    torch.testing.assert_close(hudd["Layer3"].flatten(1).sum(1), above, rtol=1e-6, atol=0)
    assert bool((below < 0.98 * above).all()), (below / above)


# --------------------------------------------------------------------------------- layer table, models

ALEXNET_KEPT = {0: (3, 256, 256), 1: (64, 63, 63), 3: (64, 31, 31), 4: (192, 31, 31), 6: (192, 15, 15),
                7: (384, 15, 15), 9: (256, 15, 15), 11: (256, 15, 15), 13: (12544,), 15: (4096,),
                18: (4096,)}


def test_alexnet_layer_table_keeps_the_originals_layers():
    with torch.device("meta"):
        net = AlexNet(num_classes=8)
    table = hm.layer_table(net, (3, 256, 256))
    assert [row["layer"] for row in table] == [f"Layer{i}" for i in range(20)]
    assert {row["index"]: row["shape"] for row in table if row["kept"]} == ALEXNET_KEPT
    assert table[13]["module"] == "classifier.0" and table[13]["type"] == "Dropout"


def test_mixed_net_table_drops_exact_duplicates_only():
    table = hm.layer_table(mixed(), (3, 16, 16))
    assert [row["index"] for row in table if row["kept"]] == [0, 1, 4, 5, 6, 7, 9, 11]
    rel = hm.layer_relevance(mixed(), torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert torch.equal(rel["Layer2"], rel["Layer1"]) and torch.equal(rel["Layer10"], rel["Layer9"])


@pytest.mark.parametrize("name,size", [("alexnet", 224), ("vgg11", 64)])
def test_torchvision_models_work_unchanged(name, size):
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, name)(weights=None, num_classes=3)
    table = hm.layer_table(net, (3, size, size))
    rel = hm.layer_relevance(net, torch.zeros(2, 3, size, size, device="meta"),
                             layers=[row["layer"] for row in table if row["kept"]])
    assert rel["Layer0"].shape == (2, 3, size, size)
    assert no_hooks(net)


def test_torchvision_alexnet_conserves_relevance_through_adaptive_pooling():
    import torchvision

    torch.manual_seed(6)
    net = torchvision.models.alexnet(weights=None, num_classes=3).eval()   # 64 px: 1x1 map upsampled to 6x6
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    x = torch.rand(2, 3, 64, 64)
    start = predicted_logit(net(x).detach()).sum(1)
    kept = [row["layer"] for row in hm.layer_table(net, (3, 64, 64)) if row["kept"]]
    for name, rel in hm.layer_relevance(net, x, layers=kept).items():
        torch.testing.assert_close(rel.flatten(1).sum(1), start, rtol=1e-3, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule,name", [("hudd", "mixed"), ("epsilon", "mixed"), ("composite", "mixed"),
                                       ("hudd", "kpnet"), ("hudd-compat", "kpnet"), ("composite", "kpnet")])
def test_cuda_gives_the_cpu_relevance_at_every_kept_layer(rule, name):
    """float32 as in use, TF32 off. hudd-compat only where pools do not overlap: max_unpool2d's writes to a
    shared maximum land in an unspecified order (PyTorch lists it as nondeterministic)."""
    net = (mixed(seed=8) if name == "mixed" else small_kpnet(seed=8)).float()
    shape = (3, 16, 16) if name == "mixed" else (1, 16, 16)
    torch.manual_seed(9)
    x = torch.randn(4, *shape)
    start = None if name == "mixed" else worst_keypoint(net(x).detach())
    kept = [row["layer"] for row in hm.layer_table(net, shape) if row["kept"]]
    cpu = hm.layer_relevance(net, x, rule=rule, start=start, layers=kept)
    on_gpu = copy.deepcopy(net).cuda()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = hm.layer_relevance(on_gpu, x.cuda(), rule=rule, start=None if start is None else start.cuda(),
                                 layers=kept)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert list(gpu) == kept and no_hooks(on_gpu)
    for layer in kept:
        assert gpu[layer].device.type == "cuda"
        scale = cpu[layer].abs().max().item() or 1.0
        torch.testing.assert_close(gpu[layer].cpu(), cpu[layer], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{layer}: {m}")


# --------------------------------------------------------------------- model left unchanged, errors

def test_no_hook_left_and_model_restored_also_after_an_error():
    net = mixed()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    hm.layer_relevance(net, x)
    assert no_hooks(net) and net.training and net.relu1.inplace
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(HUDDError, match="start relevance has shape"):
        hm.layer_relevance(net, x, start=torch.zeros(2, 5))
    net.fc2.weight = nn.Parameter(torch.zeros(4, 7, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        hm.layer_relevance(net, x)
    assert no_hooks(net) and net.training and net.relu1.inplace and net.relu3.inplace


def test_works_inside_no_grad_and_inference_mode():
    net = mixed()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    plain = hm.layer_relevance(net, x, layers=["Layer0"])["Layer0"]
    with torch.no_grad():
        assert torch.equal(hm.layer_relevance(net, x, layers=["Layer0"])["Layer0"], plain)
    with torch.inference_mode():
        y = x.clone()
        assert torch.equal(hm.layer_relevance(net, y, layers=["Layer0"])["Layer0"], plain)


def test_unsupported_module_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(HUDDError, match=r"'1' \(Tanh\)"):
        hm.layer_relevance(net, torch.randn(1, 1, 8, 8))


def test_residual_connection_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(x + self.conv(x), 1))

    with pytest.raises(HUDDError, match="AddBackward"):
        hm.layer_table(Residual(), (2, 8, 8))


def test_unknown_rule_and_layer_are_refused():
    net = mixed()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(HUDDError, match="unknown LRP rule"):
        hm.layer_relevance(net, x, rule="alpha-beta")
    with pytest.raises(HUDDError, match="Layer99"):
        hm.layer_relevance(net, x, layers=["Layer99"])


# ------------------------------------------------------------------------------------ write_heatmaps

def tiny_case(tmp_path, count=5, broken=None):
    root = tmp_path / "DataSets"
    (root / "TestSet" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        rel = f"TestSet/a/{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), mode="L").save(root / rel)
        images.append(rel)
    if broken is not None:
        (root / broken).write_bytes(b"not an image")
        images.append(broken)
    return ImageSet(root, images, ImageSpec(1, 12, 12, (0.5,), (0.5,)))


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_write_heatmaps_streams_kept_layers_in_dataset_order(tmp_path):
    data, net, out = tiny_case(tmp_path), tiny_net(), tmp_path / "Heatmaps"
    names = hm.write_heatmaps(net, data, out, batch_size=2, progress=False)
    assert names == ["Layer0", "Layer1", "Layer3"]
    assert sorted(os.listdir(out)) == sorted([f"{n}.npy" for n in names] + ["layers.csv"])
    table = pd.read_csv(out / "layers.csv")
    assert list(table.columns) == ["index", "layer", "module", "type", "shape", "kept"]
    assert table["kept"].tolist() == [True, True, False, True, False]
    images = torch.stack([data[i][0] for i in range(len(data))])
    expected = hm.layer_relevance(net, images, layers=names)
    for name in names:
        stored = np.load(out / f"{name}.npy")
        assert stored.dtype == np.float32 and stored.shape == tuple(expected[name].shape)
        np.testing.assert_allclose(stored, expected[name].numpy(), rtol=1e-5, atol=1e-7)

    half = hm.write_heatmaps(net, data, tmp_path / "half", batch_size=3, dtype="float16", layers=["Layer3"],
                             progress=False)
    stored = np.load(tmp_path / "half" / "Layer3.npy")
    assert half == ["Layer3"] and stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), expected["Layer3"].numpy(), rtol=2e-3, atol=1e-6)


def test_write_heatmaps_failure_leaves_no_partial_file(tmp_path):
    data, net, out = tiny_case(tmp_path), tiny_net(), tmp_path / "Heatmaps"
    hm.write_heatmaps(net, data, out, batch_size=2, progress=False)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    calls = []

    def start_fn(outputs, indices):
        calls.append(indices.tolist())
        if len(calls) == 2:
            raise RuntimeError("killed")
        return predicted_logit(outputs) * 2

    with pytest.raises(RuntimeError, match="killed"):
        hm.write_heatmaps(net, data, out, batch_size=2, start_fn=start_fn, progress=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_write_heatmaps_names_an_unreadable_image(tmp_path):
    data = tiny_case(tmp_path, count=2, broken="TestSet/a/broken.png")
    with pytest.raises(HUDDError, match="broken.png"):
        hm.write_heatmaps(tiny_net(), data, tmp_path / "Heatmaps", progress=False)
    assert not any(name.endswith(".npy") or name.endswith(".tmp") for name in os.listdir(tmp_path / "Heatmaps"))


def test_write_heatmaps_with_no_images_writes_empty_arrays(tmp_path):
    data = ImageSet(tmp_path, [], ImageSpec(1, 12, 12))
    names = hm.write_heatmaps(tiny_net(), data, tmp_path / "Heatmaps", progress=False)
    assert np.load(tmp_path / "Heatmaps" / f"{names[1]}.npy").shape == (0, 4, 12, 12)
    assert sorted(os.listdir(tmp_path / "Heatmaps")) == sorted([f"{n}.npy" for n in names] + ["layers.csv"])
