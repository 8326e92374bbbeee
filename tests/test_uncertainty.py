"""Uncertainty-based selection (GINI, MARGIN, ENTROPY, MC dropout), HUDD-U and coverage of a selection."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import assignModule
import retrainModule
import testModule
from common.data import ImageSet, ImageSpec
from common.errors import HUDDError
from common.files import write_csv
from selection import coverage as cov
from selection import hudd_u
from selection import uncertainty as unc


def one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --- scores against hand-computed examples ----------------------------------------------------------

# Row 0: logits (0, 0)        -> p = (1/2, 1/2)
# Row 1: logits (ln 3, 0)     -> p = (3/4, 1/4)
# Row 2: logits ln(1, 2, 5)   -> p = (1/8, 2/8, 5/8)
TWO = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
THREE = np.log([[1.0, 2.0, 5.0]])


def test_gini_by_hand():
    # 1 - (1/4 + 1/4) = 0.5;  1 - (9/16 + 1/16) = 0.375;  1 - (1/64 + 4/64 + 25/64) = 34/64 = 0.53125
    assert unc.gini(TWO) == pytest.approx([0.5, 0.375])
    assert unc.gini(THREE) == pytest.approx([0.53125])


def test_margin_by_hand():
    # 1/2 - 1/2 = 0;  3/4 - 1/4 = 0.5;  5/8 - 2/8 = 0.375
    assert unc.margin(TWO) == pytest.approx([0.0, 0.5])
    assert unc.margin(THREE) == pytest.approx([0.375])
    assert unc.uncertainty(TWO, "MARGIN") == pytest.approx([1.0, 0.5])


def test_entropy_by_hand():
    # ln 2 = 0.693147;  -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.215762 + 0.346574 = 0.562335
    # -(1/8 ln 1/8 + 1/4 ln 1/4 + 5/8 ln 5/8) = 0.259930 + 0.346574 + 0.293752 = 0.900256
    assert unc.entropy(TWO) == pytest.approx([0.693147, 0.562335], abs=1e-6)
    assert unc.entropy(THREE) == pytest.approx([0.900256], abs=1e-6)
    assert unc.uncertainty(THREE, "ENTROPY") == pytest.approx(unc.entropy(THREE))
    assert unc.uncertainty(THREE, "GINI") == pytest.approx(unc.gini(THREE))


def test_softmax_is_stable_for_huge_logits():
    shifted = THREE + 1000.0
    assert unc.gini(shifted) == pytest.approx([0.53125])
    extreme = np.array([[1000.0, 0.0, -1000.0]])     # p = (1, e^-1000, 0): no overflow, no NaN
    assert unc.softmax(extreme)[0] == pytest.approx([1.0, 0.0, 0.0])
    assert unc.gini(extreme) == pytest.approx([0.0]) and unc.entropy(extreme) == pytest.approx([0.0])
    assert unc.margin(extreme) == pytest.approx([1.0])


def test_bad_logits_and_methods_are_one_line():
    with pytest.raises(HUDDError) as e:
        unc.gini(np.zeros((3, 1)))
    assert "two classes" in one_line(e)
    with pytest.raises(HUDDError) as e:
        unc.entropy(np.array([[0.0, np.nan]]))
    assert "row 0" in one_line(e)
    with pytest.raises(HUDDError) as e:
        unc.uncertainty(TWO, "DEEPGINI")
    assert "GINI, MARGIN, ENTROPY" in one_line(e)


# --- ranking, ties, budget ------------------------------------------------------------------------------

def test_rank_highest_first_ties_in_image_order_nan_never():
    scores = [0.2, 0.5, 0.5, 0.1, np.nan, 0.5]
    assert unc.rank(scores, 3).tolist() == [1, 2, 5]
    assert unc.rank(scores, 4).tolist() == [1, 2, 5, 0]
    assert unc.rank(scores).tolist() == [1, 2, 5, 0, 3]
    assert unc.rank(scores, 100).tolist() == [1, 2, 5, 0, 3]
    assert unc.rank(scores, 0).tolist() == []


def test_budget_is_respected_for_every_method():
    logits = np.random.default_rng(0).normal(size=(50, 4))
    for method in unc.CLASS_METHODS:
        picked = unc.rank(unc.uncertainty(logits, method), 17)
        assert len(picked) == 17 == len(set(picked.tolist()))
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(HUDDError) as e:
            unc.rank([0.1, 0.2], bad)
        assert "budget" in one_line(e)


def test_margin_ranks_the_lowest_gap_first():
    logits = np.vstack([TWO[1], TWO[0], [math.log(2.0), 0.0]])     # margins 0.5, 0, 1/3
    assert unc.rank(unc.uncertainty(logits, "MARGIN"), 2).tolist() == [1, 2]
    equal = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0]])          # the same score three times
    assert unc.rank(unc.uncertainty(equal, "GINI"), 2).tolist() == [0, 1]


def test_align_scores_follows_the_keys_and_names_the_missing():
    assert unc.align_scores(["c", "a"], ["a", "b", "c"], [1.0, 2.0, 3.0]).tolist() == [3.0, 1.0]
    with pytest.raises(HUDDError) as e:
        unc.align_scores(["a", "z"], ["a"], [1.0], source="CASE/improveResult.csv")
    assert "CASE/improveResult.csv" in one_line(e) and "z" in str(e.value)


# --- scores from improveResult.csv ----------------------------------------------------------------------

def test_scores_come_from_the_results_logit_columns(tmp_path):
    classes = ["0", "closed", "open"]            # a class named like a number stays a column name
    logits = np.array([[0.0, 0.0, 0.0], [math.log(1.0), math.log(2.0), math.log(5.0)], [3.0, -1.0, 0.5]])
    frame = testModule.results_frame(["I/a.png", "I/b.png", "I/c.png"], [None] * 3, classes, logits)
    path = tmp_path / "improveResult.csv"
    write_csv(path, frame)
    images, read = unc.read_class_scores(path)
    assert images == ["I/a.png", "I/b.png", "I/c.png"]
    assert read == pytest.approx(logits)
    assert unc.read_class_scores(path, classes=classes)[1] == pytest.approx(logits)
    images, gini = unc.results_scores(path, "GINI")
    assert gini[0] == pytest.approx(2 / 3) and gini[1] == pytest.approx(0.53125)
    with pytest.raises(HUDDError) as e:
        unc.read_class_scores(path, classes=["0", "half"])
    assert "half" in one_line(e) and str(path) in str(e.value)


def test_keypoint_results_are_refused_in_one_line(tmp_path):
    names = ["left", "right"]
    predicted = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    frame = testModule.keypoint_frame(["I/a.png"], [np.array([[1.0, 2.0], [9.0, 4.0]])], predicted, names,
                                      {"left": [0], "right": [1]})
    path = tmp_path / "improveResult.csv"
    write_csv(path, frame)
    with pytest.raises(HUDDError) as e:
        unc.results_scores(path, "ENTROPY")
    text = one_line(e)
    assert str(path) in text and "keypoint" in text and unc.KEYPOINT_METHOD in text


def test_results_without_class_scores_or_with_text_are_refused(tmp_path):
    path = tmp_path / "improveResult.csv"
    write_csv(path, pd.DataFrame({"image": ["a"], "result": ["Correct"], "expected": ["x"], "predicted": ["x"]}))
    with pytest.raises(HUDDError) as e:
        unc.read_class_scores(path)
    assert "no class scores" in one_line(e)
    write_csv(path, pd.DataFrame({"image": ["a", "b"], "result": ["Correct"] * 2, "expected": ["x"] * 2,
                                  "predicted": ["x"] * 2, "x": [1.0, 2.0], "y": ["0.5", "oops"]}))
    with pytest.raises(HUDDError) as e:
        unc.read_class_scores(path)
    assert "row 3 (b)" in one_line(e)


# --- HUDD-U -------------------------------------------------------------------------------------------------

def random_case(seed, m=40, k=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), rng.integers(2, 6, size=k))      # cluster sizes 2..5
    distances = rng.gamma(2.0, 1.0, size=(m, k))
    distances[:, 0] *= 0.4                                           # cluster 0 attracts most images: overflow
    distances[rng.integers(0, m, 3), 1] = distances[0, 1]           # some equal distances
    return [f"img{i:03d}" for i in range(m)], np.arange(k), distances, labels, rng.normal(size=m)


def test_round_order_keeps_each_images_clusters_and_orders_rounds_by_uncertainty():
    for seed in range(6):
        keys, ids, distances, labels, scores = random_case(seed)
        scores[5] = scores[9]                                          # a tie: image 5 before image 9
        stand_in = hudd_u.round_order(distances, scores)
        nearest_first = np.argsort(distances, axis=1, kind="stable")
        assert np.array_equal(np.argsort(stand_in, axis=1, kind="stable"), nearest_first)
        for r in range(len(ids)):
            at_round = np.take_along_axis(stand_in, nearest_first[:, r:r + 1], axis=1)[:, 0]
            assert np.argsort(at_round, kind="stable").tolist() == unc.rank(scores).tolist()


@pytest.mark.parametrize("m", [12, 40, 200])   # fewer images than HUDD's quotas, about as many, many more
def test_hudd_u_keeps_hudds_counts_per_cluster(m):
    for seed in range(8):
        keys, ids, distances, labels, scores = random_case(seed, m=m)
        hudd = assignModule.select_closest(keys, ids, distances, labels)
        ours = hudd_u.select_uncertain_first(keys, ids, distances, scores, labels)
        assert hudd_u.cluster_counts(ours, ids) == hudd_u.cluster_counts(hudd, ids)
        assert list(ours.columns) == assignModule.UNSAFE_COLUMNS and ours["image"].is_unique
        sizes = {int(c): int((labels == c).sum()) for c in ids}
        balanced = [retrainModule.balance_unsafe_set(frame, sizes, seed=1)["cluster"].value_counts().to_dict()
                    for frame in (hudd, ours)]
        assert balanced[0] == balanced[1]


def test_hudd_u_takes_the_most_uncertain_candidates_by_hand():
    # Clusters 0 and 1 of two members each (factor 1: quota 2 each). Images a-d are nearest to cluster 0,
    # e-f to cluster 1. HUDD takes a, b (closest); HUDD-U takes d, c (most uncertain), then e, f either way.
    keys = list("abcdef")
    distances = np.array([[1.0, 9], [2, 9], [3, 9], [4, 9], [9, 1], [9, 2]])
    scores = np.array([0.1, 0.2, 0.7, 0.9, 0.5, 0.5])      # e and f tie: the earlier image first
    labels = np.array([0, 0, 1, 1])
    hudd = assignModule.select_closest(keys, [0, 1], distances, labels, factor=1)
    ours = hudd_u.select_uncertain_first(keys, [0, 1], distances, scores, labels, factor=1)
    assert hudd["image"].tolist() == ["a", "b", "e", "f"]
    assert ours["image"].tolist() == ["d", "c", "e", "f"]
    assert ours["rank"].tolist() == [1, 2, 1, 2] and ours["distance"].tolist() == [4.0, 3.0, 1.0, 2.0]
    balanced = retrainModule.balance_unsafe_set(ours, {0: 2, 1: 2}, seed=0)
    assert balanced[balanced["cluster"] == 0]["image"].tolist() == ["d", "c"]


def test_hudd_u_refuses_scores_that_do_not_fit():
    keys, ids, distances, labels, scores = random_case(0, m=10)
    with pytest.raises(HUDDError) as e:
        hudd_u.select_uncertain_first(keys, ids, distances, scores[:-1], labels)
    assert "9 uncertainty scores for 10" in one_line(e)
    scores[3] = np.nan
    with pytest.raises(HUDDError) as e:
        hudd_u.select_uncertain_first(keys, ids, distances, scores, labels)
    assert "not numbers" in one_line(e)


# --- MC dropout for keypoint DNNs -------------------------------------------------------------------------

def keypoint_images(folder, n=5, size=16, corrupt=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")
        names.append(f"ImprovementSet/{i}.png")
    if corrupt:
        (folder / "bad.png").write_bytes(b"not an image")
        names.insert(2, "ImprovementSet/bad.png")
    return ImageSet(folder.parent, names, ImageSpec(1, size, size))


def dropout_net(p=0.5, keypoints=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(p), nn.Conv2d(8, keypoints, 3, padding=1))


def test_keypoint_spread_by_hand():
    # image 0: keypoint 0 at (0,0) then (2,0): mean (1,0), both 1 px away -> 1; keypoint 1 still -> 0; mean 0.5
    # image 1: keypoint 0 at (0,0) then (3,4): mean (1.5,2), both 2.5 px away -> 2.5; keypoint 1 still; mean 1.25
    samples = np.array([[[[0, 0], [1, 1]], [[0, 0], [5, 5]]],
                        [[[2, 0], [1, 1]], [[3, 4], [5, 5]]]], dtype=float)
    assert unc.keypoint_spread(samples) == pytest.approx([0.5, 1.25])


def test_mc_dropout_refuses_a_model_without_dropout(tmp_path):
    import models

    dataset = keypoint_images(tmp_path / "ImprovementSet", n=2, corrupt=False)
    for model in (models.KPNet(num_keypoints=3, input_size=16, width=0.05), dropout_net(p=0.0)):
        with pytest.raises(HUDDError) as e:
            unc.mc_dropout_spread(model, dataset, "cpu", model_name="DNNModels/kp.pth", progress=False)
        assert "DNNModels/kp.pth" in one_line(e) and "no dropout" in str(e.value)


def test_mc_dropout_is_seeded_deterministic_and_leaves_the_model_as_it_was(tmp_path):
    dataset = keypoint_images(tmp_path / "ImprovementSet")
    model = dropout_net()
    model.eval()
    before = [p.clone() for p in model.parameters()]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, skipped = unc.mc_dropout_spread(model, dataset, "cpu", passes=4, seed=7, batch_size=2, progress=False)
    assert torch.equal(torch.rand(3), expected_next)            # the caller's RNG is untouched
    second, _ = unc.mc_dropout_spread(model, dataset, "cpu", passes=4, seed=7, batch_size=2, progress=False)
    other, _ = unc.mc_dropout_spread(model, dataset, "cpu", passes=4, seed=8, batch_size=2, progress=False)
    assert list(skipped) == [2] and np.isnan(first[2])
    readable = np.delete(np.arange(len(dataset)), 2)
    assert np.array_equal(first, second, equal_nan=True)
    assert (first[readable] > 0).all() and not np.allclose(first[readable], other[readable])
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(HUDDError) as e:
        unc.mc_dropout_spread(model, dataset, "cpu", passes=1, progress=False)
    assert "passes" in one_line(e)


# --- coverage on a hand-made example ----------------------------------------------------------------------

# Eight improvement images, clusters 3, 5, 7. Nearest clusters: 3, 3, 5, 3, 7, 3, 5, 3 (image 7 ties
# between 3 and 7 and goes to the lower column). Errors: 1, 0, 1, 1, 0, unlabelled, 0, 1.
DISTANCES = np.array([[1, 5, 5], [2, 5, 5], [5, 1, 5], [1, 9, 9], [9, 9, 1], [1, 2, 3], [3, 2, 9], [4, 8, 4.0]])
WRONG = np.array([1, 0, 1, 1, 0, np.nan, 0, 1])


def test_nearest_clusters_and_assignment_table():
    assert cov.nearest_clusters(DISTANCES, [3, 5, 7]).tolist() == [3, 3, 5, 3, 7, 3, 5, 3]
    table = pd.DataFrame({"image": ["b", "d"], "cluster": [5, 7]})
    assert cov.assigned_clusters(["a", "b", "c", "d"], table).tolist() == [-1, 5, -1, 7]
    with pytest.raises(HUDDError) as e:
        cov.nearest_clusters(DISTANCES, [3, 5])
    assert "2 clusters" in one_line(e)


def test_coverage_by_hand():
    reached = cov.nearest_clusters(DISTANCES, [3, 5, 7])
    # images 0, 1, 3, 5, 6 reach 3, 3, 3, 3, 5: two of three clusters, cluster 3 takes 4 of 5;
    # image 5 is unlabelled, so 4 labelled with errors at 0 and 3: precision 2/4
    assert cov.coverage([0, 1, 3, 5, 6], reached, [3, 5, 7], WRONG) == {
        "selected": 5, "labelled": 4, "errors": 2, "precision": 0.5, "clusters_reached": 2, "clusters": 3,
        "top_cluster": 3, "top_cluster_share": 0.8}
    tie = cov.coverage([4, 2], reached, [3, 5, 7], WRONG)     # one image each in 7 and 5: the lower id is top
    assert (tie["top_cluster"], tie["top_cluster_share"], tie["precision"]) == (5, 0.5, 0.5)
    unlabelled = cov.coverage([0], reached, [3, 5, 7])
    assert unlabelled["labelled"] == 0 and math.isnan(unlabelled["precision"])
    outside = cov.coverage([0, 1], np.array([-1, -1, 3]), [3], None)
    assert outside["clusters_reached"] == 0 and outside["top_cluster"] == -1 and math.isnan(outside["top_cluster_share"])


def test_coverage_refuses_bad_selections():
    reached = cov.nearest_clusters(DISTANCES, [3, 5, 7])
    for selected, words in (([0, 0], "twice"), ([8], "outside"), ([0.5], "indices")):
        with pytest.raises(HUDDError) as e:
            cov.coverage(selected, reached, [3, 5, 7], WRONG)
        assert words in one_line(e)
    with pytest.raises(HUDDError) as e:
        cov.coverage([0], reached, [3, 5], WRONG)
    assert "[7]" in one_line(e)


PARAMS = pd.DataFrame({"image": ["TrainingSet/x.png"] + [f"ImprovementSet/{i}.png" for i in range(5)],
                       "glasses": [0, 1, 0, 1, 0, 0], "low_light": [1, 0, 1, 0, 0, 1],
                       "light": [0.2, 0.9, 0.1, 0.8, 1.0, 0.2], "always_off": [0] * 6})
IMPROVEMENT = [f"ImprovementSet/{i}.png" for i in range(5)]


def test_condition_shares_by_hand():
    assert cov.condition_columns(PARAMS) == ["glasses", "low_light"]
    # selection = images 0 and 2: both have glasses (2/2 = 1.0 against 2/5 = 0.4: lift 2.5), neither low light
    shares = cov.condition_shares(PARAMS, IMPROVEMENT, [0, 2]).set_index("condition")
    assert shares.loc["glasses"].tolist() == pytest.approx([2, 1.0, 2, 0.4, 2.5])
    assert shares.loc["low_light"].tolist() == pytest.approx([0, 0.0, 2, 0.4, 0.0])
    only = cov.condition_shares(PARAMS, IMPROVEMENT, [1], conditions=["low_light"])
    assert only["condition"].tolist() == ["low_light"] and only["selected_share"].tolist() == [1.0]


def test_condition_shares_bad_input_is_one_line():
    with pytest.raises(HUDDError) as e:
        cov.condition_shares(PARAMS, IMPROVEMENT, [0], conditions=["light"], source="CASE/DataSets/params.csv")
    assert "CASE/DataSets/params.csv" in one_line(e) and "'light'" in str(e.value)
    with pytest.raises(HUDDError) as e:
        cov.condition_shares(PARAMS, IMPROVEMENT + ["ImprovementSet/9.png"], [0])
    assert "ImprovementSet/9.png" in one_line(e)
    with pytest.raises(HUDDError) as e:
        cov.condition_shares(PARAMS, IMPROVEMENT, [0], conditions=["fog"])
    assert "fog" in one_line(e)
