"""The bad-input matrix, through the real command line.

Every failing case checks three things: `python HUDD.py` exits with status 2, it prints exactly one
`error:` line that names the offending file or folder and says what to do, and every output that
existed before the bad run (the result CSVs, the models, every file under T/) is byte for byte the
same afterwards (`snapshot` / `assert_preserved`). The success-path cases (non-image files, corrupt
images, all errors in one class, unusual names, a rough params.csv) check that the run completes and
that its outputs are right.

Speed: one tiny case is built and tested once per module (`tested`); each test works on its own
copy (copytree keeps mtimes, so the cached test step stays current in the copy).
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CLASSES, TINY_SIZE, make_tiny_case

OPTIONS = ("--no-progress", "--epochs", "1", "--xlsx", "False")


# --- helpers ---------------------------------------------------------------------------------------

def hudd(case, *args):
    """`python HUDD.py -o CASE ...` with the fast options every run of this module shares."""
    cmd = [sys.executable, "HUDD.py", "-o", str(case), *OPTIONS, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    return result


def error_line(result, *fragments):
    """The one `error:` line of a run that must fail with status 2; it must hold every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (str(fragment), lines[0])
    return lines[0]


def snapshot(case):
    """{path relative to CASE: sha256} of every output: result CSVs, RQ1 files, models, all of T/.

    T/.lock is left out: every run writes its pid there, by design.
    """
    case = Path(case)
    files = [case / name for name in ("trainResult.csv", "testResult.csv", "improveResult.csv",
                                      "RQ1.xlsx", "RQ1.csv")]
    for folder in (case / "T", case / "DNNModels"):
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]
    return {str(p.relative_to(case)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def assert_preserved(case, before):
    after = snapshot(case)
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    added = sorted(set(after) - set(before))
    assert not (lost or changed or added), f"lost {lost[:5]}, changed {changed[:5]}, added {added[:5]}"


def copy_case(source, target):
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


def keep_only(case, keep):
    """Delete the test images for which keep(row of testResult.csv) is False; return the kept rows."""
    frame = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    kept = frame[[bool(keep(row)) for _, row in frame.iterrows()]]
    for image in set(frame["image"]) - set(kept["image"]):
        (case / "DataSets" / image).unlink()
    return kept.reset_index(drop=True)


def save_variant(case, name, classes, num_classes=len(TINY_CLASSES), weights_from="OriginalModel.pth"):
    """A model file beside OriginalModel.pth: the same net with other class names, or a fresh net."""
    import models

    arch_args = dict(num_classes=num_classes, in_channels=3, input_size=TINY_SIZE, width=4, hidden=16)
    if num_classes == len(TINY_CLASSES):
        net, _ = models.load_model(case / "DNNModels" / weights_from)
    else:
        net = models.SmallAlexNet(**arch_args)
    return models.save_model(case / "DNNModels" / name, net, "smallalexnet", classes=classes,
                             input_size=(3, TINY_SIZE, TINY_SIZE), mean=(0.5,) * 3, std=(0.5,) * 3,
                             arch_args=arch_args)


@contextlib.contextmanager
def read_only(path, recursive):
    """Make `path` (and, if `recursive`, all below it) read-only; for root, with the immutable flag."""
    flag = ["-R"] if recursive else []
    if os.geteuid() == 0:   # root ignores permission bits; an immutable folder is read-only even for root
        undo = ["chattr", *flag, "-i", str(path)]
        if subprocess.run(["chattr", *flag, "+i", str(path)], capture_output=True).returncode != 0:
            subprocess.run(undo, capture_output=True)
            pytest.skip("chattr +i is not supported on this file system")
    else:
        subprocess.run(["chmod", *flag, "a-w", str(path)], check=True)
        undo = ["chmod", *flag, "u+w", str(path)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    """A tiny case (3 classes, 16x16 RGB) after `-step test`."""
    case = make_tiny_case(tmp_path_factory.mktemp("tested") / "case")
    ok(hudd(case, "-step", "test"))
    return case


@pytest.fixture
def case(tested, tmp_path):
    return copy_case(tested, tmp_path / "case")


# --- missing and empty splits ----------------------------------------------------------------------

@pytest.mark.parametrize("split", ["TrainingSet", "TestSet"])
def test_missing_split(case, split):
    before = snapshot(case)
    shutil.rmtree(case / "DataSets" / split)
    error_line(hudd(case), case / "DataSets" / split, "missing data set folder",
               "create it with one subfolder per class")
    assert_preserved(case, before)


def test_empty_split_with_empty_class_folders(case):
    before = snapshot(case)
    for cls in TINY_CLASSES:
        shutil.rmtree(case / "DataSets" / "TestSet" / cls)
        (case / "DataSets" / "TestSet" / cls).mkdir()
    error_line(hudd(case, "-step", "test"), case / "DataSets" / "TestSet", "no images found", "add images")
    assert_preserved(case, before)


def test_missing_improvement_set_at_assign(case):
    shutil.rmtree(case / "DataSets" / "ImprovementSet")
    ok(hudd(case, "-step", "clusters"))
    before = snapshot(case)
    run = hudd(case)
    error_line(run, case / "DataSets" / "ImprovementSet", "missing", "needs an improvement set")
    assert "[clusters] up to date" in run.stdout
    assert_preserved(case, before)


# --- corrupt, truncated and non-image files --------------------------------------------------------

def test_corrupt_and_truncated_images_are_skipped_counted_and_the_run_completes(case):
    datasets = case / "DataSets"
    good = (datasets / "TestSet" / "circle" / "000.png").read_bytes()
    bad = {"TestSet/square/corrupt.png": b"not an image at all",
           "TestSet/circle/truncated.png": good[: len(good) // 2],
           "TrainingSet/stripe/corrupt.jpg": b"\xff\xd8\xff\xe0 no JPEG after all"}
    for image, data in bad.items():
        (datasets / image).write_bytes(data)
    run = ok(hudd(case))
    assert "[test] 3 unreadable images skipped" in run.stdout
    assert str(case / "T" / "skipped.csv") in run.stdout
    skipped = pd.read_csv(case / "T" / "skipped.csv", keep_default_na=False)
    assert set(skipped["image"]) == set(bad) and (skipped["reason"] != "").all()
    tested = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    assert len(tested) == 3 * 8 and not set(tested["image"]) & set(bad)
    assert not set(pd.read_csv(case / "trainResult.csv")["image"]) & set(bad)
    assert "(%d errors in 24 test images)" % (tested["result"] == "Wrong").sum() in run.stdout
    # the rest of the run: clusters, unsafe set, retraining and the report
    assert "best layer" in run.stdout and "after retraining" in run.stdout
    assert len(pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")) > 0
    assert len(pd.read_csv(case / "T" / "retrain_HUDD.csv")) == 1
    assert (case / "T" / "report.html").is_file()


def test_non_image_files_are_ignored_not_counted(case):
    """notes.txt, Thumbs.db, .DS_Store, desktop.ini: not images by their extension, so not data.

    They are neither results nor 'unreadable images': the rerun test step writes the same result
    files byte for byte and skips nothing.
    """
    results = {name: (case / name).read_bytes() for name in ("trainResult.csv", "testResult.csv", "improveResult.csv")}
    datasets = case / "DataSets"
    for folder in ("TestSet/circle", "TrainingSet/square", "ImprovementSet/stripe", "TestSet", "ImprovementSet"):
        (datasets / folder / "notes.txt").write_text("looked at these on Monday\n")
        (datasets / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(200))
        (datasets / folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (datasets / "TestSet" / "square" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    run = ok(hudd(case, "-step", "test"))
    assert "[test] running" in run.stdout
    assert "unreadable" not in run.stdout
    assert "in 24 test images" in run.stdout
    assert pd.read_csv(case / "T" / "skipped.csv").empty
    for name, data in results.items():
        assert (case / name).read_bytes() == data, name


# --- images the model cannot take ------------------------------------------------------------------

def test_grayscale_image_for_an_rgb_model(case):
    before = snapshot(case)
    # A test image removed as well: had the test step written trainResult/testResult.csv before it
    # reached the bad image in the last split, testResult.csv would now differ.
    (case / "DataSets" / "TestSet" / "circle" / "000.png").unlink()
    gray = case / "DataSets" / "ImprovementSet" / "stripe" / "gray.png"
    Image.new("L", (TINY_SIZE, TINY_SIZE), 128).save(gray)
    error_line(hudd(case), gray, "grayscale image but the model expects 3 channels", "convert the images to RGB")
    assert_preserved(case, before)


def test_wrong_image_size(case):
    before = snapshot(case)
    big = case / "DataSets" / "TrainingSet" / "circle" / "big.png"
    Image.new("RGB", (20, 24)).save(big)
    error_line(hudd(case, "-step", "test"), big, "is 20x24 but the model expects 16x16", "resize the images")
    assert_preserved(case, before)


def test_class_folders_that_differ_between_splits(case):
    before = snapshot(case)
    improvement = case / "DataSets" / "ImprovementSet"
    (improvement / "stripe").rename(improvement / "stripes")
    error_line(hudd(case), improvement, "class folders differ from TrainingSet", "stripe, stripes",
               "needs the same class folders")
    assert_preserved(case, before)


# --- models that do not fit, and files that are no models ------------------------------------------

def test_model_whose_classes_are_in_another_order(case):
    save_variant(case, "swapped.pth", ["square", "circle", "stripe"])
    before = snapshot(case)
    error_line(hudd(case, "-m", "swapped.pth", "-step", "test"), case / "DNNModels" / "swapped.pth",
               "model classes ['square', 'circle', 'stripe'] differ from the class folders",
               "use the model trained on these classes")
    assert_preserved(case, before)


@pytest.mark.parametrize("classes", [[], None], ids=["empty-list", "none"])
def test_model_with_other_output_count_and_no_class_names(case, classes):
    path = save_variant(case, "four.pth", [], num_classes=4)
    if classes is None:
        record = torch.load(path, weights_only=True)
        record["classes"] = None
        torch.save(record, path)
    before = snapshot(case)
    line = error_line(hudd(case, "-m", "four.pth", "-step", "test"))
    assert line.startswith(f"error: {path}: the network has 4 outputs but there are 3 class folders"), line
    assert "use a model trained on these class folders" in line
    assert_preserved(case, before)


def _png_bytes():
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    return buffer.getvalue()


NOT_MODELS = {
    "empty": (lambda path: path.write_bytes(b""), "not a model file"),
    "png": (lambda path: path.write_bytes(_png_bytes()), "not a model file"),
    "state-dict": (lambda path: torch.save({"weight": torch.zeros(2, 2)}, path), "a bare state_dict"),
    "tensor": (lambda path: torch.save(torch.zeros(3), path), "not a HUDD model file"),
}


@pytest.mark.parametrize("kind", [
    "empty",
    "png",
    "state-dict",
    "tensor",
])
def test_file_that_is_not_a_model(case, kind):
    write, fragment = NOT_MODELS[kind]
    path = case / "DNNModels" / f"{kind}.pth"
    write(path)
    before = snapshot(case)
    line = error_line(hudd(case, "-m", path.name, "-step", "test"), path, fragment, "models.save_model")
    assert "--trust-model" not in line
    assert_preserved(case, before)


def test_pickle_that_would_run_code_is_refused(case, tmp_path):
    marker = tmp_path / "pwned"
    evil = case / "DNNModels" / "evil.pth"
    payload = (f"import os, torch\n"
               f"class P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               f"torch.save({{'model': P()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    before = snapshot(case)
    error_line(hudd(case, "-m", "evil.pth"), evil, "full pickle, which can run code", "--trust-model")
    assert not marker.exists()
    assert_preserved(case, before)


# --- the case folder -------------------------------------------------------------------------------

def test_read_only_case_folder(case):
    """A case folder copied from read-only media: all of it, T/ included, is read-only."""
    before = snapshot(case)
    with read_only(case, recursive=True):
        error_line(hudd(case, "-step", "test"), case, "not writable", "copy the case folder somewhere writable")
    assert_preserved(case, before)


def test_read_only_case_folder_with_a_writable_T(case):
    """Only the top folder is read-only: the result CSVs cannot be written although T/ can."""
    before = snapshot(case)
    with read_only(case, recursive=False):
        error_line(hudd(case, "-step", "test"), case, "not writable", "testResult.csv",
                   "copy the case folder somewhere writable")
    assert_preserved(case, before)


# --- how many errors -------------------------------------------------------------------------------

def test_zero_test_errors(case):
    keep_only(case, lambda row: row["result"] == "Correct")
    ok(hudd(case, "-step", "test"))
    before = snapshot(case)
    run = hudd(case)
    error_line(run, case / "testResult.csv", "the DNN makes no errors on the test set", "add harder test images")
    assert "[test] up to date" in run.stdout and "[heatmaps] running" in run.stdout
    assert_preserved(case, before)


def test_one_error(case):
    first_wrong = []
    kept = keep_only(case, lambda row: row["result"] == "Correct"
                     or (not first_wrong and not first_wrong.append(row["image"])))
    assert (kept["result"] == "Wrong").sum() == 1
    ok(hudd(case, "-step", "clusters"))
    summary = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv")
    assert (summary["k"] == 1).all()
    before = snapshot(case)
    run = hudd(case)
    assert "[clusters] up to date" in run.stdout and "[assign] running" in run.stdout
    line = error_line(run, "single member", "add test images that the DNN gets wrong")
    assert_preserved(case, before)
    assert "clusters.csv" in line and str(case) in line


def test_all_errors_in_one_class_runs_to_the_end(case):
    tested = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    worst = tested[tested["result"] == "Wrong"]["expected"].value_counts().index[0]
    kept = keep_only(case, lambda row: row["result"] == "Correct" or row["expected"] == worst)
    run = ok(hudd(case))
    assert "best layer" in run.stdout and "after retraining" in run.stdout
    retested = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    assert list(retested["image"]) == list(kept["image"])
    wrong = retested[retested["result"] == "Wrong"]
    assert set(wrong["expected"]) == {worst} and len(wrong) >= 2
    layer = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv").query("selected == True")["layer"].iloc[0]
    members = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "clusters.csv", keep_default_na=False)
    assert sorted(members["image"]) == sorted(wrong["image"])
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv", keep_default_na=False)
    assert len(unsafe) > 0 and all((case / "DataSets" / i).is_file() for i in unsafe["image"])
    retrained = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    assert len(retrained) == 1 and (case / "DNNModels" / retrained["model"].iloc[0]).is_file()
    assert (case / "T" / "report.html").is_file()


# --- names -----------------------------------------------------------------------------------------

RENAMED = {"circle": "Kreis ä.b_c", "square": "carré 2.0", "stripe": "stripe_x y.ü"}


def test_names_with_spaces_underscores_dots_and_non_ascii(tested, tmp_path):
    """Case folder, class folders, image files and the model file, all with awkward names: the whole pipeline."""
    case = copy_case(tested, tmp_path / "my case ü.v1")
    shutil.rmtree(case / "T")
    for name in ("trainResult.csv", "testResult.csv", "improveResult.csv"):
        (case / name).unlink()
    for split in ("TrainingSet", "TestSet", "ImprovementSet"):
        for old, new in RENAMED.items():
            folder = case / "DataSets" / split / old
            for image in sorted(folder.iterdir()):
                image.rename(folder / f"{image.stem} été_v1.2 .{image.suffix.lstrip('.')}")
            folder.rename(folder.with_name(new))
    classes = [RENAMED[c] for c in TINY_CLASSES]
    assert classes == sorted(classes)          # the folders sort in the model's output order
    model = save_variant(case, "Orig Model é.v1.pth", classes)
    (case / "DNNModels" / "OriginalModel.pth").unlink()

    run = ok(hudd(case, "-m", model.name, "-mode", "HUDD"))
    assert "best layer" in run.stdout and "after retraining" in run.stdout

    on_disk = sorted(str(p.relative_to(case / "DataSets")) for p in (case / "DataSets" / "TestSet").rglob("*.png"))
    tested_frame = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    assert sorted(tested_frame["image"]) == on_disk
    assert set(tested_frame["expected"]) == set(classes) and list(tested_frame.columns[4:]) == classes
    layer = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv").query("selected == True")["layer"].iloc[0]
    members = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "clusters.csv", keep_default_na=False)
    assert sorted(members["image"]) == sorted(tested_frame[tested_frame["result"] == "Wrong"]["image"])
    for image, cluster in zip(members["image"], members["cluster"]):
        assert (case / "T" / layer / str(cluster) / image.replace("/", "__")).is_file(), image
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv", keep_default_na=False)
    assert len(unsafe) > 0
    for image, cluster, rank in zip(unsafe["image"], unsafe["cluster"], unsafe["rank"]):
        assert (case / "DataSets" / image).is_file() and " été_v1.2 ." in image
        assert (case / "T" / "UnsafeSet" / str(cluster) / f"{int(rank):04d}_{Path(image).name}").is_file()
    retrained = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    assert (case / "DNNModels" / retrained["model"].iloc[0]).is_file()
    assert "Kreis ä.b_c" in (case / "T" / "report.html").read_text(encoding="utf-8")


# --- RQ1 -------------------------------------------------------------------------------------------

def test_params_csv_with_missing_rows_and_text_columns(case):
    errors = pd.read_csv(case / "testResult.csv", keep_default_na=False).query("result == 'Wrong'")
    n = len(errors)
    params = pd.DataFrame({"image": errors["image"].to_numpy(),
                           "brightness": [0.1 * i for i in range(n)],
                           "weather": ["sun", "rain"] * (n // 2) + ["fog"] * (n % 2),
                           "gaze": [str(i) if i % 3 else "?" for i in range(n)]}).iloc[: n // 2]
    params.to_csv(case / "DataSets" / "params.csv", index=False)
    first = ok(hudd(case, "-step", "clusters"))
    assert "[test] up to date" in first.stdout      # params.csv is RQ1's input, not the test step's
    before = snapshot(case)
    run = ok(hudd(case, "-rq", "True", "-step", "clusters"))
    assert "[distances] up to date" in run.stdout and "[clusters] running" in run.stdout
    notes = [line for line in run.stdout.splitlines() if line.startswith("RQ1 note:")]
    assert any("'weather' is not numeric" in n for n in notes), notes
    assert any("'gaze' is not numeric" in n for n in notes), notes
    layer = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv").query("selected == True")["layer"].iloc[0]
    members = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "clusters.csv", keep_default_na=False)
    members = members[members.groupby("cluster")["image"].transform("size") > 1]
    absent = (~members["image"].isin(params["image"])).sum()
    assert absent > 0
    assert any(f"params.csv has no row for {absent} of {len(members)} clustered error images" in n
               for n in notes), notes
    assert "RQ1 (" in run.stdout and "RQ1 explained" in run.stdout
    assert (case / "RQ1.xlsx").is_file() and (case / "RQ1.csv").is_file()
    # nothing is lost, the steps before clustering are untouched, and the clusters are the same with
    # RQ1 as without: only the manifest, the report and the XLSX exports (a timestamp inside) differ
    after = snapshot(case)
    words = {f"T/ClusterAnalysis/{layer}/{name}" for name in ("rules.csv", "descriptions.csv")}   # the clusters in words
    assert set(after) == set(before) | {"RQ1.xlsx", "RQ1.csv"} | words
    changed = sorted(k for k in before if after[k] != before[k])
    assert all(k in ("T/manifest.json", "T/report.html") or k.endswith(".xlsx") for k in changed), changed


def test_params_csv_that_is_not_a_csv(case):
    params = case / "DataSets" / "params.csv"
    params.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    ok(hudd(case, "-step", "clusters"))      # without -rq True params.csv is not read
    before = snapshot(case)
    run = hudd(case, "-rq", "True")
    assert "[clusters] up to date" in run.stdout          # RQ1 needs no new clustering
    error_line(run, params, "not a readable CSV", "fix or remove it")
    after = snapshot(case)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, sorted(changed)


# --- the unsafe set's labels -----------------------------------------------------------------------

def test_unlabelled_improvement_set_with_half_filled_labels(case):
    improvement = case / "DataSets" / "ImprovementSet"
    for cls in TINY_CLASSES:              # a flat (unlabelled) improvement set, as in real use
        for image in sorted((improvement / cls).iterdir()):
            image.rename(improvement / f"{cls}_{image.name}")
        (improvement / cls).rmdir()
    ok(hudd(case, "-step", "assign"))
    labels_path = case / "T" / "UnsafeSet" / "labels.csv"
    labels = pd.read_csv(labels_path, keep_default_na=False)
    assert len(labels) >= 2 and (labels["label"] == "").all()
    half = len(labels) // 2
    labels.loc[: half - 1, "label"] = [image.split("/")[-1].split("_")[0] for image in labels["image"][:half]]
    labels.to_csv(labels_path, index=False)
    before = snapshot(case)
    unlabelled = labels[labels["label"] == ""]

    run = hudd(case, "-step", "retrain")
    line = error_line(run, labels_path, f"{len(unlabelled)} of {len(labels)} images still unlabelled",
                      "write each image's class in the label column")
    for index, image in list(zip(unlabelled.index, unlabelled["image"]))[:5]:
        assert f"row {index + 2} {image}" in line, (index, image, line)
    for image in labels["image"][:half]:
        assert image not in line
    after = snapshot(case)
    unsafe_set = [k for k in before if k.startswith("T/UnsafeSet/")]
    assert {"T/UnsafeSet/labels.csv", "T/UnsafeSet/unsafe.csv"} <= set(unsafe_set)
    assert {k: after.get(k) for k in unsafe_set} == {k: before[k] for k in unsafe_set}
    assert set(after) == set(before)
    changed = sorted(k for k in before if after[k] != before[k])
    assert set(changed) <= {"T/manifest.json", "T/report.html"}, changed

    labels["label"] = [image.split("/")[-1].split("_")[0] for image in labels["image"]]
    labels.to_csv(labels_path, index=False)
    ok(hudd(case, "-step", "retrain"))
    assert len(pd.read_csv(case / "T" / "retrain_HUDD.csv")) == 1
    assert not changed and "[assign] up to date" in run.stdout, changed
