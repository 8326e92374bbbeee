"""report.write_report: the page renders offline, every link and image resolves, and it shows what exists."""
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial.distance import pdist, squareform

import clusterModule as cm
import report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CLASSES = ("Up Left", "Down")          # a space in a class folder: links must be quoted


def build_case(root, n=24, seed=0):
    """A tiny case folder after the clustering step: images, testResult.csv, heatmaps, clusters."""
    rng = np.random.default_rng(seed)
    case = root / "case"
    keys, rows = [], []
    for i in range(n):
        cls = CLASSES[i % 2]
        key = f"TestSet/{cls}/img_{i:03d}#é.png"
        path = case / "DataSets" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        keys.append(key)
        rows.append({"image": key, "result": "Wrong", "expected": cls, "predicted": CLASSES[(i + 1) % 2],
                     "logit_0": 0.1, "logit_1": 0.9})
    rows.append({"image": "TestSet/Down/ok.png", "result": "Correct", "expected": "Down", "predicted": "Down",
                 "logit_0": 0.9, "logit_1": 0.1})
    pd.DataFrame(rows).to_csv(case / "testResult.csv", index=False)
    heat = (T := case / "T") / "Heatmaps"
    heat.mkdir(parents=True)
    centres = rng.normal(size=(3, 3 * 16 * 16)) * 4
    layer0 = (centres[np.arange(n) % 3] + rng.normal(size=(n, 3 * 16 * 16))).astype(np.float32)
    np.save(heat / "Layer0.npy", layer0.reshape(n, 3, 16, 16))
    np.save(heat / "Layer2.npy", layer0[:, :64])
    pd.DataFrame({"row": range(n), "image": keys}).to_csv(heat / "index.csv", index=False)
    results = {}
    for layer in ("Layer0", "Layer2"):
        flat = np.load(heat / f"{layer}.npy").reshape(n, -1).astype(np.float64)
        distances = squareform(pdist(flat)).astype(np.float32)
        np.save(T / f"{layer}HMDistance.npy", distances)
        results[layer] = cm.cluster_layer(distances, progress=False)
        cm.write_cluster_analysis(T, layer, results[layer], keys, case / "DataSets", progress=False)
    cm.write_summary(T, results, cm.select_best_layer(results))
    return case, keys, results


def local_targets(page, t_dir):
    """Every href/src of the page, resolved against T/ (report.html's folder)."""
    targets = re.findall(r'(?:href|src)="([^"]+)"', page)
    return [(t, (t_dir / unquote(t)).resolve()) for t in targets]


def chromium_dom(page):
    profile = page.parent.parent.parent / "chromium-profile"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_shows_best_layer_clusters_by_size_medoid_first_and_labels(tmp_path):
    case, keys, results = build_case(tmp_path)
    page_path = report.write_report(case)
    assert page_path == case / "T" / "report.html"
    page = page_path.read_text(encoding="utf-8")
    assert "best layer <b>Layer2</b>" in page
    result = results["Layer2"]
    headings = [int(c) for c in re.findall(r'<h3>Cluster (\d+) <small>', page)]
    sizes = [int(result["sizes"][c - 1]) for c in headings]
    assert sorted(headings) == [c for c in range(1, result["k"] + 1) if result["sizes"][c - 1] > 1]
    assert sizes == sorted(sizes, reverse=True)
    for c in headings:
        block = page.split(f'id="cluster-{c}"')[1].split("</section>")[0]
        first = re.search(r'title="([^"]+)"', block).group(1)
        assert first == keys[result["medoids"][c - 1]]       # medoid first
        assert "medoid" in block and f"AllClusters/{c}.gif" in block
    assert "expected Up Left<br>predicted Down" in page
    assert "WICD.png" in page and "summary.csv" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page     # offline, inline CSS
    missing = [t for t, path in local_targets(page, case / "T") if not path.exists()]
    assert not missing
    overlays = list((case / "T" / "report_assets" / "overlays").glob("*.png"))
    assert overlays and all(Image.open(p).size[0] >= 100 for p in overlays)      # 16 px scaled up


