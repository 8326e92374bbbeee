"""Built-in case studies at --scale small: layout, params.csv, labels, determinism, model, overwrite rules."""
import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import casestudies
import models
from casestudies import eyecases, eyes, fashion
from casestudies.__main__ import main
from common.errors import HUDDError

SPLITS = ("TrainingSet", "TestSet", "ImprovementSet")
GAZE_CLASSES = {"TopLeft", "TopCenter", "TopRight", "MiddleLeft", "MiddleRight", "BottomLeft", "BottomCenter",
                "BottomRight"}
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not fashion.available(FASHION),
                                   reason=f"{FASHION} missing: apt-get install -y dataset-fashion-mnist")


@pytest.fixture(scope="module")
def gaze_case(tmp_path_factory):
    case = tmp_path_factory.mktemp("gaze") / "case"
    return casestudies.build("gaze", case, seed=3, scale="small", progress=False, threads=1)


def _files(case):
    root = case / "DataSets"
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.png"))


def _class_folders(case, split):
    return {p.name for p in (case / "DataSets" / split).iterdir() if p.is_dir()}


def test_gaze_layout_and_params(gaze_case):
    for split in SPLITS:
        assert _class_folders(gaze_case, split) == GAZE_CLASSES
    files = _files(gaze_case)
    params = pd.read_csv(gaze_case / "DataSets" / "params.csv")
    assert params.columns[0] == "image"
    assert sorted(params["image"]) == files and params["image"].is_unique
    numeric = params.drop(columns="image")
    assert all(kind in "if" for kind in numeric.dtypes.map(lambda d: d.kind))
    assert set(numeric["glasses"].unique()) <= {0, 1}
    assert (gaze_case / "DataSets" / ".complete").is_file()
    with Image.open(gaze_case / "DataSets" / files[0]) as img:
        assert img.mode == "RGB"


