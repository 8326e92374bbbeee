"""The whole pipeline as a user meets it: all steps, resume after a kill, determinism."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import Helper
from conftest import ROOT, make_tiny_case

FAST = ["--epochs", "2", "--no-progress", "--seed", "3"]


def hudd_cmd(case, *extra):
    return [sys.executable, "HUDD.py", "-o", str(case), "-m", "OriginalModel.pth", "-mode", "HUDD", *FAST, *extra]


def results_of(case):
    """What a user compares between runs: clusters, unsafe set, retrained accuracy."""
    layer, images, labels = Helper.selected_clusters(Helper.Case(case))
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    retrain = pd.read_csv(case / "T" / "retrain_HUDD.csv")
    return {"layer": layer, "clusters": list(zip(images, labels.tolist())),
            "unsafe": unsafe[["image", "cluster", "rank"]].values.tolist(),
            "distances": unsafe["distance"].round(6).tolist(),
            "accuracy": retrain["test_accuracy"].tolist()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    case = make_tiny_case(tmp_path_factory.mktemp("ref") / "case")
    run = subprocess.run(hudd_cmd(case), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return case, run.stdout


def test_full_run_writes_every_step_and_prints_a_summary(reference_run):
    case, stdout = reference_run
    manifest = json.loads((case / "T" / "manifest.json").read_text())
    assert set(manifest["steps"]) == {"test", "heatmaps", "distances", "clusters", "assign", "retrain_HUDD"}
    for needle in ("test accuracy", "best layer", "unsafe set", "after retraining", "report.html"):
        assert needle in stdout, stdout
    assert (case / "T" / "report.html").is_file()
    assert list((case / "DNNModels").glob("HUDD_1_*.pth"))


def test_second_run_recomputes_nothing(reference_run):
    case, _ = reference_run
    before = json.loads((case / "T" / "manifest.json").read_text())
    run = subprocess.run(hudd_cmd(case), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("up to date") == 6
    after = json.loads((case / "T" / "manifest.json").read_text())
    assert {k: v["outputs"] for k, v in before["steps"].items()} == {k: v["outputs"] for k, v in after["steps"].items()}


def test_rq1_and_the_clusters_in_words_leave_every_step_up_to_date(reference_run, tmp_path):
    """-rq True writes rules.csv/descriptions.csv into the clusters' folder: twice in a row, nothing reruns."""
    case = shutil.copytree(reference_run[0], tmp_path / "case")
    for attempt in range(2):
        run = subprocess.run(hudd_cmd(case, "-rq", "True"), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.count("up to date") == 6, (attempt, run.stdout[-2000:])
    layer = Helper.selected_clusters(Helper.Case(case))[0]
    described = pd.read_csv(case / "T" / "ClusterAnalysis" / layer / "descriptions.csv", keep_default_na=False)
    assert described["confusion"].str.contains(" -> ").all()
    assert described["nearest_training"].str.startswith("TrainingSet/").all()


def test_same_seed_gives_identical_results(reference_run, tmp_path):
    case, _ = reference_run
    twin = make_tiny_case(tmp_path / "case")
    run = subprocess.run(hudd_cmd(twin), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert results_of(twin) == results_of(case)


@pytest.mark.parametrize("kill_at", [f"[{step}] running" for step in Helper.STEPS])
def test_killed_run_resumes_to_the_same_results(reference_run, tmp_path, kill_at):
    case, _ = reference_run
    victim = make_tiny_case(tmp_path / "case")
    proc = subprocess.Popen(hudd_cmd(victim), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, bufsize=1)
    for line in proc.stdout:
        if line.startswith(kill_at):
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    manifest = victim / "T" / "manifest.json"          # none yet when killed during the first step
    finished = json.loads(manifest.read_text())["steps"] if manifest.is_file() else {}
    rerun = subprocess.run(hudd_cmd(victim), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = json.loads((victim / "T" / "manifest.json").read_text())["steps"]
    for step, record in finished.items():      # finished steps were not recomputed
        assert after[step]["outputs"] == record["outputs"], step
    assert results_of(victim) == results_of(case)


def run_ok(case, *extra):
    done = subprocess.run(hudd_cmd(case, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_rerun_step_invalidates_every_later_step(reference_run, tmp_path):
    case, _ = reference_run
    copy = shutil.copytree(case, tmp_path / "case")
    run_ok(copy, "-step", "heatmaps")
    assert set(json.loads((copy / "T" / "manifest.json").read_text())["steps"]) == {"test", "heatmaps"}
    stdout = run_ok(copy)
    assert "[test] up to date" in stdout and "[heatmaps] up to date" in stdout
    for later in ("distances", "clusters", "assign", "retrain"):
        assert f"[{later}] running" in stdout, later
    assert results_of(copy) == results_of(case)


def test_a_changed_option_reruns_its_step_and_the_ones_after(reference_run, tmp_path):
    case, _ = reference_run
    copy = shutil.copytree(case, tmp_path / "case")
    stdout = run_ok(copy, "--rule", "epsilon")
    assert "[test] up to date" in stdout
    for step in ("heatmaps", "distances", "clusters", "assign", "retrain"):
        assert f"[{step}] running" in stdout, step
    before = json.loads((case / "T" / "manifest.json").read_text())["steps"]["heatmaps"]
    after = json.loads((copy / "T" / "manifest.json").read_text())["steps"]["heatmaps"]
    assert before["inputs"]["options"]["rule"] == "hudd" and after["inputs"]["options"]["rule"] == "epsilon"
    assert before["outputs"] != after["outputs"]


def test_the_summary_gives_every_repetitions_gain(tmp_path):
    """One repetition's gain is noise-sized: with --reps N the summary shows the mean and each of them."""
    import retrainModule

    frame = pd.DataFrame({"mode": ["HUDD", "HUDD"], "test_accuracy": [0.828, 0.8346666666666667],
                          "gain": [-0.1333333, 0.5333333], "improved": [42, 51], "worsened": [46, 35],
                          "precision": [0.45, 0.45]})
    text = Helper.summary_text(tmp_path, {"retrain": retrainModule.retrain_summary(frame)})
    assert "after retraining     83.13% (HUDD, gain +0.20 points, mean of 2 repetitions: -0.13, +0.53)" in text
    one = Helper.summary_text(tmp_path, {"retrain": retrainModule.retrain_summary(frame.iloc[:1])})
    assert "after retraining     82.80% (HUDD, gain -0.13 points)" in one


def many_clusters_summaries(clusters=14, reps=2):
    """Step summaries as a -rq True run on the demo's scale gives them: long rules, sizes out of cluster order."""
    sizes = [18 + (37 * c) % 80 for c in range(1, clusters + 1)]
    rules = [{"cluster": c, "size": n,
              "text": f"cluster {c} ({n} images): gaze_direction <= 162.45 and gaze_h <= 19.26 and eyelid_opening "
                      f"<= 0.509 and ambient > 0.2129 (precision 0.58, recall 0.34, 3.1% of the test set)"}
             for c, n in zip(range(1, clusters + 1), sizes)]
    gains = [0.1 * (-1) ** r for r in range(reps)]
    return {"test": {"test_accuracy": 0.8293, "test_images": 3000, "test_errors": 512, "skipped": 0},
            "clusters": {"best_layer": "Layer18", "clusters": clusters, "rq1_explained": 92.9, "rq1_inspected": 13.67,
                         "rules": rules},
            "assign": {"unsafe_images": 1024, "unsafe_precision": 0.45, "base_error_rate": 0.29},
            "retrain": {"mode": "HUDD", "test_accuracy": 0.83, "gain": sum(gains) / reps, "gains": gains}}, sizes


def test_the_summary_fits_a_screen_with_many_clusters(tmp_path):
    """The lines a user looks for stay on one screen: three clusters in words, the rest in the report."""
    (tmp_path / "T").mkdir()
    (tmp_path / "T" / "report.html").write_text("<html></html>")
    summaries, sizes = many_clusters_summaries()
    lines = Helper.summary_text(tmp_path, summaries).splitlines()
    paths = [line for line in lines if line.startswith(("  report ", "  results "))]
    assert paths == [f"  report               {(tmp_path / 'T' / 'report.html').resolve()}",
                     f"  results              {(tmp_path / 'T').resolve()}"]       # paths are never shortened
    too_long = [line for line in lines if len(line) > 100 and line not in paths]
    assert not too_long, too_long
    assert len(lines) <= 15, "\n".join(lines)
    for needle in ("test accuracy", "best layer", "RQ1 explained", "unsafe set", "after retraining"):
        assert sum(line.lstrip().startswith(needle) for line in lines) == 1, needle
    largest = sorted(range(1, 15), key=lambda c: (-sizes[c - 1], c))[:3]
    shown = [line for line in lines if " images): " in line]
    assert [line.split("cluster ", 2)[-1].split(" ")[0] for line in shown] == [str(c) for c in largest]
    assert shown[0].startswith("  clusters in words    cluster ") and all(s.endswith(" ...") for s in shown)
    more = lines.index(shown[-1]) + 1
    assert lines[more] == f"{' ' * 23}... 11 more in T/report.html"
    assert lines[more + 1].startswith("  unsafe set ")


def test_a_few_clusters_are_all_shown_and_long_repetition_lists_wrap(tmp_path):
    summaries, _ = many_clusters_summaries(clusters=3, reps=12)
    summaries["clusters"]["rules"][0]["text"] = "cluster 1 (40 images): gaze_h <= 19.26 (precision 0.58)"
    lines = Helper.summary_text(tmp_path, summaries).splitlines()
    assert not [line for line in lines if "more in T/report.html" in line]
    assert f"{' ' * 23}cluster 1 (40 images): gaze_h <= 19.26 (precision 0.58)" in lines    # short: uncut
    assert sum(" images): " in line for line in lines) == 3
    retrain = lines.index("  after retraining     83.00% (HUDD, gain +0.00 points, mean of 12 repetitions)")
    each = " ".join(line.strip() for line in lines[retrain + 1: retrain + 3])
    assert each == "repetitions' gains: " + ", ".join(["+0.10", "-0.10"] * 6)
    assert all(len(line) <= 100 for line in lines if not line.startswith("  results "))


def test_the_assign_step_saves_the_distances_hudd_u_orders_by(reference_run, tmp_path):
    """distances.npz: every readable improvement image against every non-singleton cluster, the very
    distances the unsafe set was chosen from; an assign record without it is stale for HUDD-U only."""
    import assignModule

    case = shutil.copytree(reference_run[0], tmp_path / "case")
    keys, ids, distances = assignModule.read_distances(case / "T")
    improvement = pd.read_csv(case / "improveResult.csv")["image"].tolist()
    assert sorted(keys) == sorted(improvement) and distances.shape == (len(keys), len(ids))
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    counts = unsafe["cluster"].value_counts().to_dict()
    again = assignModule.greedy_assign(keys, ids, distances, {int(c): counts.get(int(c), 0) for c in ids})
    assert set(zip(again["image"], again["cluster"])) == set(zip(unsafe["image"], unsafe["cluster"]))
    manifest = json.loads((case / "T" / "manifest.json").read_text())
    assert f"T/UnsafeSet/{assignModule.DISTANCES_FILE}" in manifest["steps"]["assign"]["outputs"]
    del manifest["steps"]["assign"]["outputs"][f"T/UnsafeSet/{assignModule.DISTANCES_FILE}"]
    (case / "T" / "manifest.json").write_text(json.dumps(manifest))
    assert Helper.is_current(Helper.Case(case), "assign")
    assert not Helper.is_current(Helper.Case(case, options=Helper.Options(mode="HUDD-U")), "assign")


def test_mode_gini_and_hudd_u_run_on_the_cached_steps(reference_run, tmp_path):
    import assignModule

    case = shutil.copytree(reference_run[0], tmp_path / "case")
    _, ids, _ = assignModule.read_distances(case / "T")
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "unsafe.csv")
    for mode in ("GINI", "HUDD-U"):
        command = [sys.executable, "HUDD.py", "-o", str(case), "-m", "OriginalModel.pth", "-mode", mode, *FAST]
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.count("up to date") == 5, run.stdout[-2000:]      # only the retrain step runs
        row = pd.read_csv(case / "T" / f"retrain_{mode}.csv").iloc[0]
        assert row["n_labelled"] == len(unsafe) and row["clusters"] == len(ids)
        assert 1 <= row["clusters_reached"] <= len(ids)
