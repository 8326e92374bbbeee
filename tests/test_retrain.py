"""Retraining: bootstrap balancing, BL1/BL2 at an equal labelling budget, seeds per repetition, the outputs."""
import numpy as np
import pandas as pd
import pytest
import torch

import retrainModule as rm
from common.errors import HUDDError
from conftest import make_tiny_case


# --- balancing -------------------------------------------------------------------------------------

def unsafe_frame(spec):
    """spec: {cluster: [distance of rank 1, rank 2, ...]} -> an unsafe.csv-like frame, images c<cluster>_<rank>."""
    rows = [(f"c{c}_{r}", c, d, r) for c, dists in spec.items() for r, d in enumerate(dists, start=1)]
    return pd.DataFrame(rows, columns=["image", "cluster", "distance", "rank"])


def test_balancing_keeps_the_closest_c_images_and_equal_sizes():
    unsafe = unsafe_frame({1: [.1, .2, .3, .4, .5, .6], 2: [.1, .2, .3], 5: [.7]})
    sizes = {1: 3, 2: 2, 5: 4, 9: 1}
    balanced = rm.balance_unsafe_set(unsafe, sizes, seed=0)
    assert balanced.groupby("cluster").size().to_dict() == {1: 4, 2: 4, 5: 4}   # max |c| of the clusters = 4
    originals = balanced[~balanced["duplicate"]]
    assert originals.groupby("cluster")["image"].apply(list).to_dict() == {
        1: ["c1_1", "c1_2", "c1_3"], 2: ["c2_1", "c2_2"], 5: ["c5_1"]}
    for cluster, group in balanced.groupby("cluster"):
        assert set(group["image"]) <= set(originals.loc[originals["cluster"] == cluster, "image"])
    assert list(balanced.loc[balanced["cluster"] == 5, "image"]) == ["c5_1"] * 4


def test_balancing_is_seeded_and_prefers_close_images():
    unsafe = unsafe_frame({1: [1.0, 9.0], 2: [0.5] * 200})
    sizes = {1: 2, 2: 200}
    first = rm.balance_unsafe_set(unsafe, sizes, seed=3)
    assert first.equals(rm.balance_unsafe_set(unsafe, sizes, seed=3))
    assert not first.equals(rm.balance_unsafe_set(unsafe, sizes, seed=4))
    dups = first[(first["cluster"] == 1) & first["duplicate"]]["image"]
    assert len(dups) == 198
    assert (dups == "c1_1").sum() > 150          # weight 1 - 1/10 = 0.9 against 0.1 for the far image


def test_retrain_factor_retrains_on_more_of_each_clusters_unsafe_images():
    unsafe = unsafe_frame({1: [.1, .2, .3, .4, .5, .6], 2: [.1, .2, .3], 5: [.7]})
    sizes = {1: 3, 2: 2, 5: 4}
    balanced = rm.balance_unsafe_set(unsafe, sizes, seed=0, factor=2)
    assert balanced.groupby("cluster").size().to_dict() == {1: 8, 2: 8, 5: 8}   # the largest quota, 2 x 4
    originals = balanced[~balanced["duplicate"]].groupby("cluster")["image"].apply(list).to_dict()
    assert originals == {1: [f"c1_{r}" for r in range(1, 7)], 2: ["c2_1", "c2_2", "c2_3"], 5: ["c5_1"]}
    assert rm.balance_unsafe_set(unsafe, sizes, seed=0, factor=1).equals(rm.balance_unsafe_set(unsafe, sizes, seed=0))
    assert [rm.retrain_quota(n, 1.5) for n in (1, 2, 3)] == [2, 3, 5]
    hudd, labelled = rm.retraining_images("HUDD", unsafe, sizes, IMPROVEMENT, WRONG, seed=1, retrain_factor=2)
    assert len(set(hudd)) == 10 and labelled == 10           # every labelled image is retrained on
    for mode in ("BL1", "BL2"):                               # the baselines are padded to the same size
        sample, _ = rm.retraining_images(mode, unsafe, sizes, IMPROVEMENT, WRONG, seed=1, retrain_factor=2)
        assert len(sample) == len(hudd) == 24


@pytest.mark.parametrize("factor", [0, -1, float("nan")])
def test_retrain_factor_must_be_positive(factor):
    with pytest.raises(HUDDError, match="--retrain-factor .*must be positive"):
        rm.balance_unsafe_set(unsafe_frame({1: [.1]}), {1: 1}, seed=0, factor=factor)


