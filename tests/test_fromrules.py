"""An improvement set rendered inside the clusters' rules (python -m casestudies gaze --from-rules CASE)."""
import json

import numpy as np
import pandas as pd
import pytest

import casestudies
import casestudies.fromrules
import explainModule
from casestudies import eyes
from casestudies.__main__ import main
from common.data import list_split
from common.errors import HUDDError
from common.tables import read_table

RULES = {  # cluster: conditions, as explainModule writes them
    1: [{"parameter": "head_yaw", "low": 20.0, "high": None}, {"parameter": "light_intensity", "low": None,
                                                                 "high": 0.3}],
    2: [{"parameter": "glasses", "low": 0.5, "high": None}],
}


@pytest.fixture(scope="module")
def ruled_case(tmp_path_factory):
    """A small gaze case whose selected layer has two clusters with rules and one without."""
    case = casestudies.build("gaze", tmp_path_factory.mktemp("rules") / "case", seed=1, scale="small",
                             progress=False, threads=1)
    layer = case / "T" / "ClusterAnalysis" / "Layer9"
    layer.mkdir(parents=True)
    pd.DataFrame({"layer": ["Layer9"], "selected": [True]}).to_csv(layer.parent / "summary.csv", index=False)
    rows = [{"cluster": c, "size": 5, "rule": explainModule.rule_text(conds), "conditions": json.dumps(conds),
             "precision": 0.9, "recall": 0.8, "coverage": 0.01, "matching": 30} for c, conds in RULES.items()]
    rows.append({"cluster": 3, "size": 1, "rule": "", "conditions": "[]", "precision": np.nan, "recall": np.nan,
                 "coverage": np.nan, "matching": np.nan})
    pd.DataFrame(rows).to_csv(layer / "rules.csv", index=False)
    return case


def test_generated_scenes_satisfy_their_rule_and_are_labelled_by_the_simulator(ruled_case, tmp_path):
    out = tmp_path / "new"
    assert main(["gaze", "--from-rules", str(ruled_case), "-o", str(out), "--per-cluster", "12", "--quiet"]) == 0
    used = read_table(out / "rules_used.csv")
    params = read_table(out / "params.csv")
    assert used.groupby("cluster").size().to_dict() == {1: 12, 2: 12}        # no rule, no images
    assert list(params["image"]) == list(used["image"])
    for cluster, conds in RULES.items():
        mine = params[used["cluster"] == cluster]
        assert explainModule.rule_matches(mine, conds).all(), cluster
    split = list_split(out, "ImprovementSet")
    assert sorted(split.images) == sorted(params["image"])
    label_of = dict(zip(split.images, split.labels))
    expected = eyes.gaze_labels(params["gaze_h"], params["gaze_v"])
    assert [label_of[i] for i in params["image"]] == list(expected)
    # the rest follows the usual Step-3 distribution: a parameter outside every rule still varies
    assert params["iris_size"].std() > 0.01


def test_a_rule_no_scene_satisfies_stops_after_a_bounded_number_of_draws():
    conds = [{"parameter": "head_yaw", "low": 50.0, "high": None}]          # extreme yaws end at 45 degrees
    scenes, draws = casestudies.fromrules.scenes_in_rule(conds, 5, "gaze", 0, max_draws=400_000)
    assert draws == 400_000 and len(scenes) == 0


def test_refuses_a_non_empty_output_and_a_case_without_rules(ruled_case, tmp_path):
    from casestudies import fromrules

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HUDDError, match="not empty; choose another -o"):
        fromrules.generate(ruled_case, tmp_path / "full")
    with pytest.raises(HUDDError, match="not a built-in case study"):
        fromrules.generate(tmp_path / "full", tmp_path / "other")


def test_refuses_rules_over_measured_properties_in_one_line():
    """A rule on a measured property (or a prop_* column beside params.csv) cannot be fed to the simulator."""
    from casestudies import fromrules

    ok = pd.DataFrame({"cluster": [1], "conditions": [json.dumps(RULES[1])]})
    fromrules.check_simulated(ok, "rules.csv")
    for column in ("brightness", "prop_sharpness"):
        measured = pd.DataFrame({"cluster": [1, 4], "conditions": [
            json.dumps(RULES[1]), json.dumps([{"parameter": column, "low": 0.2, "high": None}])]})
        with pytest.raises(HUDDError) as error:
            fromrules.check_simulated(measured, "T/ClusterAnalysis/Layer9/rules.csv")
        message = str(error.value)
        assert "\n" not in message and f"cluster 4's rule is on {column}" in message
        assert "rules.csv" in message and "--perturb-improvement" in message
