"""The built-in gaze case study as a user meets it: `python -m casestudies gaze`, then all of HUDD's steps."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT

GAZE_CLASSES = ["BottomCenter", "BottomLeft", "BottomRight", "MiddleLeft", "MiddleRight", "TopCenter", "TopLeft",
                "TopRight"]


@pytest.fixture(scope="module")
def gaze_run(tmp_path_factory):
    case = tmp_path_factory.mktemp("gaze") / "gaze case"        # a space in the path, as users have
    build = [sys.executable, "-m", "casestudies", "gaze", "-o", str(case), "--scale", "small", "--seed", "1",
             "--threads", "1", "--quiet"]
    built = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    hudd = [sys.executable, "HUDD.py", "-o", str(case), "-m", "OriginalModel.pth", "-mode", "HUDD", "-rq", "True",
            "--epochs", "1", "--no-progress"]
    run = subprocess.run(hudd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return case, run.stdout


def _predict_independently(case, images):
    """Predicted class indices from the model file and PIL, without testModule or common.data."""
    import models

    model, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    model.eval()
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    pixels = np.stack([np.asarray(Image.open(case / "DataSets" / name).convert("RGB"), dtype=np.float32) / 255
                       for name in images])
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        return model(x).argmax(1).numpy()


def test_test_step_lists_exactly_the_errors_of_the_dnn(gaze_run):
    case, _ = gaze_run
    frame = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    assert list(frame.columns) == ["image", "result", "expected", "predicted", *GAZE_CLASSES]
    assert all(name.startswith("TestSet/") for name in frame["image"])
    assert list(frame["expected"]) == [name.split("/")[1] for name in frame["image"]]
    assert list(frame["result"] == "Wrong") == list(frame["expected"] != frame["predicted"])
    predicted = _predict_independently(case, frame["image"])
    assert [GAZE_CLASSES[i] for i in predicted] == list(frame["predicted"])
    expected = frame["expected"].map(GAZE_CLASSES.index).to_numpy()
    assert (frame["result"] == "Wrong").sum() == (predicted != expected).sum() > 0


def test_heatmaps_have_one_row_per_error_image_at_every_kept_layer(gaze_run):
    case, _ = gaze_run
    errors = pd.read_csv(case / "testResult.csv", keep_default_na=False).query("result == 'Wrong'")["image"]
    index = pd.read_csv(case / "T" / "Heatmaps" / "index.csv", keep_default_na=False)
    assert list(index["image"]) == list(errors)
    layers = pd.read_csv(case / "T" / "Heatmaps" / "layers.csv")
    kept = layers[layers["kept"].astype(str) == "True"]["layer"]
    assert len(kept) >= 5
    for layer in kept:
        heatmaps = np.load(case / "T" / "Heatmaps" / f"{layer}.npy", mmap_mode="r")
        assert heatmaps.shape[0] == len(errors) and np.isfinite(heatmaps).all(), layer


def test_all_seven_steps_leave_their_files_and_a_summary(gaze_run):
    case, stdout = gaze_run
    steps = json.loads((case / "T" / "manifest.json").read_text())["steps"]
    assert set(steps) == {"test", "heatmaps", "distances", "clusters", "assign", "retrain_HUDD"}
    best = steps["clusters"]["summary"]["best_layer"]
    assert best != "Layer0" and (case / "T" / f"Layer{best.removeprefix('Layer')}").is_dir()
    assert list((case / "T" / "ClusterAnalysis" / best / "AllClusters").glob("*.gif"))
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    assert len(unsafe) == steps["assign"]["summary"]["unsafe_images"] > 0
    assert unsafe["image"].str.startswith("ImprovementSet/").all()
    assert (case / "RQ1.xlsx").is_file() and (case / "T" / "report.html").is_file()
    retrain = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    assert (case / "DNNModels" / retrain.loc[0, "model"]).is_file()
    for needle in ("test accuracy", "best layer", "RQ1 explained", "unsafe set", "after retraining", "report.html",
                   "clusters in words", "of them errors (improvement set: "):
        assert needle in stdout, needle
    rules = pd.read_csv(case / "T" / "ClusterAnalysis" / best / "rules.csv", keep_default_na=False)
    precision = pd.read_csv(case / "T" / "UnsafeSet" / "precision.csv", keep_default_na=False)
    assert set(rules["cluster"]) == set(pd.read_csv(case / "T" / "ClusterAnalysis" / best / "clusters.csv")["cluster"])
    assert precision["cluster"].astype(str).iloc[-1] == "all" and precision["selected"].iloc[-1] == len(unsafe)
    page = (case / "T" / "report.html").read_text(encoding="utf-8")
    assert all(f"rule: {r}".replace("<", "&lt;").replace(">", "&gt;") in page for r in rules["rule"] if r)