def test_report_shows_optional_results_when_present(tmp_path):
    case, keys, results = build_case(tmp_path)
    result = results["Layer2"]
    big = int(np.argmax(result["sizes"])) + 1
    pd.DataFrame({"image": ["ImprovementSet/x/1.png", "ImprovementSet/x/2.png"], "cluster": [big, big],
                  "distance": [0.1, 0.2], "rank": [1, 2]}).to_csv(
        (case / "T" / "UnsafeSet").mkdir(parents=True) or case / "T" / "UnsafeSet" / "unsafe.csv", index=False)
    pd.DataFrame({"epoch": [1, 2], "accuracy": [0.81, 0.87]}).to_csv(case / "T" / "retrain_HUDD.csv", index=False)
    pd.DataFrame({"mode": ["HUDD", "BL1"], "accuracy_mean": [0.9, 0.8]}).to_csv(case / "RQ2.csv", index=False)
    Image.new("RGB", (40, 30), "white").save(case / "RQ2_boxplot.png")
    pd.DataFrame({"cluster": [big], "size": [int(result["sizes"][big - 1])], "min_ratio": [0.2],
                  "best_parameter": ["gaze_yaw"], "explained": [True]}).to_csv(case / "RQ1.csv", index=False)
    layer_dir = case / "T" / "ClusterAnalysis" / "Layer2"
    pd.DataFrame({"cluster": [big], "size": [2], "rule": ["head_yaw > 28.1"], "conditions": ["[]"], "precision": [0.9],
                  "recall": [0.8], "coverage": [0.05], "matching": [150]}).to_csv(layer_dir / "rules.csv", index=False)
    pd.DataFrame({"cluster": [big], "size": [2], "confusion": ["0 -> 00001 100%"], "medoid": [""],
                  "nearest_training": [""]}).to_csv(layer_dir / "descriptions.csv", index=False)
    pd.DataFrame({"cluster": [big, "all"], "members": [2, 2], "selected": [2, 2], "labelled": [2, 2], "errors": [1, 1],
                  "precision": [0.5, 0.5], "base_error_rate": [0.2, 0.2], "lift": [2.5, 2.5]}).to_csv(
        case / "T" / "UnsafeSet" / "precision.csv", index=False)
    page = report.write_report(case).read_text(encoding="utf-8")
    block = page.split(f'id="cluster-{big}"')[1].split("</section>")[0]
    assert "RQ1: explained" in block and "gaze_yaw" in block
    assert "unsafe set: 2 improvement images, 50% of them errors of the DNN" in block
    assert "rule: head_yaw &gt; 28.1</b> (precision 0.90, recall 0.80, 5.0% of the test set)" in block
    assert "confusion: 0 -&gt; 00001 100%" in block
    assert "<b>50.0%</b> of them errors of the DNN (improvement set: 20.0%" in page
    for text in ("Unsafe set", "Retraining: HUDD", "0.87", "<h2>RQ2</h2>", "BL1", "RQ2_boxplot.png"):
        assert text in page
    assert not [t for t, path in local_targets(page, case / "T") if not path.exists()]


def test_a_cluster_without_a_rule_shows_its_best_rejected_candidate_and_why(tmp_path):
    case, keys, results = build_case(tmp_path)
    sizes = results["Layer2"]["sizes"]
    found, missing = [int(c) + 1 for c in np.argsort(sizes)[::-1][:2]]
    layer_dir = case / "T" / "ClusterAnalysis" / "Layer2"
    pd.DataFrame({"cluster": [found, missing], "size": [int(sizes[found - 1]), int(sizes[missing - 1])],
                  "found": [True, False], "rule": ["brightness > 0.41", ""], "conditions": ["[]", ""],
                  "precision": [0.9, np.nan], "recall": [0.8, np.nan], "coverage": [0.05, np.nan],
                  "matching": [12, 0], "rejected": ["", "0.12993 < ink <= 0.13016"], "rejected_recall": [np.nan, 0.12],
                  "rejected_reason": ["", "matches under a third of the cluster"]}).to_csv(layer_dir / "rules.csv",
                                                                                         index=False)
    page = report.write_report(case).read_text(encoding="utf-8")
    block = page.split(f'id="cluster-{found}"')[1].split("</section>")[0]
    assert "<b>rule: brightness &gt; 0.41</b> (precision 0.90, recall 0.80, 5.0% of the test set)" in block
    block = page.split(f'id="cluster-{missing}"')[1].split("</section>")[0]
    assert ("no simple rule (best: 0.12993 &lt; ink &lt;= 0.13016, recall 0.12; matches under a third of the "
            "cluster)") in block
    assert "recall nan" not in block and "precision nan" not in block


def test_report_before_any_step_says_nothing_computed(tmp_path):
    (tmp_path / "case" / "DataSets" / "TestSet" / "a").mkdir(parents=True)
    page = report.write_report(tmp_path / "case").read_text(encoding="utf-8")
    assert "Nothing computed yet" in page and "No clustering results yet" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs Debian's chromium)")