def test_gaze_labels_follow_the_angles(gaze_case):
    """The folder of each image is the 45-degree sector of its gaze angles, counter-clockwise from 'right'."""
    sectors = ["MiddleRight", "TopRight", "TopCenter", "TopLeft", "MiddleLeft", "BottomLeft", "BottomCenter",
               "BottomRight"]
    params = pd.read_csv(gaze_case / "DataSets" / "params.csv")
    for image, h, v in zip(params["image"], params["gaze_h"], params["gaze_v"]):
        angle = math.degrees(math.atan2(v, h)) % 360
        assert image.split("/")[1] == sectors[int(((angle + 22.5) % 360) // 45)], image


def test_gaze_model_loads_with_the_folder_classes(gaze_case):
    model, meta = models.load_model(gaze_case / "DNNModels" / "OriginalModel.pth")
    assert meta["classes"] == sorted(GAZE_CLASSES)
    with Image.open(next((gaze_case / "DataSets" / "TestSet").glob("*/*.png"))) as img:
        assert list(meta["input_size"]) == [3, img.height, img.width]
    import torch

    assert model(torch.zeros(2, *meta["input_size"])).shape == (2, 8)


def test_same_seed_same_bytes_other_seed_other_data(gaze_case, tmp_path):
    again = tmp_path / "again"
    eyecases.write_datasets(again / "DataSets", "gaze", seed=3, scale="small", progress=False)
    files = _files(gaze_case)
    assert _files(again) == files
    same = lambda rel: (gaze_case / "DataSets" / rel).read_bytes() == (again / "DataSets" / rel).read_bytes()
    assert same("params.csv") and all(same(rel) for rel in files)
    other = tmp_path / "other" / "DataSets"
    eyecases.write_datasets(other, "gaze", seed=4, scale="small", progress=False)
    assert (other / "params.csv").read_bytes() != (gaze_case / "DataSets" / "params.csv").read_bytes()


def test_same_seed_trains_the_same_dnn(gaze_case, tmp_path):
    import torch

    again = shutil.copytree(gaze_case, tmp_path / "again")
    (again / "DNNModels" / "OriginalModel.pth").unlink()       # complete data sets: the build resumes at training
    torch.manual_seed(12345)
    torch.rand(100)                                             # whatever ran before must not matter
    casestudies.build("gaze", again, seed=3, scale="small", progress=False, threads=1)
    first, _ = models.load_model(gaze_case / "DNNModels" / "OriginalModel.pth")
    second, _ = models.load_model(again / "DNNModels" / "OriginalModel.pth")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_refuses_to_overwrite_unless_forced(gaze_case, tmp_path, capsys):
    before = (gaze_case / "DataSets" / "params.csv").stat().st_mtime_ns
    with pytest.raises(HUDDError, match="--force"):
        casestudies.build("gaze", gaze_case, seed=3, scale="small", progress=False, threads=1)
    assert main(["gaze", "-o", str(gaze_case), "--scale", "small", "--seed", "3", "--quiet", "--threads", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (gaze_case / "DataSets" / "params.csv").stat().st_mtime_ns == before
    user = tmp_path / "user"
    (user / "DataSets" / "TrainingSet" / "a").mkdir(parents=True)
    with pytest.raises(HUDDError, match="already holds data sets"):
        casestudies.build("openclosed", user, scale="small", progress=False, threads=1)


def test_killed_builds_are_detected(gaze_case, tmp_path):
    """A leftover staging folder is discarded; complete data sets without a model resume at training."""
    case = tmp_path / "case"
    shutil.copytree(gaze_case / "DataSets", case / "DataSets")
    (case / ".DataSets.building" / "TrainingSet").mkdir(parents=True)
    casestudies.build("gaze", case, seed=3, scale="small", progress=False, threads=1)
    assert not (case / ".DataSets.building").exists()
    assert (case / "DNNModels" / "OriginalModel.pth").is_file()
    assert (case / "DataSets" / "params.csv").read_bytes() == (gaze_case / "DataSets" / "params.csv").read_bytes()
    half = tmp_path / "half"
    shutil.copytree(gaze_case / "DataSets", half / "DataSets")
    (half / "DataSets" / ".complete").unlink()      # no marker: not ours, so never deleted without --force
    with pytest.raises(HUDDError, match="already holds data sets"):
        casestudies.build("gaze", half, seed=3, scale="small", progress=False, threads=1)


def test_bad_arguments():
    with pytest.raises(HUDDError, match="unknown case study"):
        casestudies.build("mnist", "/nonexistent", scale="small")
    with pytest.raises(HUDDError, match="scale"):
        casestudies.build("gaze", "/nonexistent", scale="huge")


def test_openclosed_labels_follow_the_eyelid_opening(tmp_path):
    case = casestudies.build("openclosed", tmp_path / "oc", seed=1, scale="small", progress=False, threads=1)
    for split in SPLITS:
        assert _class_folders(case, split) == {"Closed", "Open"}
    params = pd.read_csv(case / "DataSets" / "params.csv")
    assert sorted(params["image"]) == _files(case)
    expected = np.where(params["eyelid_opening"] < 0.3, "Closed", "Open")
    assert (params["image"].str.split("/").str[1] == expected).all()
    assert (expected == "Closed").any() and (expected == "Open").any()
    _, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    assert meta["classes"] == ["Closed", "Open"]


def test_renderer_landmarks_follow_the_gaze_and_the_lids():
    base = eyes.sample_parameters(np.random.default_rng(0), 1).iloc[0].to_dict()
    base.update(head_yaw=0.0, head_pitch=0.0, head_roll=0.0, eyelid_opening=0.9, glasses=0)
    centre = eyes.LANDMARK_NAMES.index("iris_centre")
    _, right, seen = eyes.render_eye(dict(base, gaze_h=20.0, gaze_v=0.0), size=64)
    _, left, _ = eyes.render_eye(dict(base, gaze_h=-20.0, gaze_v=0.0), size=64)
    _, up, _ = eyes.render_eye(dict(base, gaze_h=0.0, gaze_v=20.0), size=64)
    assert right.shape == (len(eyes.LANDMARK_NAMES), 2) and seen[centre]
    assert right[centre, 0] > left[centre, 0] + 4 and up[centre, 1] < right[centre, 1] - 2
    image, _, closed_seen = eyes.render_eye(dict(base, eyelid_opening=0.0), size=64)
    assert image.shape == (64, 64, 3) and not closed_seen[centre]


def _idx(path):
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


@needs_fashion
def test_fmnist_small(tmp_path):
    case = casestudies.build("fmnist", tmp_path / "fm", seed=0, scale="small", progress=False, threads=1)
    classes = _class_folders(case, "TestSet")
    assert len(classes) == 10
    for split in SPLITS:
        assert _class_folders(case, split) == classes
    assert not (case / "DataSets" / "params.csv").exists()
    test_labels = _idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    test_images = _idx(FASHION / "t10k-images-idx3-ubyte.gz")
    tests = sorted((case / "DataSets" / "TestSet").glob("*/*.png"))
    by_label = {}
    for path in tests:
        index = int(path.stem.split("-")[1])
        by_label.setdefault(int(test_labels[index]), set()).add(path.parent.name)
        with Image.open(path) as img:
            assert img.mode == "L" and np.array_equal(np.asarray(img), test_images[index])
    assert all(len(folders) == 1 for folders in by_label.values())      # one folder per official label
    names = {p.name for p in (case / "DataSets" / "TrainingSet").glob("*/*.png")}
    assert not names & {p.name for p in (case / "DataSets" / "ImprovementSet").glob("*/*.png")}
    _, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    assert meta["classes"] == sorted(classes) and list(meta["input_size"]) == [1, 28, 28]


def test_fmnist_missing_data_says_how_to_install(tmp_path):
    with pytest.raises(HUDDError, match="apt-get install -y dataset-fashion-mnist"):
        fashion.write_datasets(tmp_path / "DataSets", 0, "small", progress=False, source=tmp_path / "none")


# --- splits built as the paper's: named conditions rarer in training, richer in the improvement set --

@pytest.mark.parametrize("task", ["gaze", "openclosed"])
def test_condition_frequencies_per_split(task):
    """Each named condition occurs in each split at its documented share (within 4 standard errors)."""
    n = 20000
    for split in SPLITS:
        params = eyes.sample_parameters(np.random.default_rng([7, eyes.SPLIT_COLUMN[split]]), n, task, split)
        masks = eyes.condition_masks(params, task)
        assert set(masks) == set(eyes.CONDITIONS) - ({"half_closed_eyes"} if task == "openclosed" else set())
        for name, mask in masks.items():
            share = eyes.condition_shares(split)[name]
            assert abs(mask.mean() - share) < 4 * math.sqrt(share * (1 - share) / n), (task, split, name, mask.mean())
    train, test, improvement = (eyes.condition_shares(s) for s in SPLITS)
    for name in eyes.CONDITIONS:
        assert train[name] * 3 <= test[name] and improvement[name] >= 2 * test[name], name


def test_built_splits_follow_the_condition_shares(gaze_case):
    """The written params.csv of each split holds its split's conditions (a built case, small scale)."""
    params = pd.read_csv(gaze_case / "DataSets" / "params.csv")
    split = params["image"].str.split("/").str[0]
    rare = {s: np.any(list(eyes.condition_masks(params[split == s]).values()), axis=0).mean() for s in SPLITS}
    assert rare["TrainingSet"] < rare["TestSet"] < rare["ImprovementSet"], rare
    assert (split == "ImprovementSet").sum() == 2 * (split == "TestSet").sum()


# --- split designs: conditions the training set lacks (incomplete) or holds at the test share (oracle) --

@pytest.mark.parametrize("task", ["gaze", "openclosed"])
def test_designs_move_only_the_training_share(task):
    """incomplete: each condition at most 1% of TrainingSet; oracle: at TestSet's share; other splits unchanged."""
    n = 20000
    draw = lambda split, design: eyes.sample_parameters(np.random.default_rng([7, 1]), n, task, split, design)
    for design, expected in (("incomplete", eyes.INCOMPLETE_SHARE), ("oracle", None)):
        masks = eyes.condition_masks(draw("TrainingSet", design), task)
        for name, mask in masks.items():
            share = eyes.condition_shares("TestSet")[name] if expected is None else expected
            assert abs(mask.mean() - share) < 4 * math.sqrt(share * (1 - share) / n), (design, name, mask.mean())
            assert design != "incomplete" or mask.mean() <= 0.01, name
        for split in ("TestSet", "ImprovementSet"):
            pd.testing.assert_frame_equal(draw(split, design), draw(split, "rarer"))


def test_a_design_writes_its_conditions_as_columns_of_params_csv(tmp_path, monkeypatch):
    monkeypatch.setitem(eyecases.SCALES, "small", {s: 12 for s in SPLITS})
    root = tmp_path / "DataSets"
    eyecases.write_datasets(root, "gaze", seed=2, scale="small", progress=False, design="incomplete")
    params = pd.read_csv(root / "params.csv")
    columns = [c for c in params.columns if c.startswith("condition_")]
    assert columns == [f"condition_{name}" for name in eyes.CONDITIONS]
    for name, mask in eyes.condition_masks(params).items():
        assert (params[f"condition_{name}"].to_numpy() == mask.astype(int)).all(), name
    default = tmp_path / "default"
    eyecases.write_datasets(default, "gaze", seed=2, scale="small", progress=False)
    assert not [c for c in pd.read_csv(default / "params.csv").columns if c.startswith("condition_")]


def test_design_and_arch_options_are_checked():
    with pytest.raises(HUDDError, match="--design incomplete: only gaze and openclosed"):
        casestudies.build("fmnist", "/nonexistent", scale="small", design="incomplete")
    with pytest.raises(HUDDError, match="--design 'rare'; use one of rarer, incomplete, oracle"):
        casestudies.build("gaze", "/nonexistent", scale="small", design="rare")
    with pytest.raises(HUDDError, match="--arch smallalexnet-bn: the landmarks case study trains KPNet"):
        casestudies.build("landmarks", "/nonexistent", scale="small", arch="smallalexnet-bn")
    with pytest.raises(HUDDError, match="--arch 'vgg'"):
        casestudies.build("gaze", "/nonexistent", scale="small", arch="vgg")


def test_data_sets_marked_before_designs_existed_resume_as_the_default_design(tmp_path):
    from casestudies import casefolder

    datasets = tmp_path / "DataSets"
    (datasets / "TrainingSet").mkdir(parents=True)
    (datasets / ".complete").write_text('{"case_study": "gaze", "seed": 0, "scale": "small"}')
    wanted = {"case_study": "gaze", "seed": 0, "scale": "small"}
    assert casefolder.plan(tmp_path, {**wanted, "design": "rarer"}, force=False) == "train"
    with pytest.raises(HUDDError, match="already holds data sets"):
        casefolder.plan(tmp_path, {**wanted, "design": "incomplete"}, force=False)


def _toy_results(case, wrong):
    from casestudies import conditions

    for split, name in conditions.RESULT_FILES.items():
        images = [f"{split}/a/{i}.png" for i in range(4)]
        result = ["Wrong" if image in wrong else "Correct" for image in images]
        pd.DataFrame({"image": images, "result": result, "expected": "a", "predicted": "a"}).to_csv(case / name,
                                                                                                     index=False)


def test_condition_table_counts_shares_and_error_rates_per_split(tmp_path):
    from casestudies import conditions

    (tmp_path / "DataSets").mkdir()
    images = [f"{split}/a/{i}.png" for split in SPLITS for i in range(4)]
    dark = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    pd.DataFrame({"image": images, "gain": 1.5, "condition_dark": dark}).to_csv(tmp_path / "DataSets" / "params.csv",
                                                                                index=False)
    _toy_results(tmp_path, wrong={"TestSet/a/0.png", "TestSet/a/2.png", "ImprovementSet/a/3.png"})
    table = conditions.condition_table(tmp_path).set_index(["split", "condition"])
    assert table.loc[("TrainingSet", "dark"), ["images", "share", "errors"]].tolist() == [1, 0.25, 0]
    assert table.loc[("TestSet", "dark"), ["images", "errors", "error_rate"]].tolist() == [2, 1, 0.5]
    assert table.loc[("TestSet", "none of them"), ["images", "errors"]].tolist() == [2, 1]
    assert table.loc[("ImprovementSet", "all"), ["images", "errors", "error_rate"]].tolist() == [4, 1, 0.25]
    assert table.loc[("ImprovementSet", "dark"), "errors"] == 0
    wide = conditions.wide(conditions.condition_table(tmp_path))
    assert wide["condition"].tolist() == ["dark", "none of them", "all"]
    assert wide.loc[0, "share_TestSet"] == 0.5 and wide.loc[0, "error_rate_TestSet"] == 0.5


@pytest.mark.parametrize("value", ["2", "yes", ""])
def test_a_condition_column_that_is_not_0_or_1_is_named(tmp_path, value):
    from casestudies import conditions

    params = pd.DataFrame({"image": ["a.png", "b.png"], "condition_fog": ["1", value]})
    path = tmp_path / "params.csv"
    params.to_csv(path, index=False)
    from common.tables import read_table

    with pytest.raises(HUDDError, match=r"params.csv: column 'condition_fog' holds .*0 or 1"):
        conditions.read_conditions(read_table(path), path)
