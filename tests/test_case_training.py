"""The case builder's training: a DNN that stays at chance is trained again from a derived seed, then refused."""
import numpy as np
import pytest
import torch
from PIL import Image

import models
import retrainModule
from casestudies import casefolder
from common.data import ImageSpec
from common.errors import HUDDError

ARCH = dict(in_channels=1, input_size=28, width=4, hidden=16)
SPEC = ImageSpec(1, 28, 28, (0.5,), (0.5,), "exact")
MARKER = {"case_study": "toy", "seed": 0, "scale": "small"}


@pytest.fixture
def easy_case(tmp_path):
    """Dark against bright images: any working training separates them in three epochs."""
    rng = np.random.default_rng(0)
    for split in ("TrainingSet", "TestSet", "ImprovementSet"):
        for label, low in (("Dark", 0), ("Bright", 160)):
            folder = tmp_path / "DataSets" / split / label
            folder.mkdir(parents=True)
            for i in range(24 if split == "TrainingSet" else 2):
                pixels = rng.integers(low, low + 96, (28, 28), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    return tmp_path


class Collapse(torch.optim.Optimizer):
    """What a diverged training leaves: every weight at zero, so the DNN answers one class for every image."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.zero_()


def _collapse_first(monkeypatch, collapses):
    real, calls = retrainModule.adam, []

    def adam(params, **kwargs):
        calls.append(kwargs)
        return Collapse(params) if len(calls) <= collapses else real(params, **kwargs)

    monkeypatch.setattr(retrainModule, "adam", adam)
    return calls


def _train(case, epochs=3):
    return casefolder.train_original(case, SPEC, ARCH, epochs, 0, 2e-2, 8, False, MARKER, threads=1)


def test_a_training_stuck_at_chance_is_redone_from_a_derived_seed(easy_case, monkeypatch, capsys):
    calls = _collapse_first(monkeypatch, collapses=1)
    path = _train(easy_case)
    assert len(calls) == 2
    second = casefolder.attempt_seed(0, 1)
    assert second != 0
    err = capsys.readouterr().err
    assert "stayed at chance with seed 0" in err and f"training again from seed {second}" in err
    model, meta = models.load_model(path)
    assert meta["extra"]["restarts"] == 1 and meta["extra"]["train_seed"] == second
    assert meta["extra"]["final_train_accuracy"] > 0.9


def test_a_dnn_at_chance_in_every_attempt_is_refused_and_not_saved(easy_case, monkeypatch):
    calls = _collapse_first(monkeypatch, collapses=casefolder.ATTEMPTS)
    with pytest.raises(HUDDError, match=r"stayed at chance in 3 trainings \(seed 0: training accuracy 50\.0% at "
                                        r"epoch 3 \(largest class 50\.0%\).*--seed"):
        _train(easy_case)
    assert len(calls) == casefolder.ATTEMPTS
    assert not (easy_case / "DNNModels" / casefolder.MODEL_FILE).exists()


def test_a_working_training_keeps_the_seed_asked_for(easy_case, monkeypatch):
    calls = _collapse_first(monkeypatch, collapses=0)
    _, meta = models.load_model(_train(easy_case))
    assert len(calls) == 1 and meta["extra"]["restarts"] == 0 and meta["extra"]["train_seed"] == 0


def test_short_trainings_are_not_judged():
    """--scale small trains 2 epochs on 320 images and may end near chance; that is not a failure."""
    guard = casefolder.stuck_guard([0, 0, 1, 1], epochs=2)
    guard({"epoch": 2, "train_accuracy": 0.5, "train_loss": 0.69})
    long = casefolder.stuck_guard([0, 0, 1, 1], epochs=10)
    long({"epoch": 2, "train_accuracy": 0.5, "train_loss": 0.69})
    long({"epoch": 3, "train_accuracy": 0.53, "train_loss": 0.6})
    with pytest.raises(casefolder.TrainingStuck, match="epoch 3"):
        long({"epoch": 3, "train_accuracy": 0.51, "train_loss": 0.69})
    with pytest.raises(casefolder.TrainingStuck, match="epoch 10"):
        long({"epoch": 10, "train_accuracy": 0.5, "train_loss": 0.69})


def test_the_batchnorm_net_trains_and_the_model_file_records_its_training_accuracy(easy_case):
    """The training accuracy stored is that of the saved weights in eval mode, measured again here."""
    path = casefolder.train_original(easy_case, SPEC, dict(ARCH, batchnorm=True), 3, 0, 2e-2, 8, False, MARKER,
                                     threads=1)
    model, meta = models.load_model(path)
    assert meta["arch_args"]["batchnorm"] is True
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    from common.data import ImageSet, list_case

    train = list_case(easy_case)["TrainingSet"]
    dataset = ImageSet(easy_case / "DataSets", train.images, SPEC, [train.classes.index(c) for c in train.labels])
    assert meta["extra"]["train_accuracy"] == retrainModule.accuracy(model, dataset, "cpu") > 0.9
    assert meta["extra"]["design"] == "rarer"       # the default when the marker names none