def test_report_renders_in_headless_chromium_and_every_image_loads(tmp_path):
    case, keys, results = build_case(tmp_path)
    big = int(np.argmax(results["Layer2"]["sizes"])) + 1
    near = []
    for i in range(3):                                   # the cluster's nearest training images, as -rq True finds
        near.append(f"TrainingSet/Up/near {i}.png")
        (case / "DataSets" / near[-1]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(case / "DataSets" / near[-1])
    layer_dir = case / "T" / "ClusterAnalysis" / "Layer2"
    pd.DataFrame({"cluster": [big], "size": [3], "rule": ["head_yaw > 28.1 and light <= 0.2"], "conditions": ["[]"],
                  "precision": [0.91], "recall": [0.84], "coverage": [0.062], "matching": [9]}).to_csv(
        layer_dir / "rules.csv", index=False)
    pd.DataFrame({"cluster": [big], "size": [3], "confusion": ["Up -> Down 100%"], "medoid": [""],
                  "nearest_training": [";".join(near)]}).to_csv(layer_dir / "descriptions.csv", index=False)
    import robustnessModule as rm
    from common.data import ImageSpec

    curves = pd.DataFrame([{"perturbation": name, "level": level, "amplitude": level / 2, "setting": "s",
                            "images": 40, "errors": errors, "accuracy": 1 - errors / 40, "drop": (errors - 4) / 40,
                            "mean_error": np.nan}
                           for name, steps in (("blur", (4, 9, 31)), ("noise", (4, 6, 13))) for level, errors in
                           enumerate(steps)])
    rm.write_curves(case / "T" / "Robustness", curves)
    rm.write_examples(case / "T" / "Robustness" / "examples.png", case / "DataSets", keys[0],
                      ImageSpec(3, 16, 16, (0.5,) * 3, (0.5,) * 3), ["blur", "noise"], 2)
    dom = chromium_dom(report.write_report(case))
    robustness = dom.split("<h2>Robustness</h2>")[1].split("<h2>")[0]
    assert "<td>blur</td>" in robustness and "<td>22.5</td>" in robustness and "<td>67.5</td>" in robustness
    assert robustness.count("<img") == 3                 # a plot per perturbation and the examples
    total = int(re.search(r'data-images="(\d+)"', dom).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert total > 20 and loaded == total
    assert f"All {total} images loaded." in dom
    block = dom.split(f'id="cluster-{big}"')[1].split("</section>")[0]
    assert "rule: head_yaw &gt; 28.1 and light &lt;= 0.2" in block and "precision 0.91, recall 0.84" in block
    assert "confusion: Up -&gt; Down 100%" in block and block.count('class="near"') == 3
    # the check is real: a moved image is reported
    victim = next((case / "T" / "report_assets" / "overlays").glob("*.png"))
    victim.unlink()
    page = case / "T" / "report.html"
    dom = chromium_dom(page)
    assert int(re.search(r'data-images-loaded="(\d+)"', dom).group(1)) == total - 1
    assert "did not load" in dom


def test_report_shows_what_each_selection_covers(tmp_path):
    import report

    case = tmp_path / "case"
    (case / "T").mkdir(parents=True)
    columns = dict(n_labelled=[7, 7], precision=[0.5, 0.25], base_error_rate=[0.2, 0.2], clusters_reached=[2, 3],
                   clusters=[3, 3], top_cluster=[1, 1], top_cluster_share=[0.5, 0.7], share_dark=[0.1, 0.3],
                   base_share_dark=[0.05, 0.05])
    pd.DataFrame({"mode": ["GINI"] * 2, **columns}).to_csv(case / "T" / "retrain_GINI.csv", index=False)
    pd.DataFrame({"mode": ["BL2"], "test_accuracy": [0.9]}).to_csv(case / "T" / "retrain_BL2.csv", index=False)
    table = report.coverage_table({"GINI": pd.read_csv(case / "T" / "retrain_GINI.csv"),
                                   "BL2": pd.read_csv(case / "T" / "retrain_BL2.csv")})
    assert list(table["mode"]) == ["GINI"]                     # BL2's old table has no coverage columns
    row = table.iloc[0]
    assert (row["reps"], row["clusters_reached"], row["top_cluster_share"], row["share_dark"]) == \
        pytest.approx((2, 2.5, 0.6, 0.2))
    page = report.write_report(case).read_text()
    assert "What each selection covers" in page and "share_dark" in page
