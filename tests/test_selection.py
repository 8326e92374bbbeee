"""Selection quality (how rich in errors the unsafe set is) and the retraining options of issue 12."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import assignModule
import retrainModule as rm
import testModule
from common.tables import read_table
from test_retrain import prepared_case


# --- precision on a hand-made case -----------------------------------------------------------------

def test_precision_per_cluster_and_overall_against_the_base_rate():
    wrong_of = {"a": True, "b": False, "c": True, "d": False, "e": False,
                "f": True, "g": False, "h": False, "i": False, "j": False}            # base rate 3/10
    unsafe = pd.DataFrame({"image": ["a", "b", "c", "d", "e", "x"], "cluster": [1, 1, 1, 2, 2, 2],
                           "distance": [.1, .2, .3, .1, .2, .3], "rank": [1, 2, 3, 1, 2, 3]})   # x: no label
    quality = assignModule.selection_quality(unsafe, wrong_of, {1: 4, 2: 2, 3: 1}).set_index("cluster")
    assert list(quality.columns) == assignModule.PRECISION_COLUMNS[1:]
    assert quality.loc[1, ["selected", "labelled", "errors"]].tolist() == [3, 3, 2]
    assert quality.loc[1, "precision"] == pytest.approx(2 / 3) and quality.loc[2, "precision"] == 0.0
    assert quality.loc[2, ["selected", "labelled", "members"]].tolist() == [3, 2, 2]
    assert quality.loc["all", "precision"] == pytest.approx(2 / 5)
    assert quality.loc["all", "members"] == 7 and quality.loc["all", "selected"] == 6
    assert quality["base_error_rate"].tolist() == pytest.approx([0.3] * 3)
    assert quality.loc["all", "lift"] == pytest.approx((2 / 5) / 0.3)


def test_no_labels_no_precision():
    unsafe = pd.DataFrame({"image": ["a"], "cluster": [1], "distance": [.1], "rank": [1]})
    assert assignModule.selection_quality(unsafe, {}).empty


# --- precision and the retraining options on a tiny case --------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared_case(tmp_path_factory.mktemp("selection") / "case")


def test_retrain_rows_hold_each_modes_labelling_precision(case):
    model = case / "DNNModels" / "OriginalModel.pth"
    wrong_of = testModule.errors_of(case / "improveResult.csv")
    base = np.mean(list(wrong_of.values()))
    unsafe = read_table(case / "T" / "UnsafeSet" / "unsafe.csv")
    hudd = rm.retrain(case, model, "HUDD", reps=1, epochs=1, batch_size=16, progress=False)
    expected = np.mean([wrong_of[i] for i in unsafe["image"]])
    assert hudd["precision"][0] == pytest.approx(expected) and hudd["base_error_rate"][0] == pytest.approx(base)
    assert hudd["labelled_errors"][0] == sum(wrong_of[i] for i in unsafe["image"])
    for mode in ("BL1", "BL2"):
        row = rm.retrain(case, model, mode, reps=1, epochs=1, batch_size=16, progress=False).iloc[0]
        drawn = rm.draw_bl2(sorted(wrong_of), rm.baseline_budget(len(unsafe)), row["seed"])
        assert row["precision"] == pytest.approx(np.mean([wrong_of[i] for i in drawn])), mode
        assert row["n_labelled"] == len(drawn)
    table = rm.rq2_table(pd.concat([hudd, row.to_frame().T.infer_objects()], ignore_index=True))
    assert table.loc[table["mode"] == "HUDD", "precision_mean"].iloc[0] == pytest.approx(expected)


def test_history_records_every_epoch_and_the_kept_one_matches_the_saved_model(case):
    model = case / "DNNModels" / "OriginalModel.pth"
    row = rm.retrain(case, model, "BL2", reps=1, epochs=3, batch_size=16, select="val-accuracy", monitor_test=True,
                     progress=False).iloc[0]
    history = read_table(case / "T" / "retrain_BL2_history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"train_accuracy", "val_accuracy", "test_accuracy", "kept"} <= set(history.columns)
    best = 1 + int(np.argmax(history["val_accuracy"].to_numpy()))          # the first of equal maxima
    assert row["best_epoch"] == best and list(history["kept"]) == [e == best for e in (1, 2, 3)]
    assert history.loc[history["kept"], "test_accuracy"].iloc[0] == pytest.approx(row["test_accuracy"])
    assert (case / "T" / "retrain_BL2_history.png").is_file()


def test_select_last_keeps_the_last_epoch_and_the_schedule_changes_the_weights(case):
    import models

    model = case / "DNNModels" / "OriginalModel.pth"
    weights = {}
    for schedule in ("constant", "cosine"):
        row = rm.retrain(case, model, "HUDD", reps=1, epochs=3, batch_size=16, select="last", schedule=schedule,
                         progress=False).iloc[0]
        assert row["best_epoch"] == 3
        weights[schedule] = (row["inputs"], models.load_model(case / "DNNModels" / row["model"])[0].state_dict())
    assert weights["constant"][0] != weights["cosine"][0]          # a resumed RQ2 never mixes the two
    assert any(not torch.equal(a, b) for a, b in zip(weights["constant"][1].values(), weights["cosine"][1].values()))


def test_cosine_schedule_falls_to_zero_over_the_epochs():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = rm.sgd([param], lr=1e-3)
    sched = rm._scheduler("cosine", 4)(opt)
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert rates == pytest.approx(expected) and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert rm._scheduler("constant", 4) is None


def test_unknown_schedule_is_refused(case):
    from common.errors import HUDDError

    with pytest.raises(HUDDError, match="--schedule 'step': use one of constant, cosine"):
        rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "HUDD", epochs=1, schedule="step", progress=False)


def test_rq1_names_each_clusters_parameter_with_its_mean_against_the_test_set(tmp_path):
    """A planted case: cluster 1 is the low-light errors, cluster 2 the extreme yaws."""
    import clusterModule

    rng = np.random.default_rng(0)
    n = 200
    params = pd.DataFrame({"image": [f"TestSet/a/{i}.png" for i in range(n)],
                           "light": rng.uniform(0.6, 1.3, n), "yaw": rng.normal(0, 5, n)})
    params.loc[:9, "light"] = np.linspace(0.1, 0.3, 10)
    params.loc[10:19, "yaw"] = np.linspace(30, 40, 10)
    clusters = pd.DataFrame({"image": params["image"][:20], "cluster": [1] * 10 + [2] * 10})
    table = clusterModule.rq1(params, clusters)
    per = clusterModule.rq1_clusters(table, {"light": params["light"].mean(), "yaw": params["yaw"].mean()})
    per = per.set_index("cluster")
    assert per.loc[1, "best_parameter"] == "light" and per.loc[2, "best_parameter"] == "yaw"
    assert per.loc[1, "best_mean"] == pytest.approx(0.2) and per.loc[2, "best_mean"] == pytest.approx(35.0)
    assert per.loc[1, "test_set_mean"] == pytest.approx(params["light"].mean())
    assert per.loc[2, "test_set_mean"] == pytest.approx(params["yaw"].mean())