def test_balancing_refuses_clusters_it_does_not_know():
    with pytest.raises(HUDDError, match="clusters.csv"):
        rm.balance_unsafe_set(unsafe_frame({3: [.1]}), {1: 2}, seed=0)


# --- baselines -------------------------------------------------------------------------------------

IMPROVEMENT = [f"ImprovementSet/a/{i:03d}.png" for i in range(100)]
WRONG = [i >= 80 for i in range(100)]             # only the last 20 files are misclassified


def test_equal_labelling_budget_by_default_and_the_original_factor():
    unsafe = unsafe_frame({1: [.1, .2, .3, .4], 2: [.1, .2, .3, .4, .5, .6]})     # 10 images to label
    sizes = {1: 2, 2: 3}
    hudd, n_hudd = rm.retraining_images("HUDD", unsafe, sizes, IMPROVEMENT, WRONG, seed=1)
    assert n_hudd == 10 and len(hudd) == 6                  # 2 clusters x max |c| = 3
    for mode in ("BL1", "BL2"):
        _, n = rm.retraining_images(mode, unsafe, sizes, IMPROVEMENT, WRONG, seed=1)
        assert n == n_hudd
        _, n = rm.retraining_images(mode, unsafe, sizes, IMPROVEMENT, WRONG, seed=1, budget_factor=0.3)
        assert n == 3
    bl2, _ = rm.retraining_images("BL2", unsafe, sizes, IMPROVEMENT, WRONG, seed=1, pad_baselines=False)
    assert len(bl2) == len(set(bl2)) == 10
    assert rm.retraining_images("BL2", unsafe, sizes, IMPROVEMENT, WRONG, seed=1)[0] == bl2   # more than HUDD's 6
    small, _ = rm.retraining_images("BL2", unsafe, sizes, IMPROVEMENT, WRONG, seed=1, budget_factor=0.3,
                                    pad_baselines=False)
    padded, _ = rm.retraining_images("BL2", unsafe, sizes, IMPROVEMENT, WRONG, seed=1, budget_factor=0.3)
    assert len(small) == 3 and len(padded) == len(hudd) and padded[:3] == small and set(padded) == set(small)


def test_bl1_keeps_only_misclassified_images_drawn_from_the_whole_set():
    picked = set()
    for seed in range(10):
        sample = rm.draw_bl1(IMPROVEMENT, WRONG, 30, seed)
        assert all(WRONG[IMPROVEMENT.index(i)] for i in sample)
        assert sample == [i for i in rm.draw_bl2(IMPROVEMENT, 30, seed) if WRONG[IMPROVEMENT.index(i)]]
        picked |= set(sample)
    assert len(picked) > 10         # the wrong images are the last files, beyond the first 30 the original read


def test_each_repetition_draws_its_own_sample():
    seeds = [rm.rep_seed(0, rep) for rep in (1, 2, 3)]
    assert len(set(seeds)) == 3 and seeds == [rm.rep_seed(0, rep) for rep in (1, 2, 3)]
    samples = [tuple(rm.draw_bl2(IMPROVEMENT, 10, s)) for s in seeds]
    assert len(set(samples)) == 3


def test_budget_factor_must_be_positive():
    with pytest.raises(HUDDError, match="budget-factor"):
        rm.baseline_budget(10, 0)
    assert rm.baseline_budget(10, 0.3) == 3 and rm.baseline_budget(7, 1.0) == 7


# --- retraining on a tiny case ---------------------------------------------------------------------

ORIGINAL_EPOCHS, ORIGINAL_LR = 10, 1e-2      # enough for a tiny net that is not a constant predictor
ORIGINAL_INIT_SEED = 3            # with it, retraining flips a few test predictions (checked below)


