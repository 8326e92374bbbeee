"""The selection modes beside HUDD and the baselines: HUDD-U, GINI, MARGIN, ENTROPY, MC-DROPOUT, NONE, ALL,
at one labelling budget, what each selection covers, RQ2's reference rows, and the refusals."""
import numpy as np
import pandas as pd
import pytest

import assignModule
import retrainModule as rm
from common.errors import HUDDError
from common.tables import read_table
from test_retrain import prepared_case

UNSAFE_COUNTS = {1: 4, 2: 3}          # prepared_case's hand-made unsafe.csv: images 0-3 in cluster 1, 4-6 in 2
FAST = dict(reps=1, epochs=1, batch_size=16, progress=False)


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def hand_distances(m):
    """(M, 2) distances to clusters 1 and 2 from which HUDD's greedy assignment picks exactly prepared_case's
    unsafe set: images 0-3 closest to cluster 1, 4-6 to cluster 2, every other image nearer to cluster 1 but
    farther than image 3."""
    distances = np.empty((m, 2))
    for i in range(m):
        if i < 4:
            distances[i] = (0.1 * (i + 1), 5.0)
        elif i < 7:
            distances[i] = (5.0, 0.1 * (i - 3))
        else:
            distances[i] = (1.0 + 0.01 * i, 2.0 + 0.01 * i)
    return distances


def with_distances_and_conditions(case):
    """Add T/UnsafeSet/distances.npz and a params.csv with condition_even (every other improvement image)."""
    improvement = list(pd.read_csv(case / "improveResult.csv")["image"])
    assignModule.write_distances(case / "T" / "UnsafeSet" / assignModule.DISTANCES_FILE, improvement, [1, 2],
                                 hand_distances(len(improvement)))
    pd.DataFrame({"image": improvement, "light": np.linspace(0, 1, len(improvement)),
                  "condition_even": [1 - i % 2 for i in range(len(improvement))]}).to_csv(
        case / "DataSets" / "params.csv", index=False)
    return case, improvement


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return with_distances_and_conditions(prepared_case(tmp_path_factory.mktemp("modes") / "case"))


def gini_by_hand(case, improvement):
    frame = pd.read_csv(case / "improveResult.csv").set_index("image").loc[improvement]
    logits = frame[["circle", "square", "stripe"]].to_numpy(dtype=float)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return 1 - (p ** 2).sum(axis=1)


# --- what each mode labels and adds -----------------------------------------------------------------------

def test_budgets_are_equal_and_hudd_u_keeps_hudds_counts_per_cluster(case):
    case_dir, improvement = case
    model = case_dir / "DNNModels" / "OriginalModel.pth"
    labelled = {}
    for mode in ("HUDD", "BL1", "BL2", "HUDD-U", "GINI", "MARGIN", "ENTROPY"):
        read = rm.read_retraining_case(case_dir, model, mode)
        labelled[mode] = rm.mode_images(mode, read.candidates, seed=rm.rep_seed(0, 1)).labelled
    assert {mode: len(images) for mode, images in labelled.items()} == dict.fromkeys(labelled, 7)
    for mode in ("GINI", "MARGIN", "ENTROPY", "HUDD-U"):
        assert len(set(labelled[mode])) == 7, mode
    gini = gini_by_hand(case_dir, improvement)
    top = [improvement[i] for i in np.argsort(-gini, kind="stable")[:7]]
    assert labelled["GINI"] == top
    read = rm.read_retraining_case(case_dir, model, "HUDD-U")
    keys, ids, distances = read.candidates.distances
    chosen = rm.hudd_u_images(read.candidates, 7, seed=1, options=rm.RetrainOptions())
    nearest = {image: 1 if i < 4 or i >= 7 else 2 for i, image in enumerate(improvement)}
    per_cluster = pd.Series([nearest[i] for i in chosen.labelled]).value_counts().to_dict()
    assert per_cluster == UNSAFE_COUNTS
    candidates_1 = [i for i in range(len(improvement)) if i < 4 or i >= 7]     # every image nearest to cluster 1
    most_uncertain = sorted(candidates_1, key=lambda i: (-gini[i], i))[:4]
    assert {i for i in chosen.labelled if nearest[i] == 1} == {improvement[i] for i in most_uncertain}


