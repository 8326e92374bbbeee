"""Bad input across the pipeline: each case ends with one clear line and loses nothing computed before."""
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import Helper
from conftest import ROOT, make_tiny_case


def hudd(case, *args, user=None):
    cmd = [sys.executable, "HUDD.py", "-o", str(case), "--no-progress", "--epochs", "1", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, user=user)


def error_line(result):
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-1500:])
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def keep_only(case, keep):
    """Delete test images for which keep(row) is False, using a first test run's results."""
    assert hudd(case, "-step", "test").returncode == 0
    frame = pd.read_csv(case / "testResult.csv", keep_default_na=False)
    for _, row in frame.iterrows():
        if not keep(row):
            (case / "DataSets" / row["image"]).unlink()


@pytest.fixture
def case(tmp_path):
    return make_tiny_case(tmp_path / "case")


def test_zero_test_errors(case):
    keep_only(case, lambda row: row["result"] == "Correct")
    line = error_line(hudd(case, "-step", "heatmaps"))
    assert "testResult.csv" in line and "no errors" in line
    assert (case / "testResult.csv").is_file()


def test_one_error_runs_to_the_end(case):
    seen = []
    keep_only(case, lambda row: row["result"] == "Correct" or (not seen and not seen.append(1)))
    run = hudd(case, "-step", "clusters")
    assert run.returncode == 0, run.stderr[-2000:]
    summary = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv")
    assert (summary["k"] == 1).all()
    assign = hudd(case, "-step", "assign")
    line = error_line(hudd(case, "-step", "retrain")) if assign.returncode == 0 else error_line(assign)
    assert "cluster" in line


def test_all_errors_in_one_class(case):
    frame_classes = []

    def keep(row):
        if row["result"] == "Correct":
            return True
        frame_classes.append(row["expected"])
        return row["expected"] == frame_classes[0]
    keep_only(case, keep)
    run = hudd(case)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "best layer" in run.stdout


def test_params_csv_with_missing_rows_and_text_columns(case):
    assert hudd(case, "-step", "test").returncode == 0
    frame = pd.read_csv(case / "testResult.csv")
    params = pd.DataFrame({"image": frame["image"], "brightness": range(len(frame)),
                           "weather": ["sun", "rain"] * (len(frame) // 2) + ["fog"] * (len(frame) % 2)})
    params.iloc[: len(params) // 2].to_csv(case / "DataSets" / "params.csv", index=False)
    run = hudd(case, "-rq", "True", "-step", "clusters")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "weather" in run.stdout + run.stderr          # the skipped column is named
    assert (case / "RQ1.xlsx").is_file()


def test_unlabelled_improvement_set_with_half_filled_labels(tmp_path):
    case = make_tiny_case(tmp_path / "case", flat_improvement=True)
    assert hudd(case, "-step", "assign").returncode == 0
    labels = pd.read_csv(case / "T" / "UnsafeSet" / "labels.csv", keep_default_na=False)
    assert len(labels) >= 2 and (labels["label"] == "").all()
    labels.loc[: len(labels) // 2 - 1, "label"] = "circle"
    labels.to_csv(case / "T" / "UnsafeSet" / "labels.csv", index=False)
    line = error_line(hudd(case, "-step", "retrain"))
    assert "labels.csv" in line and "unlabelled" in line
    labels["label"] = "square"
    labels.to_csv(case / "T" / "UnsafeSet" / "labels.csv", index=False)
    run = hudd(case, "-step", "retrain")
    assert run.returncode == 0, run.stderr[-2000:]


def test_pickle_that_would_run_code_is_refused(case, tmp_path):
    marker = tmp_path / "pwned"
    payload = (f"import os, pickle, torch\n"
               f"class P:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               f"torch.save({{'model': P()}}, '{case / 'DNNModels' / 'evil.pth'}')\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    line = error_line(hudd(case, "-m", "evil.pth", "-step", "test"))
    assert "evil.pth" in line and "--trust-model" in line
    assert not marker.exists()


def test_read_only_case_folder(case):
    assert hudd(case, "-step", "test").returncode == 0
    kept = (case / "testResult.csv").read_bytes()
    shutil.rmtree(case / "T")
    if os.geteuid() != 0:
        os.chmod(case, 0o555)
        undo = ["chmod", "755", str(case)]
    else:  # root ignores permission bits; an immutable folder is read-only even for root
        if subprocess.run(["chattr", "+i", str(case)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported on this file system")
        undo = ["chattr", "-i", str(case)]
    try:
        line = error_line(hudd(case, "-step", "test"))
    finally:
        subprocess.run(undo, check=True)
    assert "not writable" in line
    assert (case / "testResult.csv").read_bytes() == kept


def test_missing_improvement_set_at_assign(case):
    shutil.rmtree(case / "DataSets" / "ImprovementSet")
    assert hudd(case, "-step", "clusters").returncode == 0
    line = error_line(hudd(case, "-step", "assign"))
    assert "ImprovementSet" in line
    assert (case / "T" / "ClusterAnalysis" / "summary.csv").is_file()