def prepared_case(root, flat_improvement=False, original_epochs=ORIGINAL_EPOCHS):
    """A tiny case up to the assign step: result CSVs, a hand-made clustering and a hand-made unsafe.csv."""
    import functools

    import models
    import testModule
    from common.data import ImageSet, ImageSpec, list_case

    case = make_tiny_case(root, n_per_class=(12, 10, 6), flat_improvement=flat_improvement, train_epochs=0)
    path = case / "DNNModels" / "OriginalModel.pth"
    _, meta = models.load_model(path)
    torch.manual_seed(ORIGINAL_INIT_SEED)          # the weights must not depend on what ran before in the process
    model = models.build_model(meta["arch"], meta["arch_args"])
    splits = list_case(case)
    train = splits["TrainingSet"]
    dataset = ImageSet(case / "DataSets", train.images, ImageSpec.from_meta(meta),
                       [meta["classes"].index(c) for c in train.labels])
    if original_epochs:
        rm.train_classifier(model, dataset, epochs=original_epochs, device="cpu", batch_size=8, select="last",
                            optimizer=functools.partial(rm.adam, lr=ORIGINAL_LR), progress=False)
    models.save_model(path, model, meta["arch"], meta["classes"], meta["input_size"], meta["mean"], meta["std"],
                      arch_args=meta["arch_args"])
    testModule.write_results(case, splits, model, meta, meta["classes"], "cpu", batch_size=32)
    wrong = pd.read_csv(case / "testResult.csv").query("result == 'Wrong'")["image"].tolist()
    assert len(wrong) >= 4, "the tiny model should make a few test errors"
    analysis = case / "T" / "ClusterAnalysis"
    (analysis / "Layer7").mkdir(parents=True)
    clusters = [1, 2] * (len(wrong) // 2) + [3] * (len(wrong) % 2)
    pd.DataFrame({"image": wrong, "cluster": clusters}).to_csv(analysis / "Layer7" / "clusters.csv", index=False)
    pd.DataFrame({"layer": ["Layer5", "Layer7"], "selected": [False, True]}).to_csv(analysis / "summary.csv",
                                                                                   index=False)
    improvement = splits["ImprovementSet"].images
    unsafe = pd.DataFrame({"image": improvement[:7], "cluster": [1, 1, 1, 1, 2, 2, 2],
                           "distance": [.1, .2, .3, .4, .1, .2, .3], "rank": [1, 2, 3, 4, 1, 2, 3]})
    (case / "T" / "UnsafeSet").mkdir(parents=True)
    unsafe.to_csv(case / "T" / "UnsafeSet" / "unsafe.csv", index=False)
    return case


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return prepared_case(tmp_path_factory.mktemp("retrain") / "case")


def test_retrain_writes_models_and_the_per_repetition_table(case):
    import models

    # the original's constant rate: in 2 epochs a cosine schedule moves this tiny net too little to flip a prediction
    hudd = rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "HUDD", reps=2, epochs=2, batch_size=16,
                      schedule="constant", progress=False)
    bl2 = rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "BL2", reps=2, epochs=2, batch_size=16,
                     schedule="constant", progress=False)
    table = pd.read_csv(case / "T" / "retrain_HUDD.csv", keep_default_na=False)
    assert list(table.columns) == rm.RETRAIN_COLUMNS and len(table) == 2
    assert list(table["seed"]) == list(bl2["seed"]) and table["seed"].nunique() == 2
    assert list(bl2["n_labelled"]) == [7, 7] and list(hudd["n_labelled"]) == [7, 7]
    sizes = pd.read_csv(case / "T" / "ClusterAnalysis" / "Layer7" / "clusters.csv")["cluster"].value_counts()
    assert list(hudd["n_train_added"]) == [2 * max(sizes[1], sizes[2])] * 2
    original, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    tested = pd.read_csv(case / "testResult.csv")
    before = (tested["result"] == "Correct").mean()
    changed = pd.concat([hudd, bl2])[["improved", "worsened"]].to_numpy().sum()
    assert changed > 0, "retraining changed no test prediction, so the checks below would prove nothing"
    for row in table.itertuples():
        path = case / "DNNModels" / row.model
        assert row.model == f"HUDD_{row.rep}_{100 * row.test_accuracy:.2f}.pth"
        net, new_meta = models.load_model(path)
        assert new_meta["classes"] == meta["classes"] and new_meta["input_size"] == meta["input_size"]
        assert new_meta["extra"]["retrained"]["seed"] == row.seed
        assert any(not np.array_equal(a, b) for a, b in zip(net.state_dict().values(),
                                                            original.state_dict().values()))
        assert row.gain == pytest.approx(100 * (row.test_accuracy - before))
        n = len(tested)
        assert row.test_accuracy == pytest.approx((n * before + row.improved - row.worsened) / n)
        counts = dict(part.split(":") for part in row.improved_per_cluster.split(";"))
        assert set(counts) == {str(c) for c in sizes.index} and sum(map(int, counts.values())) <= row.improved


