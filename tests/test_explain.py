"""explainModule: a rule per root-cause cluster over the simulator parameters, descriptions without them."""
import json
import re

import numpy as np
import pandas as pd
import pytest

import explainModule as em
from common.errors import HUDDError
from common.tables import read_table

WEATHER = ["sun", "rain", "fog", "snow"]


def planted_case(n=2000, seed=0, glasses=False):
    """Test images with a, b uniform in [0, 1], an irrelevant parameter and the weather; the DNN errs exactly
    when a > 0.7 and b < 0.3 (cluster 1; with `glasses`, when glasses = 1 and b < 0.3) or when the weather is
    fog or snow and b > 0.8 (cluster 2)."""
    rng = np.random.default_rng(seed)
    images = [f"TestSet/{'left' if i % 2 else 'right'}/{i:05d}.png" for i in range(n)]
    a, b, noise = rng.uniform(size=(3, n))
    weather = rng.choice(WEATHER, n)
    worn = rng.integers(0, 2, n)
    first = ((worn == 1) if glasses else (a > 0.7)) & (b < 0.3)
    second = np.isin(weather, ["fog", "snow"]) & (b > 0.8)
    params = pd.DataFrame({"image": images, "a": a, "b": b, "noise": noise, "weather": weather})
    if glasses:
        params["glasses"] = worn
    training = pd.DataFrame({"image": ["TrainingSet/left/x.png"], "a": [0.9], "b": [0.1], "noise": [0.5],
                             "weather": ["sun"]})
    expected = np.where(np.arange(n) % 2, "left", "right")
    predicted = np.where(first | second, np.where(np.arange(n) % 2, "right", "left"), expected)
    results = pd.DataFrame({"image": images, "result": np.where(first | second, "Wrong", "Correct"),
                            "expected": expected, "predicted": predicted})
    wrong = first | second
    clusters = pd.DataFrame({"image": np.asarray(images)[wrong], "cluster": np.where(first, 1, 2)[wrong]})
    return pd.concat([params, training], ignore_index=True), clusters, results


@pytest.fixture(scope="module")
def planted():
    params, clusters, results = planted_case()
    return params, clusters, results, em.cluster_rules(params, clusters, results)


def conditions_of(rules, cluster):
    row = rules.set_index("cluster").loc[cluster]
    return {c["parameter"]: c for c in json.loads(row["conditions"])}, row


def test_planted_rule_recovers_the_thresholds_with_high_precision_and_recall(planted):
    _, _, _, rules = planted
    conditions, row = conditions_of(rules, 1)
    assert set(conditions) == {"a", "b"}
    assert conditions["a"]["high"] is None and abs(conditions["a"]["low"] - 0.7) < 0.05
    assert conditions["b"]["low"] is None and abs(conditions["b"]["high"] - 0.3) < 0.05
    assert row["rule"] == f"a > {conditions['a']['low']:g} and b <= {conditions['b']['high']:g}"
    assert row["precision"] > 0.9 and row["recall"] > 0.9
    assert row["size"] == (planted[1]["cluster"] == 1).sum()


def test_categorical_cluster_gets_a_set_of_categories(planted):
    _, _, _, rules = planted
    conditions, row = conditions_of(rules, 2)
    assert conditions["weather"] == {"parameter": "weather", "values": ["fog", "snow"]}
    assert abs(conditions["b"]["low"] - 0.8) < 0.05
    assert "weather in {fog, snow}" in row["rule"]
    assert row["precision"] > 0.9 and row["recall"] > 0.9


def test_figures_are_those_of_the_printed_rule(planted):
    params, clusters, results, rules = planted
    tested = params[params["image"].isin(results["image"])].set_index("image")
    wrong = results.set_index("image")["result"].reindex(tested.index) == "Wrong"
    for row in rules.itertuples():
        matched = em.rule_matches(tested, row.conditions)
        members = tested.index.isin(clusters.loc[clusters["cluster"] == row.cluster, "image"])
        assert row.matching == matched.sum()
        assert row.coverage == pytest.approx(matched.sum() / len(tested))
        assert row.recall == pytest.approx((matched & members).sum() / members.sum())
        assert row.precision == pytest.approx((matched & (members | wrong)).sum() / matched.sum())


def test_a_rule_has_at_most_max_conditions():
    params, clusters, results = planted_case(600)
    rules = em.cluster_rules(params, clusters, results, max_conditions=1)
    assert all(len(json.loads(c)) == 1 for c in rules["conditions"])


