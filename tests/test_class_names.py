"""Class folders named by numbers (MNIST's 0-9, GTSRB's 00000-00042) and other awkward names, end to end.

The same tiny case is run twice through `HUDD.py -mode HUDD` and `RQ2.py`: once with letter class
names, once with the folders renamed to numbers and punctuated names that sort in the same order.
Everything but the names must come out the same.
"""
import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, TINY_CLASSES, make_tiny_case
from common.errors import HUDDError
from common.tables import read_table

# Every name a number (so pandas would parse the column as numbers), with leading zeros and a dot;
# "0" < "00001" < "2.5" keeps the letter names' order. Spaces, underscores and non-ASCII letters:
# test_bad_input.test_names_with_spaces_underscores_dots_and_non_ascii.
RENAMED = {"circle": "0", "square": "00001", "stripe": "2.5"}
FAST = ("--no-progress", "--epochs", "1")


def run(script, case, *args):
    result = subprocess.run([sys.executable, script, "-o", str(case), *FAST, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    return result


def rename_classes(case):
    """Rename every split's class folders and re-save the model with the new class names."""
    import models

    for split in ("TrainingSet", "TestSet", "ImprovementSet"):
        for old, new in RENAMED.items():
            (case / "DataSets" / split / old).rename(case / "DataSets" / split / new)
    net, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    models.save_model(case / "DNNModels" / "OriginalModel.pth", net, "smallalexnet",
                      classes=[RENAMED[c] for c in TINY_CLASSES], input_size=meta["input_size"],
                      mean=meta["mean"], std=meta["std"], arch_args=meta["arch_args"])


def as_letters(image):
    """An image key of the renamed case as the key of the same image in the letter case."""
    split, cls, rest = image.split("/", 2)
    return f"{split}/{ {v: k for k, v in RENAMED.items()}[cls] }/{rest}"


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    base = make_tiny_case(tmp_path_factory.mktemp("names") / "base")
    letters = Path(shutil.copytree(base, base.parent / "letters"))
    numbers = Path(shutil.copytree(base, base.parent / "numbers"))
    rename_classes(numbers)
    for case in (letters, numbers):
        run("HUDD.py", case, "-mode", "HUDD")
        run("RQ2.py", case, "-reps", "2")
    return letters, numbers


def test_result_csvs_keep_the_names_as_written(both):
    _, numbers = both
    with open(numbers / "testResult.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["expected"] for r in rows} == set(RENAMED.values())          # "00001", not 1
    assert list(rows[0])[4:] == [RENAMED[c] for c in TINY_CLASSES]
    frame = read_table(numbers / "testResult.csv")
    assert set(frame["expected"]) == set(RENAMED.values())
    assert frame["0"].dtype == "float64"                                    # a logit column named "0"


def test_numbers_give_the_same_clusters_unsafe_set_retraining_and_rq2(both):
    letters, numbers = both
    tested = [read_table(c / "testResult.csv") for c in both]
    assert [as_letters(i) for i in tested[1]["image"]] == list(tested[0]["image"])
    assert list(tested[1]["result"]) == list(tested[0]["result"])
    assert [{v: k for k, v in RENAMED.items()}[p] for p in tested[1]["predicted"]] == list(tested[0]["predicted"])

    layers = [read_table(c / "T" / "ClusterAnalysis" / "summary.csv") for c in both]
    assert layers[0].equals(layers[1])
    layer = layers[0].loc[layers[0]["selected"], "layer"].iloc[0]
    clusters = [read_table(c / "T" / "ClusterAnalysis" / layer / "clusters.csv") for c in both]
    assert [as_letters(i) for i in clusters[1]["image"]] == list(clusters[0]["image"])
    assert list(clusters[1]["cluster"]) == list(clusters[0]["cluster"])

    unsafe = [read_table(c / "T" / "UnsafeSet" / "unsafe.csv") for c in both]
    assert len(unsafe[0]) > 0
    assert [as_letters(i) for i in unsafe[1]["image"]] == list(unsafe[0]["image"])
    for column in ("cluster", "rank"):
        assert list(unsafe[1][column]) == list(unsafe[0][column])
    assert unsafe[1]["distance"].to_numpy() == pytest.approx(unsafe[0]["distance"].to_numpy(), rel=1e-6)

    compared = ["rep", "seed", "n_labelled", "n_train_added", "n_distinct_added", "best_epoch", "test_accuracy",
                "gain", "improved", "worsened", "improved_per_cluster"]
    for mode in ("HUDD", "BL1", "BL2"):
        rows = [read_table(c / "T" / f"retrain_{mode}.csv") for c in both]
        assert len(rows[0]) == 2
        assert rows[1][compared].equals(rows[0][compared]), mode

    rq2 = [read_table(c / "RQ2.csv") for c in both]
    assert list(rq2[1]["mode"]) == ["HUDD", "BL1", "BL2"]
    assert rq2[1].drop(columns="mode").to_numpy() == pytest.approx(rq2[0].drop(columns="mode").to_numpy(),
                                                                   nan_ok=True)
    assert "00001" in (numbers / "T" / "report.html").read_text(encoding="utf-8")


# --- the reader itself -------------------------------------------------------------------------------

def test_read_table_keeps_names_as_text_and_types_the_rest(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("image,expected,label,cluster,distance,flag,weather,gaze\n"
                    "TestSet/00042/1.png,00042,7,3,0.5,True,sun,1\n"
                    "TestSet/0/2.png,0,,12,,False,rain,NA\n", encoding="utf-8")
    frame = read_table(path)
    assert list(frame["expected"]) == ["00042", "0"] and list(frame["label"]) == ["7", ""]
    assert frame["cluster"].dtype == "int64" and list(frame["cluster"]) == [3, 12]
    assert frame["distance"].iloc[0] == 0.5 and pd.isna(frame["distance"].iloc[1])
    assert frame["flag"].dtype == bool and list(frame["weather"]) == ["sun", "rain"]
    assert frame["gaze"].iloc[0] == 1 and pd.isna(frame["gaze"].iloc[1])
    assert list(read_table(path, text=("cluster",))["cluster"]) == ["3", "12"]


def test_read_table_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(HUDDError, match=r"t\.csv: missing; run the test step first"):
        read_table(tmp_path / "t.csv", missing_hint="run the test step first")
    (tmp_path / "t.csv").write_text("image,cluster\na,1\n", encoding="utf-8")
    with pytest.raises(HUDDError, match=r"missing columns \['rank'\]; rerun the assign step"):
        read_table(tmp_path / "t.csv", required=("image", "rank"), missing_hint="rerun the assign step")


def test_no_module_reads_the_project_csvs_with_pandas_directly():
    """One reader: pd.read_csv appears only in common/tables.py among the tool's modules."""
    sources = [p for p in ROOT.glob("*.py")] + [p for d in ("common", "casestudies", "report", "models")
                                                 for p in (ROOT / d).rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if "read_csv(" in p.read_text(encoding="utf-8") and p.name != "tables.py"]
    assert not offenders, offenders


# --- an unexpected exception is one line, not a traceback ------------------------------------------

def test_internal_error_is_one_line_with_the_traceback_in_error_log(tmp_path, monkeypatch, capsys):
    import HUDD
    import Helper

    case = make_tiny_case(tmp_path / "case", train_epochs=1)
    assert HUDD.main(["-o", str(case), "--no-progress", "-step", "heatmaps"]) == 0
    capsys.readouterr()
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in case.rglob("*") if p.is_file()}

    def broken(case):
        return {}["no such key"]

    monkeypatch.setitem(Helper.STEP_FUNCTIONS, "distances", broken)
    assert HUDD.main(["-o", str(case), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: internal error in step distances: KeyError: 'no such key'; the traceback is in "
                     f"{case / 'T' / 'error.log'}, please report it"]
    log = (case / "T" / "error.log").read_text(encoding="utf-8")
    assert "Traceback" in log and "step distances" in log and "in broken" in log
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in case.rglob("*") if p.is_file()}
    assert {p: h for p, h in after.items() if p.name not in ("error.log", ".lock")} == \
        {p: h for p, h in before.items() if p.name != ".lock"}
