"""Keypoint regressors end to end: the landmarks case study through all of HUDD's steps, and the FLD rules."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT

THRESHOLD = 4.0


# --- decoding and targets --------------------------------------------------------------------------

def test_decoding_is_the_weighted_mean_of_the_64_highest_pixels():
    from testModule import decode_keypoints

    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, (1, 1, 32, 32)).astype(np.float32)
    maps[0, 0, 5:13, 20:28] += 5.0 + rng.uniform(0, 3, (8, 8))     # the 64 highest pixels, off-centre weights
    got = decode_keypoints(maps)[0, 0]
    block = maps[0, 0, 5:13, 20:28]
    ys, xs = np.mgrid[5:13, 20:28]
    assert np.allclose(got, [np.average(xs, weights=block), np.average(ys, weights=block)], atol=1e-4)
    assert abs(got[0] - 23.5) > 0.01 or abs(got[1] - 8.5) > 0.01     # weighted, not the plain centre
    reshuffled = maps.copy()                                          # pixels below the top 64 do not count
    outside = np.ones((32, 32), bool)
    outside[5:13, 20:28] = False
    reshuffled[0, 0][outside] = rng.uniform(0, 4.9, outside.sum())
    assert np.allclose(decode_keypoints(reshuffled)[0, 0], got, atol=1e-5)


def test_gaussian_targets_peak_at_the_keypoint_and_decode_back_to_it():
    from retrainModule import GAUSSIAN_SCALE, GAUSSIAN_SIGMA, gaussian_targets
    from testModule import decode_keypoints

    coords = torch.tensor([[[20.0, 30.0], [33.4, 17.8], [float("nan"), float("nan")]]])
    maps = gaussian_targets(coords, (64, 64))
    assert maps.shape == (1, 3, 64, 64)
    assert maps[0, 0, 30, 20] == pytest.approx(GAUSSIAN_SCALE)          # peak at (x=20, y=30), rows are y
    assert maps[0, 0, 30, 20 + int(GAUSSIAN_SIGMA)] == pytest.approx(GAUSSIAN_SCALE * np.exp(-0.5), rel=1e-5)
    assert torch.count_nonzero(maps[0, 2]) == 0                         # a missing keypoint has no target
    assert np.allclose(decode_keypoints(maps)[0, :2], coords[0, :2].numpy(), atol=0.15)


def test_result_rows_follow_the_fld_rule():
    from testModule import keypoint_frame

    names = ["a", "b", "c"]
    truth = [np.array([[10, 10], [20, 20], [np.nan, np.nan]]), np.array([[10, 10], [20, 20], [30, 30]]), None]
    predicted = np.array([[[13, 14], [20, 20], [0, 0]],          # errors 5, 0 (c missing): mean 2.5 -> Correct
                          [[10, 10], [20, 29], [30, 30]],        # errors 0, 9, 0: mean 3 -> Correct, b flagged
                          [[1, 1], [2, 2], [3, 3]]])
    frame = keypoint_frame(["x/0.png", "x/1.png", "x/2.png"], truth, predicted, names, {"ab": [0, 1], "cc": [2]})
    assert list(frame.columns[:8]) == ["image", "result", "avg_error", "max_error", "worst_component", "worst_KP",
                                       "ab", "cc"]
    assert list(frame["result"]) == ["Correct", "Correct", "Unlabelled"]
    assert frame["avg_error"].iloc[:2].tolist() == pytest.approx([2.5, 3.0])
    assert list(frame["worst_KP"].iloc[:2]) == ["a", "b"]
    assert list(frame["ab"].iloc[:2]) == ["Error", "Error"] and list(frame["cc"].iloc[:2]) == ["", "Correct"]
    assert np.isnan(frame.loc[0, "c"]) and frame.loc[1, "b"] == pytest.approx(9.0)


# --- the landmarks case study through HUDD ---------------------------------------------------------

@pytest.fixture(scope="module")
def landmarks_run(tmp_path_factory):
    case = tmp_path_factory.mktemp("landmarks") / "case"
    build = [sys.executable, "-m", "casestudies", "landmarks", "-o", str(case), "--scale", "small", "--threads", "1",
             "--quiet"]
    built = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    cmd = [sys.executable, "HUDD.py", "-o", str(case), "-rq", "True", "--epochs", "1", "--no-progress",
           "--xlsx", "False"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return case, run.stdout


def _truth(case, split, names):
    frame = pd.read_csv(case / "DataSets" / split / "labels.csv")
    values = frame[[f"{n}_{a}" for n in names for a in "xy"]].to_numpy(float).reshape(len(frame), len(names), 2)
    values[(values <= 1e-5).all(2)] = np.nan
    return dict(zip(frame["image"], values))


def test_result_csv_has_the_fld_columns_and_wrong_means_mean_error_above_4px(landmarks_run):
    import models
    from casestudies.landmarks import COMPONENTS, KEYPOINTS

    case, stdout = landmarks_run
    frame = pd.read_csv(case / "testResult.csv")
    assert list(frame.columns[:6]) == ["image", "result", "avg_error", "max_error", "worst_component", "worst_KP"]
    assert list(frame.columns[6:6 + len(COMPONENTS)]) == list(COMPONENTS)
    assert list(frame.columns[6 + len(COMPONENTS):6 + len(COMPONENTS) + len(KEYPOINTS)]) == KEYPOINTS
    truth = _truth(case, "TestSet", KEYPOINTS)
    predicted = frame[[f"pred_{n}_{a}" for n in KEYPOINTS for a in "xy"]].to_numpy().reshape(len(frame), -1, 2)
    gt = np.stack([truth[i] for i in frame["image"]])
    distance = np.sqrt(((predicted - gt) ** 2).sum(2))
    mean = np.nanmean(distance, 1)
    assert np.array_equal(frame["result"] == "Wrong", mean > THRESHOLD)
    assert np.allclose(frame["avg_error"], mean)
    # the predicted coordinates are the model's maps decoded by the 64-point rule
    model, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    from common.data import ImageSpec, read_image

    spec = ImageSpec.from_meta(meta)
    image = read_image(case / "DataSets" / frame["image"].iloc[0], spec)[None]
    with torch.no_grad():
        maps = model(image)[0].numpy()
    for k in (0, 13):
        flat = maps[k].ravel()
        top = np.argsort(flat)[-64:]
        w = np.clip(flat[top], 0, None)
        xy = [np.average(top % maps.shape[2], weights=w), np.average(top // maps.shape[2], weights=w)]
        assert np.allclose(predicted[0, k], xy, atol=1e-3)
    assert "mean keypoint error" in stdout


def test_heatmaps_start_from_the_worst_keypoint_map_alone(landmarks_run):
    import models
    from common.data import ImageSpec, read_image
    from heatmapModule import layer_relevance

    case, _ = landmarks_run
    model, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    wrong = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    wrong = wrong[wrong["result"] == "Wrong"].reset_index(drop=True)
    row = 0
    k = meta["classes"].index(wrong["worst_KP"][row])
    image = read_image(case / "DataSets" / wrong["image"][row], ImageSpec.from_meta(meta))[None]

    def start(outputs):
        s = torch.zeros_like(outputs)
        s[:, k] = outputs[:, k]
        return s

    stored = np.load(case / "T" / "Heatmaps" / "Layer1.npy")[row]
    ours = layer_relevance(model, image, start=start, layers=["Layer1", "Layer9"])
    assert np.allclose(stored, ours["Layer1"][0].numpy(), rtol=1e-4, atol=1e-6)
    # changing the weights of every other output map leaves the relevance unchanged; changing map k does not
    with torch.no_grad():
        others = [j for j in range(len(meta["classes"])) if j != k]
        model.conv2d_trans_2.weight[:, others] += torch.randn_like(model.conv2d_trans_2.weight[:, others])
    again = layer_relevance(model, image, start=start, layers=["Layer1", "Layer9"])
    for name in ("Layer1", "Layer9"):
        assert torch.allclose(again[name], ours[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        model.conv2d_trans_2.weight[:, k] *= -1
    flipped = layer_relevance(model, image, start=start, layers=["Layer9"])
    assert not torch.allclose(flipped["Layer9"], ours["Layer9"])


def test_clusters_unsafe_set_retraining_and_rq1_are_written(landmarks_run):
    import models

    case, stdout = landmarks_run
    wrong = (pd.read_csv(case / "testResult.csv")["result"] == "Wrong").sum()
    summary = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv")
    layer = summary[summary["selected"]]["layer"].iloc[0]
    clusters = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "clusters.csv")
    assert len(clusters) == wrong and clusters["cluster"].min() == 1
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    assert len(unsafe) > 0 and unsafe["image"].str.startswith("ImprovementSet/").all()
    assert not (case / "T" / "UnsafeSet" / "labels.csv").exists()     # ground truth comes from labels.csv
    retrain = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    for column in ("mean_error", "original_mean_error", "share_under_threshold"):
        assert retrain[column].notna().all()
    assert retrain["share_under_threshold"].iloc[0] == retrain["test_accuracy"].iloc[0]
    _, meta = models.load_model(case / "DNNModels" / retrain["model"].iloc[0])
    assert meta["task"] == "keypoints" and meta["extra"]["retrained"]["select"] == "train-loss"
    retrained, _ = models.load_model(case / "DNNModels" / retrain["model"].iloc[0])
    original, _ = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    for name in ("conv2d_1", "conv2d_2", "conv2d_3", "conv2d_4"):      # frozen by default, as the original
        assert torch.equal(getattr(retrained, name).weight, getattr(original, name).weight)
    assert not torch.equal(retrained.conv2d_5.weight, original.conv2d_5.weight)
    rq1 = pd.read_csv(case / "RQ1.csv")
    assert len(rq1) > 0 and "RQ1" in stdout


def test_without_ground_truth_heatmaps_start_from_the_least_peaked_map():
    from retrainModule import gaussian_targets
    from testModule import least_peaked_start

    coords = torch.tensor([[[10.0, 10.0], [30.0, 12.0], [20.0, 40.0]]])
    outputs = gaussian_targets(coords, (48, 48), sigma=2.0)
    outputs[0, 2] = 0.5 * (outputs[0, 2] + gaussian_targets(torch.tensor([[[40.0, 5.0]]]), (48, 48), sigma=2.0)[0, 0])
    outputs[0, 0] *= 0.2                     # a low but sharp map is not the unsure one
    start = least_peaked_start(outputs)
    assert torch.equal(start[0, 2], outputs[0, 2])
    assert torch.count_nonzero(start[0, :2]) == 0