def test_a_0_1_parameter_is_thresholded_at_one_half():
    params, clusters, results = planted_case(600, glasses=True)
    conditions, row = conditions_of(em.cluster_rules(params, clusters, results), 1)
    assert conditions["glasses"] == {"parameter": "glasses", "low": 0.5, "high": None}
    assert "glasses > 0.5" in row["rule"] and set(conditions) == {"b", "glasses"}


def test_a_whole_number_threshold_is_printed_as_a_whole_number():
    rng = np.random.default_rng(3)
    images = [f"TestSet/c/{i}.png" for i in range(400)]
    year = rng.integers(1980, 2011, 400)
    wrong = year > 1995
    params = pd.DataFrame({"image": images, "year": year})
    results = pd.DataFrame({"image": images, "result": np.where(wrong, "Wrong", "Correct")})
    clusters = pd.DataFrame({"image": np.asarray(images)[wrong], "cluster": 1})
    rules = em.cluster_rules(params, clusters, results)
    assert rules["rule"].iloc[0] == "year > 1995" and rules["recall"].iloc[0] == 1.0


def test_a_cluster_of_one_image_gets_a_description_and_no_rule(planted):
    params, clusters, results, _ = planted
    single = results.loc[results["result"] == "Correct", "image"].iloc[0]
    results = results.copy()
    results.loc[results["image"] == single, ["result", "predicted"]] = ["Wrong", "nowhere"]
    clusters = pd.concat([clusters, pd.DataFrame({"image": [single], "cluster": [3]})], ignore_index=True)
    rules = em.cluster_rules(params, clusters, results)
    _, row = conditions_of(rules, 3)
    assert row["rule"] == "" and row["conditions"] == "[]" and np.isnan(row["precision"])
    assert "cluster 3 (1 image): no rule" in em.format_rules(rules)
    described = em.describe_clusters(clusters, results, medoids={3: single}, neighbours={3: ["TrainingSet/a/1.png",
                                                                                             "TrainingSet/a/2.png"]})
    one = described.set_index("cluster").loc[3]
    expected = results.set_index("image").loc[single, "expected"]
    assert (one["size"], one["confusion"], one["medoid"]) == (1, f"{expected} -> nowhere 100%", single)
    assert one["nearest_training"] == "TrainingSet/a/1.png;TrainingSet/a/2.png"
    assert described.set_index("cluster").loc[1, "medoid"] == ""


def test_confusion_lists_the_most_frequent_pairs_first():
    clusters = pd.DataFrame({"image": [f"TestSet/Shirt/{i}.png" for i in range(8)], "cluster": 1})
    predicted = ["T-shirt/top"] * 5 + ["Pullover"] * 2 + ["Coat"]
    results = pd.DataFrame({"image": clusters["image"], "result": "Wrong", "expected": "Shirt",
                            "predicted": predicted})
    described = em.describe_clusters(clusters, results)
    assert described["confusion"].iloc[0] == "Shirt -> T-shirt/top 62%, Shirt -> Pullover 25%, Shirt -> Coat 12%"
    assert list(described.columns) == em.DESCRIPTION_COLUMNS
    keypoints = pd.DataFrame({"image": clusters["image"], "result": "Wrong", "avg_error": 5.0,
                              "worst_KP": ["nose"] * 6 + ["left_eye"] * 2})
    assert em.describe_clusters(clusters, keypoints)["confusion"].iloc[0] == \
        "worst keypoint nose 75%, worst keypoint left_eye 25%"


def test_bad_inputs_say_what_to_do(planted):
    params, clusters, results, _ = planted
    with pytest.raises(HUDDError, match="params.csv needs column 'image'.*relative to DataSets/"):
        em.cluster_rules(params.rename(columns={"image": "file"}), clusters, results)
    renamed = params.assign(image="DataSets/" + params["image"])
    with pytest.raises(HUDDError, match="has a row in params.csv.*path relative to DataSets/"):
        em.cluster_rules(renamed, clusters, results)
    elsewhere = clusters.assign(image="TestSet/other/" + clusters["image"].str.rsplit("/", n=1).str[-1] + "x")
    with pytest.raises(HUDDError, match="none of the .* clustered error images .*rerun the clustering step"):
        em.cluster_rules(params, elsewhere, results)
    with pytest.raises(HUDDError, match="no parameter columns.*add one column per simulator parameter"):
        em.cluster_rules(params[["image"]], clusters, results)
    with pytest.raises(HUDDError, match="clusters table needs column 'cluster'; rerun the clustering step"):
        em.cluster_rules(params, clusters[["image"]], results)
    with pytest.raises(HUDDError, match="medoid .* is not one of its images"):
        em.describe_clusters(clusters, results, medoids={1: "TestSet/left/none.png"})


