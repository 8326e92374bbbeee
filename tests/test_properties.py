"""Measured image properties (explain/properties.py) on tiny generated images, and T/properties.csv."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import HUDDError
from conftest import ROOT, make_tiny_case
from explain import properties as ep


def gray(value=0.2, side=32):
    return np.full((1, side, side), value, dtype=np.float32)


def measured(*images):
    return ep.image_properties(np.stack(images))


def test_brighter_blurred_and_noisy_images_move_their_properties():
    rng = np.random.default_rng(0)
    texture = rng.uniform(0.2, 0.8, size=(1, 32, 32)).astype(np.float32)
    blurred = texture.copy()
    for _ in range(3):
        blurred = (blurred + np.roll(blurred, 1, 1) + np.roll(blurred, -1, 1) + np.roll(blurred, 1, 2)
                   + np.roll(blurred, -1, 2)) / 5
    ramp = np.tile(np.linspace(0.2, 0.6, 32, dtype=np.float32), (1, 32, 1))
    noisy = np.clip(ramp + rng.normal(0, 0.05, ramp.shape), 0, 1).astype(np.float32)
    p = measured(texture, np.clip(texture + 0.2, 0, 1), blurred, ramp, noisy)
    assert p["brightness"][1] > p["brightness"][0] + 0.15
    assert p["sharpness"][2] < p["sharpness"][0] / 4
    assert p["noise"][3] < 1e-6 and p["noise"][4] == pytest.approx(0.05, rel=0.25)
    assert p["contrast"][0] > p["contrast"][2]
    assert set(p) == set(ep.GRAY_PROPERTIES)


def test_a_square_of_known_size_and_position_gives_its_area_centre_extent_and_aspect():
    image = gray(0.1, side=40)
    image[0, 8:18, 20:36] = 0.9                        # 10 rows x 16 columns
    p = measured(image, gray(0.5, side=40))
    assert p["area"][0] == pytest.approx(160 / 1600)
    assert p["centre_x"][0] == pytest.approx(28 / 40) and p["centre_y"][0] == pytest.approx(13 / 40)
    assert p["extent_x"][0] == pytest.approx(16 / 40) and p["extent_y"][0] == pytest.approx(10 / 40)
    assert p["aspect"][0] == pytest.approx(1.6)
    assert p["area"][1] == 0 and np.isnan([p[k][1] for k in ("centre_x", "extent_x", "aspect")]).all()


def test_colour_images_get_colourfulness_and_hue():
    red = np.zeros((3, 16, 16), np.float32)
    red[0] = 0.9
    blue = np.zeros((3, 16, 16), np.float32)
    blue[2] = 0.9
    grey = np.full((3, 16, 16), 0.5, np.float32)
    p = measured(red, blue, grey)
    assert p["hue"][0] == pytest.approx(0, abs=1) and p["hue"][1] == pytest.approx(240, abs=1)
    assert np.isnan(p["hue"][2]) and p["colourfulness"][2] == 0
    assert p["colourfulness"][0] == pytest.approx(0.3 * np.hypot(0.9, 0.45), rel=1e-5)
    with pytest.raises(HUDDError, match="needs a .B, 1 or 3, H, W. batch"):
        ep.image_properties(np.zeros((2, 16, 16)))


def write_case(root, n=6, side=20):
    """A tiny grey case: brighter images in class b, one file that is no image."""
    for split in ("TrainingSet", "TestSet"):
        for cls, value in (("a", 60), ("b", 180)):
            folder = root / "DataSets" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                array = np.full((side, side), value, np.uint8)
                array[5:5 + i + 2, 5:12] = 255 - value
                Image.fromarray(array).save(folder / f"{i}.png")
    (root / "DataSets" / "TestSet" / "a" / "broken.png").write_bytes(b"not a png")
    return root


def test_properties_csv_has_the_params_format_nan_rows_and_one_line_per_problem(tmp_path):
    case = write_case(tmp_path / "case")
    frame, notes = ep.write_properties(case, progress=False)
    written = pd.read_csv(case / "T" / "properties.csv")
    assert list(written.columns) == ["image"] + ep.GRAY_PROPERTIES
    assert written["image"].iloc[0] == "TrainingSet/a/0.png" and len(written) == 25
    broken = written.set_index("image").loc["TestSet/a/broken.png"]
    assert broken.isna().all()
    bright = written.set_index("image")["brightness"]
    assert bright["TestSet/b/0.png"] > bright["TestSet/a/0.png"]
    assert notes[0].startswith("1 image could not be read (e.g. TestSet/a/broken.png")
    assert notes[1:] == ["properties constant over a split, kept (they explain no cluster): "
                         "TestSet: noise, extent_x; TrainingSet: noise, extent_x"]
    flat = write_case(tmp_path / "flat", n=3)
    for path in (flat / "DataSets").rglob("*.png"):
        if path.name != "broken.png":
            Image.fromarray(np.full((20, 20), 90, np.uint8)).save(path)
    _, notes = ep.write_properties(flat, progress=False)
    constant = [n for n in notes if n.startswith("properties constant over a split")]
    assert len(constant) == 1 and "TestSet: brightness" in constant[0] and "TrainingSet: brightness" in constant[0]


def test_a_stale_properties_csv_is_recomputed_and_a_fresh_one_reused(tmp_path):
    case = write_case(tmp_path / "case")
    ep.write_properties(case, progress=False)
    path = case / "T" / "properties.csv"
    mtime = path.stat().st_mtime_ns
    again, notes = ep.write_properties(case, progress=False)
    assert path.stat().st_mtime_ns == mtime and notes == [] and len(again) == 25
    os.remove(case / "DataSets" / "TestSet" / "a" / "broken.png")
    other = case / "DataSets" / "TestSet" / "b" / "new.png"
    Image.fromarray(np.full((20, 20), 250, np.uint8)).save(other)
    frame, _ = ep.write_properties(case, progress=False)
    assert "TestSet/b/new.png" in set(frame["image"]) and "TestSet/a/broken.png" not in set(frame["image"])
    assert set(pd.read_csv(path)["image"]) == set(frame["image"])
    assert json.loads((case / "T" / "properties.json").read_text())["images"] == len(frame)
    Image.fromarray(np.full((20, 20), 10, np.uint8)).save(other)           # same name, other pixels
    os.utime(other, ns=(mtime + 10**9, mtime + 10**9))
    frame, _ = ep.write_properties(case, progress=False)
    assert frame.set_index("image").loc["TestSet/b/new.png", "brightness"] == pytest.approx(10 / 255, abs=1e-6)


def test_merge_keeps_params_and_adds_prefixed_properties():
    params = pd.DataFrame({"image": ["TestSet/a/1.png", "TestSet/a/2.png"], "yaw": [1.0, 2.0],
                           "prop_noise": [7.0, 8.0]})
    props = pd.DataFrame({"image": ["TestSet/a/2.png", "TestSet/a/3.png"], "brightness": [0.5, 0.6],
                          "noise": [0.1, 0.2]})
    merged = ep.merge_properties(params, props).set_index("image")
    assert list(merged.columns) == ["yaw", "prop_noise", "prop_brightness"]
    assert merged.loc["TestSet/a/2.png", "prop_noise"] == 8.0 and merged.loc["TestSet/a/2.png", "yaw"] == 2.0
    assert np.isnan(merged.loc["TestSet/a/3.png", "yaw"]) and merged.loc["TestSet/a/3.png", "prop_brightness"] == 0.6


def test_parameter_table_says_where_its_columns_come_from(tmp_path):
    case = write_case(tmp_path / "case")
    assert ep.parameter_table(case) == (None, None)
    ep.write_properties(case, progress=False)
    table, source = ep.parameter_table(case)
    assert source == "properties" and "brightness" in table.columns
    pd.DataFrame({"image": ["TestSet/a/0.png"], "yaw": [3.0]}).to_csv(case / "DataSets" / "params.csv", index=False)
    table, source = ep.parameter_table(case)
    assert source == "params+properties" and {"yaw", "prop_brightness"} <= set(table.columns)


def test_rq_true_without_params_measures_the_properties_and_step_properties_measures_them_again(tmp_path):
    """-rq True on a case without params.csv: T/properties.csv, then RQ1 and the rules over it; -step
    properties measures again even when the table is current, and leaves every step's cache as it was."""
    case = make_tiny_case(tmp_path / "case")
    hudd = [sys.executable, "HUDD.py", "-o", str(case), "-m", "OriginalModel.pth", "--no-progress"]
    run = subprocess.run(hudd + ["-step", "clusters", "-rq", "True"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(case / "T" / "properties.csv")
    images = sorted(str(p.relative_to(case / "DataSets")) for p in (case / "DataSets").rglob("*.png"))
    assert sorted(table["image"]) == images and set(ep.property_names(3)) <= set(table.columns)
    assert f"[properties] {len(ep.property_names(3))} properties of {len(images)} images in T/properties.csv" \
        in run.stdout
    assert "RQ1 (" in run.stdout and "measured image properties" in run.stdout and "RQ1 explained" in run.stdout
    rq1 = pd.read_csv(case / "RQ1.csv")
    assert len(rq1) and set(rq1["best_parameter"]) <= set(ep.property_names(3))
    layer = json.loads((case / "T" / "manifest.json").read_text())["steps"]["clusters"]["summary"]["best_layer"]
    rules = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "rules.csv", keep_default_na=False)
    used = {c["parameter"] for text in rules["conditions"] if text for c in json.loads(text)}
    assert used <= set(ep.property_names(3))
    page = (case / "T" / "report.html").read_text(encoding="utf-8")
    assert "variance of measured image properties per cluster" in page

    manifest = (case / "T" / "manifest.json").read_text()
    stamp = (case / "T" / "properties.json").stat().st_mtime_ns
    again = subprocess.run(hudd + ["-step", "properties"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[properties] " in again.stdout and "properties" in again.stdout.split("HUDD summary")[1]
    assert (case / "T" / "properties.json").stat().st_mtime_ns > stamp
    assert pd.read_csv(case / "T" / "properties.csv").equals(table)
    assert (case / "T" / "manifest.json").read_text() == manifest