def test_hudd_u_ranks_inside_each_cluster_most_uncertain_first(case):
    case_dir, improvement = case
    read = rm.read_retraining_case(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", "HUDD-U")
    keys, ids, distances = read.candidates.distances
    from selection.hudd_u import select_like_unsafe_set

    gini = gini_by_hand(case_dir, improvement)
    chosen = select_like_unsafe_set(read.candidates.unsafe, keys, ids, distances, gini)
    for cluster, group in chosen.groupby("cluster"):
        ordered = group.sort_values("rank")["image"].map(improvement.index).tolist()
        assert ordered == sorted(ordered, key=lambda i: (-gini[i], i)), cluster


def test_none_adds_nothing_and_all_adds_every_labelled_improvement_image(case):
    case_dir, improvement = case
    read = rm.read_retraining_case(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", "ALL")
    none = rm.mode_images("NONE", read.candidates, seed=3)
    assert none.labelled == [] and none.added == []
    every = rm.mode_images("ALL", read.candidates, seed=3)
    assert every.labelled == improvement and sorted(set(every.added)) == sorted(improvement)
    assert len(every.added) == len(improvement)          # more than HUDD's balanced set: no padding


# --- end to end on the tiny case ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["HUDD-U", "GINI", "MARGIN", "ENTROPY", "NONE", "ALL"])
def test_each_mode_retrains_end_to_end(case, mode):
    case_dir, improvement = case
    row = rm.retrain(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", mode, **FAST).iloc[0]
    table = read_table(case_dir / "T" / f"retrain_{mode}.csv")
    assert list(table.columns) == rm.RETRAIN_COLUMNS + ["share_even", "base_share_even"]
    assert (case_dir / "DNNModels" / row["model"]).is_file() and row["model"].startswith(f"{mode}_1_")
    expected = {"NONE": (0, 0), "ALL": (len(improvement), len(improvement))}.get(mode, (7, None))
    assert row["n_labelled"] == expected[0]
    if expected[1] is not None:
        assert row["n_distinct_added"] == expected[1]
    if mode == "NONE":
        assert row["n_train_added"] == 0 and row["clusters_reached"] == 0 and np.isnan(row["precision"])


def test_coverage_columns_by_hand(case):
    case_dir, improvement = case
    model = case_dir / "DNNModels" / "OriginalModel.pth"
    hudd = rm.retrain(case_dir, model, "HUDD", **FAST).iloc[0]
    # images 0-3 reach cluster 1 and 4-6 cluster 2: both clusters, the top one (1) takes 4 of 7;
    # condition_even: images 0, 2, 4, 6 of the 7, and 9 of the 18 improvement images
    assert (hudd["clusters_reached"], hudd["clusters"], hudd["top_cluster"]) == (2, 2, 1)
    assert hudd["top_cluster_share"] == pytest.approx(4 / 7)
    assert hudd["share_even"] == pytest.approx(4 / 7) and hudd["base_share_even"] == pytest.approx(9 / 18)
    every = rm.retrain(case_dir, model, "ALL", **FAST).iloc[0]
    # every image but 4-6 is nearest to cluster 1: 15 of 18
    assert (every["clusters_reached"], every["top_cluster"]) == (2, 1)
    assert every["top_cluster_share"] == pytest.approx(15 / 18) and every["share_even"] == pytest.approx(0.5)


def test_hudd_rows_without_the_assign_steps_distances_leave_the_cluster_columns_empty(tmp_path):
    case_dir = prepared_case(tmp_path / "case")
    row = rm.retrain(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", "BL2", **FAST).iloc[0]
    assert all(np.isnan(row[c]) for c in ("clusters_reached", "clusters", "top_cluster_share"))
    with pytest.raises(HUDDError) as e:
        rm.retrain(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", "HUDD-U", **FAST)
    assert "distances.npz: missing" in one_line(e) and "-step assign" in str(e.value)


# --- RQ2 with every mode ------------------------------------------------------------------------------------

def rq2_results():
    gains = {"HUDD": [2.0, 4.0], "HUDD-U": [3.0, 5.0], "GINI": [1.0, 1.0], "NONE": [0.5, 1.5], "ALL": [5.0, 7.0]}
    rows = [{"mode": m, "test_accuracy": 0.9 + g / 100, "gain": g, "clusters_reached": 2, "clusters": 3,
             "top_cluster_share": 0.5, "share_even": 0.25}
            for m, values in gains.items() for g in values]
    return pd.DataFrame(rows)


def test_rq2_table_has_the_reference_rows_gain_over_none_and_hudd_u_statistics():
    table = rm.rq2_table(rq2_results(), order=rm.MODES).set_index("mode")
    assert list(table.index) == ["HUDD", "HUDD-U", "GINI", "NONE", "ALL"]
    assert table.loc["NONE", "reference"] == "floor" and table.loc["ALL", "reference"] == "ceiling"
    assert table.loc["HUDD", "reference"] == ""
    # gain means: HUDD 3, HUDD-U 4, GINI 1, NONE 1, ALL 6: over NONE 2, 3, 0, 0, 5; share of the 5 points
    assert table["gain_over_none"].tolist() == pytest.approx([2, 3, 0, 0, 5])
    assert table["share_of_ceiling"].tolist() == pytest.approx([0.4, 0.6, 0, 0, 1])
    assert table.loc["GINI", "a12_HUDD_vs"] == 1.0 and table.loc["GINI", "a12_HUDD-U_vs"] == 1.0
    # HUDD-U (3, 5) against HUDD (2, 4): 3 > 2, 5 > 2, 5 > 4 of the four pairs
    assert table.loc["HUDD", "a12_HUDD-U_vs"] == 0.75 and np.isnan(table.loc["HUDD-U", "a12_HUDD-U_vs"])
    assert table.loc["HUDD", "clusters_reached_mean"] == 2 and table.loc["HUDD", "share_even_mean"] == 0.25


def test_rq2_command_with_every_mode_writes_the_reference_rows(case, monkeypatch):
    import Helper
    import RQ2

    case_dir, _ = case
    monkeypatch.setattr(Helper, "run_pipeline", lambda *a, **k: {})
    monkeypatch.setattr(RQ2, "_refresh_report", lambda case_dir: None)
    code = RQ2.main(["-o", str(case_dir), "-reps", "1", "-modes", "all", "--epochs", "1", "--retrain-batch-size",
                     "16", "--no-progress"])
    assert code == 0
    table = pd.read_csv(case_dir / "RQ2.csv", keep_default_na=False).set_index("mode")
    assert list(table.index) == ["HUDD", "BL1", "BL2", "HUDD-U", "GINI", "MARGIN", "ENTROPY", "NONE", "ALL"]
    assert table.loc["NONE", "reference"] == "floor" and table.loc["ALL", "reference"] == "ceiling"
    none = float(table.loc["NONE", "gain_mean"])
    assert [float(v) for v in table["gain_over_none"]] == pytest.approx([float(g) - none for g in table["gain_mean"]])
    for column in ("share_of_ceiling", "p_value_HUDD-U_vs", "a12_HUDD-U_vs", "clusters_reached_mean",
                   "top_cluster_share_mean", "share_even_mean"):
        assert column in table.columns


# --- refusals ----------------------------------------------------------------------------------------------

def keypoint_model(path):
    import models

    model = models.KPNet(num_keypoints=3, input_size=16, width=0.05)
    models.save_model(path, model, "kpnet", ["a", "b", "c"], (1, 16, 16), (0.5,), (0.5,),
                      arch_args=dict(num_keypoints=3, input_size=16, width=0.05), task="keypoints")
    return path


@pytest.mark.parametrize("mode", ["GINI", "MARGIN", "ENTROPY"])
def test_class_scores_on_a_keypoint_dnn_are_refused_in_one_line(tmp_path, mode):
    path = keypoint_model(tmp_path / "kp.pth")
    with pytest.raises(HUDDError) as e:
        rm.check_modes_for_model([mode], path)
    assert f"-mode {mode}" in one_line(e) and "keypoint DNN" in str(e.value) and "MC-DROPOUT" in str(e.value)


def test_mc_dropout_without_dropout_and_on_a_classifier_is_refused(tmp_path, case):
    path = keypoint_model(tmp_path / "kp.pth")
    for mode in ("MC-DROPOUT", "HUDD-U"):
        with pytest.raises(HUDDError) as e:
            rm.check_modes_for_model([mode], path)
        assert "kp.pth: has no dropout layer" in one_line(e) and "-mode HUDD, BL1 or BL2" in str(e.value)
    case_dir, _ = case
    with pytest.raises(HUDDError) as e:
        rm.check_modes_for_model(["MC-DROPOUT"], case_dir / "DNNModels" / "OriginalModel.pth")
    assert "is a classifier" in one_line(e) and "GINI" in str(e.value)
    with pytest.raises(HUDDError) as e:
        rm.check_modes_for_model(["HUDD-U"], case_dir / "DNNModels" / "OriginalModel.pth", hudd_u_score="MC-DROPOUT")
    assert "--hudd-u-score MC-DROPOUT" in one_line(e)


def test_the_command_refuses_gini_on_a_keypoint_model_before_any_step(tmp_path, capsys):
    import HUDD
    from conftest import make_tiny_case

    case_dir = make_tiny_case(tmp_path / "case", train_epochs=0)
    keypoint_model(case_dir / "DNNModels" / "kp.pth")
    assert HUDD.main(["-o", str(case_dir), "-m", "kp.pth", "-mode", "GINI", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "-mode GINI" in err and "MC-DROPOUT" in err and err.count("\n") == 1
    assert not (case_dir / "testResult.csv").exists()             # refused before the test step


def test_results_without_class_scores_are_refused_and_nothing_is_lost(tmp_path):
    case_dir, _ = with_distances_and_conditions(prepared_case(tmp_path / "case"))
    model = case_dir / "DNNModels" / "OriginalModel.pth"
    rm.retrain(case_dir, model, "HUDD", **FAST)
    kept = {p: p.read_bytes() for p in [case_dir / "T" / "retrain_HUDD.csv", *case_dir.glob("DNNModels/*.pth")]}
    results = pd.read_csv(case_dir / "improveResult.csv")
    results[["image", "result", "expected", "predicted"]].to_csv(case_dir / "improveResult.csv", index=False)
    for mode in ("GINI", "HUDD-U"):
        with pytest.raises(HUDDError) as e:
            rm.retrain(case_dir, model, mode, **FAST)
        assert "improveResult.csv: no score column for classes" in one_line(e) and "-step test" in str(e.value)
    assert {p: p.read_bytes() for p in kept} == kept
    assert not list((case_dir / "DNNModels").glob("GINI_*"))


def test_modes_that_label_improvement_images_need_class_folders(tmp_path):
    case_dir = prepared_case(tmp_path / "flat", flat_improvement=True, original_epochs=0)
    for mode in ("GINI", "ALL"):
        with pytest.raises(HUDDError) as e:
            rm.retrain(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", mode, **FAST)
        assert f"{mode} simulates labelling the improvement images it picks" in one_line(e)
        assert "class folders" in str(e.value)
    row = rm.retrain(case_dir, case_dir / "DNNModels" / "OriginalModel.pth", "NONE", **FAST).iloc[0]
    assert row["n_labelled"] == 0                     # NONE labels nothing, so a flat set is no obstacle