def test_rules_csv_has_its_columns_and_round_trips_through_read_table(planted, tmp_path):
    params, clusters, results, rules = planted
    clusters = pd.concat([clusters, pd.DataFrame({"image": [results["image"].iloc[0]], "cluster": [3]})])
    rules = em.cluster_rules(params, clusters, results)
    descriptions = em.describe_clusters(clusters, results)
    paths = em.write_rules(tmp_path / "T", "Layer5", rules, descriptions)
    assert paths == [tmp_path / "T" / "ClusterAnalysis" / "Layer5" / name for name in ("rules.csv",
                                                                                       "descriptions.csv")]
    back = read_table(paths[0], text=em.TEXT_COLUMNS)
    assert list(back.columns) == em.RULE_COLUMNS
    pd.testing.assert_frame_equal(back, rules, check_dtype=False)
    pd.testing.assert_frame_equal(em.read_descriptions(tmp_path / "T", "Layer5"), descriptions, check_dtype=False)
    assert [json.loads(c) for c in em.read_rules(tmp_path / "T", "Layer5")["conditions"]] == \
        [json.loads(c) for c in rules["conditions"]]


def test_format_rules_gives_one_line_per_cluster(planted):
    _, _, _, rules = planted
    lines = em.format_rules(rules).splitlines()
    row = rules.iloc[0]
    assert len(lines) == len(rules)
    assert lines[0] == (f"cluster 1 ({row['size']} images): {row['rule']} (precision {row['precision']:.2f}, "
                        f"recall {row['recall']:.2f}, {100 * row['coverage']:.1f}% of the test set)")


def test_nearest_training_images_are_the_k_closest_heatmaps_over_all_batches():
    from explainModule import nearest_training

    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 8)).astype(np.float32)
    keys = [f"TrainingSet/a/{i:02d}.png" for i in range(50)]
    medoids = {1: train[7] + 0.01, 4: rng.normal(size=8)}
    batches = [(keys[i:i + 16], train[i:i + 16]) for i in range(0, 50, 16)]
    found = nearest_training(medoids, iter(batches), k=3)
    for cluster, centre in medoids.items():
        order = np.argsort(np.linalg.norm(train - centre, axis=1), kind="stable")[:3]
        assert found[cluster] == [keys[i] for i in order]
    assert found[1][0] == keys[7]


def measured_case(seed, n=2000, error_rate=0.1, n_clusters=8):
    """Test images with three measured, continuous properties (skewed, normal, uniform) and errors at random,
    in random clusters: no parameter describes any cluster."""
    rng = np.random.default_rng(seed)
    images = [f"TestSet/c/{i:05d}.png" for i in range(n)]
    params = pd.DataFrame({"image": images, "ink": rng.gamma(2, 0.05, n), "slant": rng.normal(0, 0.3, n),
                           "height": rng.uniform(10, 20, n)})
    wrong = rng.random(n) < error_rate
    results = pd.DataFrame({"image": images, "result": np.where(wrong, "Wrong", "Correct")})
    clusters = pd.DataFrame({"image": np.asarray(images)[wrong], "cluster": rng.integers(1, n_clusters + 1,
                                                                                          wrong.sum())})
    return params, clusters, results


def test_a_cluster_planted_on_one_wide_interval_is_found():
    params, clusters, results = measured_case(0)
    slant = params.set_index("image")["slant"]
    planted = slant.index[(slant > 0.2) & (slant <= 0.5)][:120]
    results = results.assign(result=np.where(results["image"].isin(planted), "Wrong", "Correct"))
    clusters = pd.DataFrame({"image": planted, "cluster": 1})
    rules = em.cluster_rules(params, clusters, results)
    conditions, row = conditions_of(rules, 1)
    assert bool(row["found"]) and set(conditions) == {"slant"}
    assert abs(conditions["slant"]["low"] - 0.2) < 0.03 and abs(conditions["slant"]["high"] - 0.5) < 0.03
    assert row["recall"] > 0.9 and row["rejected"] == ""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_clusters_on_continuous_parameters_get_no_simple_rule_and_no_sliver(seed):
    params, clusters, results = measured_case(seed)
    rules = em.cluster_rules(params, clusters, results)
    assert not rules["found"].any(), rules.loc[rules["found"], "rule"].tolist()
    assert (rules["rule"] == "").all() and rules["precision"].isna().all()
    assert (rules["rejected"] != "").all() and rules["rejected_reason"].str.len().gt(0).all()
    lines = em.format_rules(rules).splitlines()
    for line, row in zip(lines, rules.itertuples()):
        assert line.startswith(f"cluster {row.cluster} ({row.size} images): no simple rule (best: {row.rejected}, "
                               f"recall {row.rejected_recall:.2f}; ")


