"""RQ2: A12 and Mann-Whitney, the per-mode table, its files, and RQ2.py over a tiny case."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import retrainModule as rm
from common.errors import HUDDError
from test_retrain import prepared_case


def test_a12_on_a_hand_case():
    # pairs x > y: 3>2, 3>2 (2); ties: 2=2, 2=2 (2 halves = 1); out of 9 pairs
    assert rm.a12([1, 2, 3], [2, 2, 4]) == pytest.approx(3 / 9)
    assert rm.a12([5, 6], [1, 2]) == 1.0 and rm.a12([1, 2], [5, 6]) == 0.0
    assert rm.a12([3, 3], [3]) == 0.5


def test_mann_whitney_matches_scipys_documented_example():
    # scipy.stats.mannwhitneyu docs: males vs females, U1 = 17, exact two-sided p = 0.1111
    assert rm.mann_whitney_p([19, 22, 16, 29, 24], [20, 11, 17, 12]) == pytest.approx(0.1111, abs=1e-4)


def results_frame():
    return pd.DataFrame({"mode": ["HUDD"] * 3 + ["BL1"] * 3 + ["BL2"] * 3,
                         "test_accuracy": [.90, .92, .94, .80, .82, .84, .91, .93, .89],
                         "gain": [1.0, 3.0, 5.0, -9.0, -7.0, -5.0, 2.0, 4.0, 0.0]})


def test_rq2_table_statistics_per_mode():
    table = rm.rq2_table(results_frame()).set_index("mode")
    assert list(table.index) == ["HUDD", "BL1", "BL2"]
    hudd = table.loc["HUDD"]
    assert (hudd["reps"], hudd["accuracy_mean"], hudd["accuracy_min"], hudd["accuracy_max"]) == \
        pytest.approx((3, 92.0, 90.0, 94.0))
    assert hudd["accuracy_std"] == pytest.approx(2.0) and hudd["gain_mean"] == pytest.approx(3.0)
    assert np.isnan(hudd["p_value_HUDD_vs"]) and np.isnan(hudd["a12_HUDD_vs"])
    # complete separation of 3 against 3: exact two-sided p = 2 / C(6, 3) = 0.1, A12 = 1
    assert table.loc["BL1", "p_value_HUDD_vs"] == pytest.approx(0.1)
    assert table.loc["BL1", "a12_HUDD_vs"] == 1.0
    assert table.loc["BL2", "a12_HUDD_vs"] == pytest.approx(6 / 9)   # .90>.89; .92>.91,.89; .94>all: 6 of 9


def test_write_rq2_files(tmp_path):
    table = rm.write_rq2(tmp_path, results_frame())
    assert pd.read_csv(tmp_path / "RQ2.csv").shape == table.shape
    sheets = pd.read_excel(tmp_path / "RQ2.xlsx", sheet_name=None)
    assert set(sheets) == {"RQ2", "repetitions"} and len(sheets["repetitions"]) == 9
    with Image.open(tmp_path / "RQ2_boxplot.png") as img:
        assert img.format == "PNG" and img.width > 200


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared_case(tmp_path_factory.mktemp("rq2") / "case")


def test_rq2_command_runs_the_pipeline_then_the_repetitions(case, monkeypatch):
    import Helper
    import RQ2

    calls = []
    monkeypatch.setattr(Helper, "run_pipeline", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.setattr(RQ2, "_refresh_report", lambda case_dir: calls.append(("report", case_dir)))
    code = RQ2.main(["-o", str(case), "-m", "OriginalModel.pth", "-reps", "2", "-modes", "HUDD,BL2",
                     "--epochs", "1", "--retrain-batch-size", "16", "--no-progress", "--seed", "5"])
    assert code == 0
    (args, kwargs), report_call = calls
    assert args[:2] == (str(case), "OriginalModel.pth") and kwargs == {"until": "assign"}
    assert args[2].seed == 5 and args[2].reps == 2 and report_call[0] == "report"
    table = pd.read_csv(case / "RQ2.csv")
    assert list(table["mode"]) == ["HUDD", "BL2"] and list(table["reps"]) == [2, 2]
    hudd = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    bl2 = pd.read_csv(case / "T" / "retrain_BL2.csv")
    assert list(hudd["seed"]) == list(bl2["seed"]) == [rm.rep_seed(5, 1), rm.rep_seed(5, 2)]
    assert table.loc[0, "accuracy_mean"] == pytest.approx(100 * hudd["test_accuracy"].mean())
    assert table.loc[1, "a12_HUDD_vs"] == pytest.approx(rm.a12(hudd["test_accuracy"], bl2["test_accuracy"]))
    assert (case / "RQ2_boxplot.png").is_file() and (case / "RQ2.xlsx").is_file()


def test_rq2_command_rejects_unknown_modes(capsys):
    import RQ2

    with pytest.raises(SystemExit):
        RQ2.main(["-o", "x", "-modes", "HUDD,BL3"])
    assert "BL3" in capsys.readouterr().err


def test_an_interrupted_rq2_resumes_at_the_first_unfinished_repetition(tmp_path, capsys):
    case = prepared_case(tmp_path / "case")
    model = case / "DNNModels" / "OriginalModel.pth"
    options = dict(epochs=1, batch_size=16, progress=False, seed=9)
    rm.run_rq2(case, model, ["HUDD"], reps=2, **options)
    first = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    kept = case / "DNNModels" / first.loc[0, "model"]
    kept_mtime = kept.stat().st_mtime_ns
    (case / "DNNModels" / first.loc[1, "model"]).unlink()      # as if killed while saving repetition 2
    capsys.readouterr()

    _, again = rm.run_rq2(case, model, ["HUDD"], reps=2, **options)
    out = capsys.readouterr().out
    assert "HUDD repetition 1/2 finished in an earlier run" in out and "repetition 2/2 finished" not in out
    assert kept.stat().st_mtime_ns == kept_mtime
    assert again["test_accuracy"].tolist() == first["test_accuracy"].tolist()
    assert (case / "DNNModels" / first.loc[1, "model"]).is_file()

    rm.run_rq2(case, model, ["HUDD"], reps=2, **{**options, "epochs": 2})     # other inputs: nothing is kept
    assert "finished in an earlier run" not in capsys.readouterr().out


def test_rq2_for_keypoints_reports_the_mean_error_and_the_share_within_the_threshold(tmp_path):
    results = results_frame().assign(mean_error=[2.0, 2.5, 3.0, 4.0, 4.5, 5.0, 2.1, 2.2, 2.3])
    table = rm.write_rq2(tmp_path, results).set_index("mode")
    assert table.loc["HUDD", "mean_error_mean"] == pytest.approx(2.5)
    assert (table.loc["BL1", "mean_error_min"], table.loc["BL1", "mean_error_max"]) == pytest.approx((4.0, 5.0))
    assert table.loc["HUDD", "accuracy_mean"] == pytest.approx(92.0)      # the share within the threshold, in %
    with Image.open(tmp_path / "RQ2_boxplot.png") as img:
        assert img.width >= 1200                                          # a third panel: the mean error


def test_rq2_with_parallel_jobs_gives_the_serial_results(tmp_path):
    import torch

    serial_case = prepared_case(tmp_path / "serial")
    parallel_case = prepared_case(tmp_path / "parallel")
    options = dict(epochs=1, batch_size=16, progress=False, seed=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial, _ = rm.run_rq2(serial_case, serial_case / "DNNModels" / "OriginalModel.pth", ["HUDD", "BL2"],
                               reps=2, **options)
    finally:
        torch.set_num_threads(previous)
    parallel, results = rm.run_rq2(parallel_case, parallel_case / "DNNModels" / "OriginalModel.pth",
                                   ["HUDD", "BL2"], reps=2, jobs=2, threads=1, **options)
    assert list(results["mode"]) == ["HUDD", "HUDD", "BL2", "BL2"]
    pd.testing.assert_frame_equal(serial, parallel)
    for mode in ("HUDD", "BL2"):
        one, other = (pd.read_csv(c / "T" / f"retrain_{mode}.csv") for c in (serial_case, parallel_case))
        assert one["test_accuracy"].tolist() == other["test_accuracy"].tolist()
        assert all((parallel_case / "DNNModels" / name).is_file() for name in other["model"])


def test_rq2_jobs_must_be_a_positive_integer(tmp_path):
    with pytest.raises(HUDDError, match="--jobs 0"):
        rm.run_rq2(tmp_path, tmp_path / "m.pth", ["HUDD"], reps=1, jobs=0)


def test_a_failing_mode_stops_the_other_jobs(tmp_path):
    case = prepared_case(tmp_path / "case", flat_improvement=True, original_epochs=0)   # BL1 needs class folders
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    labels = ["circle", "square", "square", "stripe", "stripe", "circle", "circle"]
    unsafe[["image", "cluster"]].assign(label=labels).to_csv(case / "T" / "UnsafeSet" / "labels.csv", index=False)
    with pytest.raises(HUDDError, match="BL1 simulates labelling"):
        rm.run_rq2(case, case / "DNNModels" / "OriginalModel.pth", ["HUDD", "BL1"], reps=1, jobs=2, threads=1,
                   epochs=2000, batch_size=16, progress=False)
    assert not list((case / "DNNModels").glob("HUDD_*")), "HUDD should have been stopped, not trained to the end"