def test_retrain_with_a_held_out_split_and_a_rerun_replaces_the_model_file(case):
    out = rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "BL1", reps=1, epochs=2, batch_size=16,
                     select="val-accuracy", progress=False)
    again = rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "BL1", reps=1, epochs=2, batch_size=16,
                       select="val-accuracy", progress=False)
    assert out.drop(columns="model").equals(again.drop(columns="model"))      # seeded: the same run twice
    assert sorted(p.name for p in (case / "DNNModels").glob("BL1_1_*.pth")) == [again["model"][0]]
    assert 1 <= out["best_epoch"][0] <= 2


def test_flat_improvement_set_needs_the_engineers_labels(tmp_path):
    case = prepared_case(tmp_path / "flat", flat_improvement=True, original_epochs=0)
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    labels = unsafe[["image", "cluster"]].assign(label=["circle", "square", "", "", "stripe", "", ""])
    labels.to_csv(case / "T" / "UnsafeSet" / "labels.csv", index=False)
    model = case / "DNNModels" / "OriginalModel.pth"
    with pytest.raises(HUDDError, match="4 of 7 images still unlabelled"):
        rm.retrain(case, model, "HUDD", epochs=1, progress=False)
    with pytest.raises(HUDDError, match="class folders"):
        rm.retrain(case, model, "BL2", epochs=1, progress=False)
    labels["label"] = ["circle", "square", "square", "stripe", "stripe", "circle", "circle"]
    labels.to_csv(case / "T" / "UnsafeSet" / "labels.csv", index=False)
    out = rm.retrain(case, model, "HUDD", epochs=1, batch_size=16, progress=False)
    assert out["n_labelled"][0] == 7


def test_missing_unsafe_set_says_which_step_to_run(tmp_path):
    case = make_tiny_case(tmp_path / "bare", train_epochs=0)
    with pytest.raises(HUDDError, match="-step assign"):
        rm.retrain(case, case / "DNNModels" / "OriginalModel.pth", "HUDD", epochs=1, progress=False)


def test_retrain_factor_2_retrains_on_the_whole_labelled_unsafe_set(tmp_path):
    case = prepared_case(tmp_path / "case")
    model = case / "DNNModels" / "OriginalModel.pth"
    faithful = rm.retrain(case, model, "HUDD", reps=1, epochs=1, batch_size=16, progress=False).iloc[0]
    whole = rm.retrain(case, model, "HUDD", reps=1, epochs=1, batch_size=16, progress=False, retrain_factor=2).iloc[0]
    sizes = pd.read_csv(case / "T" / "ClusterAnalysis" / "Layer7" / "clusters.csv")["cluster"].value_counts()
    assert faithful["n_distinct_added"] == min(sizes[1], 4) + min(sizes[2], 3)
    assert whole["n_distinct_added"] == 7 and whole["n_labelled"] == faithful["n_labelled"] == 7
    assert whole["n_train_added"] == 2 * 2 * max(sizes[1], sizes[2])
    assert whole["inputs"] != faithful["inputs"]        # a resumed RQ2 never mixes the two


def test_measuring_each_epoch_does_not_change_the_training(tmp_path):
    """--monitor-test and the held-out accuracy are diagnoses: the weights must be those of a run without them."""
    import models
    from common.data import ImageSet, ImageSpec, list_split
    from conftest import TINY_CLASSES, TINY_SIZE

    case = make_tiny_case(tmp_path / "case", train_epochs=0)
    split = list_split(case / "DataSets", "TrainingSet")
    spec = ImageSpec(3, TINY_SIZE, TINY_SIZE, (0.5,) * 3, (0.5,) * 3)
    dataset = ImageSet(case / "DataSets", split.images, spec, [TINY_CLASSES.index(c) for c in split.labels])

    def trained(**measure):
        model, _ = models.load_model(case / "DNNModels" / "OriginalModel.pth")
        rm.train_classifier(model, dataset, epochs=3, device="cpu", batch_size=8, seed=5, progress=False,
                            select="last", **measure)
        return model.state_dict()

    probe, _ = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    plain = trained()
    monitored = trained(monitor=lambda: {"test_accuracy": rm.accuracy(probe, dataset, "cpu")}, val_set=dataset)
    for name in plain:
        assert torch.equal(plain[name], monitored[name]), name