def test_the_floors_refuse_slivers_small_support_and_low_recall():
    """The rules of the digits the floors were made for: one ink value, one or two of the cluster's images."""
    params, clusters, results = measured_case(3, n_clusters=1)
    ink = params.set_index("image")["ink"].sort_values()
    sliver = ink.index[1000:1003]                     # three neighbouring ink values, a sliver of the range
    results = results.assign(result=np.where(results["image"].isin(sliver), "Wrong", results["result"]))
    clusters = pd.concat([clusters, pd.DataFrame({"image": sliver, "cluster": 2})], ignore_index=True)
    loose = em.cluster_rules(params, clusters, results, min_support=0, min_support_share=0, min_width_share=0,
                             min_recall=0, min_lift=0)
    _, row = conditions_of(loose, 2)
    assert row["found"] and row["matching"] < 5
    _, row = conditions_of(em.cluster_rules(params, clusters, results), 2)
    assert not row["found"] and row["rule"] == "" and row["rejected"]
    support = em.cluster_rules(params, clusters, results, min_support=2000, min_width_share=0, min_recall=0,
                               min_lift=0)
    _, row = conditions_of(support, 2)
    assert not row["found"] and "under the floor 2000" in row["rejected_reason"]
    width = em.cluster_rules(params, clusters, results, min_support=0, min_support_share=0, min_width_share=10,
                             min_recall=0, min_lift=0)
    _, row = conditions_of(width, 2)
    assert not row["found"] and re.search(r"spans \S+, under 1000% of its spread", row["rejected_reason"])
    with pytest.raises(HUDDError, match="min_recall must be a number of 0 or more"):
        em.cluster_rules(params, clusters, results, min_recall=-1)


def test_rules_csv_fields(planted, tmp_path):
    params, clusters, results, _ = planted
    noise = results.loc[results["result"] == "Correct", "image"].iloc[:40]
    results = results.assign(result=np.where(results["image"].isin(noise), "Wrong", results["result"]))
    clusters = pd.concat([clusters, pd.DataFrame({"image": noise, "cluster": 3})], ignore_index=True)
    rules = em.cluster_rules(params, clusters, results)
    em.write_rules(tmp_path / "T", "Layer5", rules, None)
    raw = pd.read_csv(em.rules_path(tmp_path / "T", "Layer5"), dtype=str, keep_default_na=False)
    assert list(raw.columns) == ["cluster", "size", "found", "rule", "conditions", "precision", "recall", "coverage",
                                 "matching", "rejected", "rejected_recall", "rejected_reason"]
    found, missing = raw.set_index("cluster").loc["1"], raw.set_index("cluster").loc["3"]
    assert found["found"] == "True" and found["rule"].startswith("a > ") and found["rejected"] == ""
    assert json.loads(found["conditions"])[0]["parameter"] in {"a", "b"} and int(found["matching"]) > 0
    assert missing["found"] == "False" and missing["rule"] == "" and missing["conditions"] == "[]"
    assert missing[["precision", "recall", "coverage", "matching"]].tolist() == ["", "", "", ""]
    assert missing["rejected"] and 0 <= float(missing["rejected_recall"]) <= 1 and missing["rejected_reason"]
    back = em.read_rules(tmp_path / "T", "Layer5")
    assert back["found"].tolist() == rules["found"].tolist()


def test_a_rules_csv_from_before_the_floors_reads_as_found_where_it_has_a_rule(tmp_path):
    folder = tmp_path / "T" / "ClusterAnalysis" / "Layer5"
    folder.mkdir(parents=True)
    pd.DataFrame({"cluster": [1, 2], "size": [9, 1], "rule": ["a > 0.5", ""], "conditions": ["[]", "[]"],
                  "precision": [0.9, np.nan], "recall": [0.8, np.nan], "coverage": [0.1, np.nan],
                  "matching": [30, np.nan]}).to_csv(folder / "rules.csv", index=False)
    back = em.read_rules(tmp_path / "T", "Layer5")
    assert list(back.columns) == em.RULE_COLUMNS and back["found"].tolist() == [True, False]
    assert em.format_rules(back).splitlines()[1] == "cluster 2 (1 image): no rule for a single image; see its description"
