"""The model zoo and the one model file format."""
import pickle

import pytest
import torch
import torchvision

import models
from common.errors import HUDDError


def test_faithful_alexnet_shapes_and_names():
    net = models.AlexNet(num_classes=8)
    assert net.classifier[1].in_features == 12544
    keys = list(net.state_dict())
    assert keys[0] == "features.0.weight" and keys[-1] == "classifier.6.bias"
    # convolution weights have torchvision's names and shapes, so ImageNet conv weights would load
    tv = torchvision.models.alexnet(weights=None).state_dict()
    for key in ("features.0.weight", "features.3.weight", "features.10.weight"):
        assert net.state_dict()[key].shape == tv[key].shape
    assert net(torch.zeros(1, 3, 256, 256)).shape == (1, 8)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_small_alexnet_accepts_small_inputs(size):
    net = models.SmallAlexNet(num_classes=5, in_channels=1, input_size=size)
    assert net(torch.zeros(2, 1, size, size)).shape == (2, 5)


def test_small_alexnet_batchnorm_follows_every_convolution_and_relevance_merges_it():
    plain = models.SmallAlexNet(num_classes=8, in_channels=3, input_size=48, width=4, hidden=16)
    assert [k for k in plain.state_dict() if k.endswith("weight")][:5] == [
        f"features.{i}.weight" for i in (0, 3, 6, 8, 10)]        # the faithful layout is unchanged
    net = models.SmallAlexNet(num_classes=8, in_channels=3, input_size=48, width=4, hidden=16, batchnorm=True)
    layers = list(net.features)
    convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5 and all(isinstance(layers[i + 1], torch.nn.BatchNorm2d) for i in convs)
    assert all(layers[i].bias is None for i in convs)
    import heatmapModule

    net.train()
    net(torch.randn(16, 3, 48, 48))         # running statistics away from 0 and 1, so that merging matters
    net.eval()
    relevance = heatmapModule.layer_relevance(net, torch.rand(2, 3, 48, 48))
    assert relevance["Layer0"].shape == (2, 3, 48, 48) and torch.isfinite(relevance["Layer0"]).all()


def test_kpnet_maps_keypoints_at_input_resolution():
    assert models.KPNet()(torch.zeros(1, 1, 128, 128)).shape == (1, 27, 128, 128)
    small = models.KPNet(num_keypoints=12, input_size=64, width=0.25)
    assert small(torch.zeros(2, 1, 64, 64)).shape == (2, 12, 64, 64)


def test_round_trip_with_weights_only_load(tmp_path):
    net = models.SmallAlexNet(num_classes=3, in_channels=1, input_size=28)
    path = models.save_model(tmp_path / "m.pth", net, "smallalexnet", ["a", "b", "c"], (1, 28, 28), (0.5,), (0.5,),
                             arch_args=dict(num_classes=3, in_channels=1, input_size=28))
    record = torch.load(path, weights_only=True)  # must not need a full unpickler
    assert record["format"] == "hudd-model" and record["classes"] == ["a", "b", "c"]
    loaded, meta = models.load_model(path)
    x = torch.randn(2, 1, 28, 28)
    net.eval()
    assert torch.equal(loaded(x), net(x))
    assert meta["input_size"] == [1, 28, 28] and "state_dict" not in meta


def test_users_torchvision_classifier_in_one_call(tmp_path):
    vgg = torchvision.models.vgg11(weights=None, num_classes=3)
    models.save_model(tmp_path / "vgg.pth", vgg, "torchvision.vgg11", ["x", "y", "z"], (3, 64, 64),
                      models.IMAGENET_MEAN, models.IMAGENET_STD, arch_args={"num_classes": 3})
    loaded, meta = models.load_model(tmp_path / "vgg.pth")
    assert type(loaded).__name__ == "VGG" and meta["classes"] == ["x", "y", "z"]
    vgg.eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded(x), vgg(x))


class _Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_full_pickle_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(HUDDError, match="full pickle.*--trust-model"):
        models.load_model(path)
    whole = tmp_path / "whole.pth"
    torch.save(models.SmallAlexNet(num_classes=2, in_channels=1, input_size=28), whole)
    with pytest.raises(HUDDError, match="--trust-model"):
        models.load_model(whole)
    model, meta = models.load_model(whole, trust=True)
    assert isinstance(model, models.SmallAlexNet) and meta["classes"] is None


@pytest.mark.parametrize("content, message", [
    (b"this is not a model", "not a model file"),
    (b"", "not a model file"),
])
def test_not_a_model_file(tmp_path, content, message):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(HUDDError, match=message):
        models.load_model(path)


def test_bare_state_dict_says_how_to_resave(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(models.SmallAlexNet(num_classes=2, in_channels=1, input_size=28).state_dict(), path)
    with pytest.raises(HUDDError, match="bare state_dict.*save_model"):
        models.load_model(path)


def test_missing_model_names_the_folder(tmp_path):
    with pytest.raises(HUDDError, match="DNNModels"):
        models.resolve_model_path(tmp_path, "nothere.pth")
