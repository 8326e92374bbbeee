"""The test step: the case folder, the result CSVs, the step cache and bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import Helper
from common.data import list_case, list_split
from common.errors import HUDDError
from conftest import ROOT, TINY_CLASSES, make_tiny_case


def hudd(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "HUDD.py", *map(str, args), "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_result_csvs_columns_rows_and_errors(tiny_case):
    Helper.run(tiny_case, step="test", options=Helper.Options(progress=False))
    for name, split in (("trainResult.csv", "TrainingSet"), ("testResult.csv", "TestSet"),
                        ("improveResult.csv", "ImprovementSet")):
        frame = pd.read_csv(tiny_case / name, keep_default_na=False)
        assert list(frame.columns) == ["image", "result", "expected", "predicted", *TINY_CLASSES]
        assert list(frame["image"]) == sorted(frame["image"])           # stable order
        assert all(img.startswith(f"{split}/") for img in frame["image"])
        assert set(frame["result"]) <= {"Correct", "Wrong"}
        wrong = frame["expected"] != frame["predicted"]
        assert list(frame["result"] == "Wrong") == list(wrong)
        # an independent recount of the errors from the written logits
        logits = frame[TINY_CLASSES].to_numpy()
        labels = frame["expected"].map(TINY_CLASSES.index).to_numpy()
        assert (logits.argmax(1) != labels).sum() == wrong.sum()
    raw = (tiny_case / "testResult.csv").read_bytes()
    assert b"\r\n" not in raw


def test_logits_are_full_precision(tiny_case):
    import models
    import torch
    from common.data import ImageSpec, read_image

    Helper.run(tiny_case, step="test", options=Helper.Options(progress=False))
    frame = pd.read_csv(tiny_case / "testResult.csv")
    model, meta = models.load_model(tiny_case / "DNNModels" / "OriginalModel.pth")
    x = read_image(tiny_case / "DataSets" / frame["image"][0], ImageSpec.from_meta(meta))
    with torch.no_grad():
        expected = model(x[None]).numpy()[0]
    # equal up to batch-size rounding of the BLAS kernels, far below any printed truncation
    np.testing.assert_allclose(frame.loc[0, TINY_CLASSES].to_numpy(np.float32), expected, rtol=1e-5, atol=1e-7)
    first_row = (tiny_case / "testResult.csv").read_text().splitlines()[1].split(",")
    assert all(len(v.lstrip("-").replace(".", "").lstrip("0")) >= 7 for v in first_row[4:])


def test_cache_skips_an_unchanged_step_and_reruns_a_changed_one(tiny_case):
    options = Helper.Options(progress=False)
    Helper.run(tiny_case, options=options, until="test")
    mtime = os.stat(tiny_case / "testResult.csv").st_mtime_ns
    Helper.run(tiny_case, options=options, until="test")
    assert os.stat(tiny_case / "testResult.csv").st_mtime_ns == mtime          # skipped
    extra = tiny_case / "DataSets" / "TestSet" / "circle" / "zzz extra.png"
    Image.open(tiny_case / "DataSets" / "TestSet" / "circle" / "000.png").save(extra)
    Helper.run(tiny_case, options=options, until="test")                      # data changed: rerun
    assert "TestSet/circle/zzz extra.png" in set(pd.read_csv(tiny_case / "testResult.csv")["image"])
    (tiny_case / "trainResult.csv").unlink()                                   # an output lost: rerun
    Helper.run(tiny_case, options=options, until="test")
    assert (tiny_case / "trainResult.csv").is_file()


def test_flat_improvement_set_is_unlabelled(tmp_path):
    case = make_tiny_case(tmp_path / "c", flat_improvement=True, train_epochs=0)
    splits = list_case(case)
    assert not splits["ImprovementSet"].labelled
    Helper.run(case, step="test", options=Helper.Options(progress=False))
    frame = pd.read_csv(case / "improveResult.csv", keep_default_na=False)
    assert set(frame["result"]) == {"Unlabelled"} and set(frame["expected"]) == {""}


def test_corrupt_and_truncated_images_are_skipped_and_listed(tiny_case):
    folder = tiny_case / "DataSets" / "TestSet" / "square"
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    good = (folder / "000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Helper.run(tiny_case, step="test", options=Helper.Options(progress=False))
    skipped = pd.read_csv(tiny_case / "T" / "skipped.csv")
    assert set(skipped["image"]) == {"TestSet/square/corrupt.png", "TestSet/square/truncated.png"}
    assert not set(skipped["image"]) & set(pd.read_csv(tiny_case / "testResult.csv")["image"])


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_input_gives_one_line_errors_and_keeps_results(tiny_case, tmp_path):
    assert hudd("-o", tiny_case, "-step", "test").returncode == 0
    kept = (tiny_case / "testResult.csv").read_bytes()
    manifest = (tiny_case / "T" / "manifest.json").read_bytes()

    # a model whose classes differ from the class folders
    (tiny_case / "DataSets" / "TrainingSet" / "zebra").mkdir()
    for split in ("TestSet", "ImprovementSet"):
        (tiny_case / "DataSets" / split / "zebra").mkdir()
    _one_line_error(hudd("-o", tiny_case, "-step", "test"), "OriginalModel.pth", "differ")
    for split in ("TrainingSet", "TestSet", "ImprovementSet"):
        (tiny_case / "DataSets" / split / "zebra").rmdir()

    # class folders that differ between splits
    (tiny_case / "DataSets" / "TestSet" / "zebra").mkdir()
    _one_line_error(hudd("-o", tiny_case, "-step", "test"), "TestSet", "zebra")
    (tiny_case / "DataSets" / "TestSet" / "zebra").rmdir()

    # not a model, a pickle that would run code, a missing model
    (tiny_case / "DNNModels" / "junk.pth").write_text("junk")
    _one_line_error(hudd("-o", tiny_case, "-m", "junk.pth", "-step", "test"), "junk.pth", "not a model")
    _one_line_error(hudd("-o", tiny_case, "-m", "absent.pth", "-step", "test"), "absent.pth")

    # grayscale images for an RGB model; a wrong image size
    gray = tiny_case / "DataSets" / "TestSet" / "circle" / "gray.png"
    Image.new("L", (16, 16)).save(gray)
    _one_line_error(hudd("-o", tiny_case, "-step", "test"), "gray.png", "grayscale")
    gray.unlink()
    big = tiny_case / "DataSets" / "TestSet" / "circle" / "big.png"
    Image.new("RGB", (20, 20)).save(big)
    _one_line_error(hudd("-o", tiny_case, "-step", "test"), "big.png", "16x16")
    big.unlink()

    assert (tiny_case / "testResult.csv").read_bytes() == kept
    assert (tiny_case / "T" / "manifest.json").read_bytes() == manifest


def test_missing_and_empty_splits(tmp_path):
    case = tmp_path / "c"
    (case / "DataSets" / "TrainingSet" / "a").mkdir(parents=True)
    with pytest.raises(HUDDError, match="TrainingSet: no images"):
        list_case(case)
    Image.new("RGB", (16, 16)).save(case / "DataSets" / "TrainingSet" / "a" / "x.png")
    with pytest.raises(HUDDError, match="TestSet: missing"):
        list_case(case)
    with pytest.raises(HUDDError, match="DataSets: missing"):
        list_case(tmp_path / "nowhere")
    (case / "DataSets" / "TestSet").mkdir()
    Image.new("RGB", (16, 16)).save(case / "DataSets" / "TestSet" / "loose.png")
    with pytest.raises(HUDDError, match="class"):
        list_case(case)


def test_names_with_spaces_dots_underscores_and_non_ascii(tmp_path):
    folder = tmp_path / "DataSets" / "TestSet" / "ä class"
    folder.mkdir(parents=True)
    names = ["a b.c_d.png", "été_1.2.png", "x.png"]
    for name in names:
        Image.new("RGB", (4, 4)).save(folder / name)
    split = list_split(tmp_path / "DataSets", "TestSet")
    assert split.images == sorted(f"TestSet/ä class/{n}" for n in names)
    assert split.labels == ["ä class"] * 3


def test_second_run_is_refused_while_one_holds_the_lock(tiny_case):
    case = Helper.Case(tiny_case)
    case.lock()
    try:
        result = hudd("-o", tiny_case, "-step", "test")
        _one_line_error(result, "another HUDD run")
    finally:
        case.unlock()
    assert hudd("-o", tiny_case, "-step", "test").returncode == 0


def test_read_only_case_folder(tiny_case):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    os.chmod(tiny_case, 0o555)
    try:
        _one_line_error(hudd("-o", tiny_case, "-step", "test"), "not writable")
    finally:
        os.chmod(tiny_case, 0o755)


def test_unreadable_images_are_nan_rows_of_the_read_images_shape():
    import testModule

    rows = testModule.stack_filled([np.array([1.0, 2.0]), None, np.array([3.0, 4.0])], (0,))
    assert rows.dtype == np.float32 and rows.shape == (3, 2)
    assert np.isnan(rows[1]).all() and rows[2].tolist() == [3.0, 4.0]
    assert testModule.stack_filled([None, None], (0, 2)).shape == (2, 0, 2)
    assert testModule.stack_filled([], (0, 2)).shape == (0, 0, 2)


def test_engines_run_inference_without_importing_the_test_step():
    """engines/ takes the per-image inference from common.inference, so testModule and engines do not import each other."""
    code = ("import sys, engines, engines.rayengine; "
            "assert 'testModule' not in sys.modules, 'engines imported testModule'; "
            "import testModule, common.inference as core; "
            "assert all(getattr(testModule, n) is getattr(core, n) "
            "for n in ('predict', 'predict_keypoints', 'stack_filled', 'decode_keypoints'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
