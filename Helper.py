"""The pipeline: the order of HUDD's steps and the step cache in T/manifest.json.

Each step records the fingerprints of its inputs (model file, data listing, the outputs of the step
before it, the options that change its result) and of its outputs. On the next run a step whose
record still matches is skipped, so an interrupted run resumes where it stopped; a step that reruns
drops the records of every step after it. Only this module knows the order of the steps and the
cache; the case folder, the options and the clusters in words live in pipeline/, the summary text in
report.summary.
"""
import json
import time
from pathlib import Path

from common.errors import HUDDError
from common.files import content_hash, file_fingerprint, json_digest, tree_fingerprint, write_csv, write_json
from pipeline.case import Case, error_images, heatmap_layers, selected_clusters
from pipeline.options import Options
from pipeline.stage import stage
from pipeline.words import explain, parameters, properties, rq1

STEPS = ("test", "heatmaps", "distances", "clusters", "assign", "retrain")
MANIFEST_VERSION = 1


# Options that change a step's outputs; a change reruns the step and everything after it.
STEP_OPTIONS = {
    "test": ("threshold",),
    "heatmaps": ("rule", "heatmap_dtype"),
    "distances": ("xlsx",),
    "clusters": ("max_clusters", "optimal_ordering"),
    "assign": ("rule", "assign_factor"),
    "retrain": ("mode", "epochs", "reps", "seed", "baseline_budget_factor", "retrain_factor", "select", "threshold",
                "freeze", "lr", "schedule", "monitor_test"),
}


# --- the step cache ---------------------------------------------------------------------------

def read_manifest(case):
    """T/manifest.json, or an empty one when it is missing, unreadable or of another version."""
    try:
        data = json.loads((case.t / "manifest.json").read_text(encoding="utf-8"))
        if data.get("version") == MANIFEST_VERSION:
            return data
    except (OSError, ValueError):
        pass
    return {"version": MANIFEST_VERSION, "steps": {}}


def save_manifest(case, data):
    write_json(case.t / "manifest.json", data)


# Written into a step's output folder later (by -rq True), without making that step's result stale.
LATER_FILES = ("rules.csv", "descriptions.csv")


def _fingerprint(path):
    path = Path(path)
    if path.is_dir():
        return "dir:" + tree_fingerprint(path, exclude_names=LATER_FILES)
    if path.is_file():
        return "file:" + file_fingerprint(path)
    return "missing"


def step_key(case, name):
    return f"retrain_{case.options.mode}" if name == "retrain" else name


def _inputs(case, name, manifest):
    """What a step's result depends on: its options and the step before it (or the raw inputs)."""
    inputs = {"options": case.options.subset(STEP_OPTIONS[name])}
    if name == "retrain" and case.options.hudd_u_score is not None:     # only when set: earlier caches stay current
        inputs["options"]["hudd_u_score"] = case.options.hudd_u_score
    if name == "test":
        inputs["model"] = content_hash(case.model_path)
        inputs["data"] = tree_fingerprint(case.datasets, exclude=("params.csv",))     # RQ1's input, not the test's
        return inputs
    previous = STEPS[STEPS.index(name) - 1]
    record = manifest["steps"].get(previous)
    inputs["upstream"] = json_digest(record["outputs"]) if record else None
    if name in ("assign", "retrain"):
        inputs["model"] = content_hash(case.model_path)
        inputs["improvement"] = tree_fingerprint(case.datasets / "ImprovementSet")
    if name == "retrain":
        inputs["training"] = tree_fingerprint(case.datasets / "TrainingSet")
        labels = case.t / "UnsafeSet" / "labels.csv"
        if labels.is_file():
            inputs["labels"] = content_hash(labels)
    return inputs


def _intact(case, outputs):
    return all(_fingerprint(case.dir / rel) == fp for rel, fp in outputs.items())


def _has_distances(case, name, record):
    """An assign step recorded before it saved its distances is current for every mode but those that need them."""
    import assignModule
    import retrainModule

    if name != "assign" or not retrainModule.check_mode(case.options.mode).distances:
        return True
    return f"{case.t.name}/UnsafeSet/{assignModule.DISTANCES_FILE}" in record["outputs"]


def is_current(case, name, manifest=None):
    manifest = manifest or read_manifest(case)
    record = manifest["steps"].get(step_key(case, name))
    return bool(record) and record["inputs"] == _inputs(case, name, manifest) and _intact(case, record["outputs"]) \
        and _has_distances(case, name, record)


def run_step(case, name, force=False):
    """Run one step unless its cached result is current; return its record's summary."""
    manifest = read_manifest(case)
    key = step_key(case, name)
    if not force and is_current(case, name, manifest):
        print(f"[{name}] up to date (cached in {case.t.name}/); skipped")
        return manifest["steps"][key]["summary"]
    # Records stay until the step succeeds: a failed or killed step leaves outputs whose fingerprints no
    # longer match, so it reruns next time, and so does everything after it.
    inputs = _inputs(case, name, manifest)
    started = time.time()
    print(f"[{name}] running")
    outputs, summary = STEP_FUNCTIONS[name](case)
    manifest = read_manifest(case)
    for later in STEPS[STEPS.index(name):]:
        for stale in [k for k in manifest["steps"] if k == later or k.startswith(f"{later}_")]:
            del manifest["steps"][stale]
    manifest["steps"][key] = {
        "inputs": inputs,
        "outputs": {str(Path(p).relative_to(case.dir)): _fingerprint(p) for p in outputs},
        "summary": summary,
        "seconds": round(time.time() - started, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_manifest(case, manifest)
    return summary


# --- the steps --------------------------------------------------------------------------------

def _step_test(case):
    import testModule

    model, meta = case.model
    if case.keypoints:
        frames = testModule.write_keypoint_results(case.dir, case.splits, model, meta, case.device,
                                                   case.options.batch_size, case.options.workers,
                                                   case.options.progress, case.options.threshold, case.engine)
    else:
        frames = testModule.write_results(case.dir, case.splits, model, meta, meta["classes"], case.device,
                                          case.options.batch_size, case.options.workers, case.options.progress,
                                          case.engine)
    outputs = [case.dir / testModule.RESULT_FILES[name] for name in frames] + [case.t / "skipped.csv"]
    test = frames["TestSet"]
    summary = {"test_accuracy": testModule.accuracy_of(test), "test_images": len(test),
               "test_errors": int((test["result"] == "Wrong").sum()),
               "skipped": sum(len(s) for s in case.splits.values()) - sum(len(f) for f in frames.values())}
    if case.keypoints:
        summary["mean_error"] = float(test["avg_error"].mean())
    if summary["skipped"]:
        print(f"[test] {summary['skipped']} unreadable images skipped; see {case.t / 'skipped.csv'}")
    return outputs, summary


def _step_heatmaps(case):
    import pandas as pd

    from common.data import ImageSet, ImageSpec

    wrong = error_images(case)
    model, meta = case.model
    import heatmapModule
    out = case.t / "Heatmaps"
    dataset = ImageSet(case.datasets, wrong["image"].tolist(), ImageSpec.from_meta(meta))
    opts = case.options
    start_fn = None
    if case.keypoints:      # the worst keypoint's output map alone (worst by the ground truth), as the original
        import testModule

        worst = [list(meta["classes"]).index(k) for k in wrong["worst_KP"]]
        start_fn = lambda outputs, indices: testModule.worst_keypoint_start(outputs, [worst[i] for i in indices])
    layers = heatmapModule.write_heatmaps(model, dataset, out, rule=opts.rule, batch_size=opts.batch_size,
                                          device=case.device, workers=opts.workers, dtype=opts.heatmap_dtype,
                                          start_fn=start_fn, progress=opts.progress)
    write_csv(out / "index.csv", pd.DataFrame({"row": range(len(wrong)), "image": wrong["image"]}))
    for stale in out.glob("*.npy"):
        if stale.stem not in layers:
            stale.unlink()
    return [out], {"layers": list(layers), "error_images": len(wrong)}


def _step_distances(case):
    import clusterModule

    layers, images = heatmap_layers(case)
    outputs = []
    for layer in layers:
        outputs.append(clusterModule.write_distances(case.t / "Heatmaps" / f"{layer}.npy",
                                                     case.t / f"{layer}HMDistance.npy",
                                                     xlsx=case.t / f"{layer}HMDistance.xlsx" if case.options.xlsx else None,
                                                     keys=images, progress=case.options.progress))
        xlsx = case.t / f"{layer}HMDistance.xlsx"
        if xlsx.is_file():
            outputs.append(xlsx)
    return outputs, {"layers": layers, "images": len(images)}


def _step_clusters(case):
    import numpy as np

    import clusterModule
    import report

    layers, images = heatmap_layers(case)
    results = {}
    for layer in layers:
        distances = np.load(case.t / f"{layer}HMDistance.npy", mmap_mode="r")
        results[layer] = clusterModule.cluster_layer(distances, max_clusters=case.options.max_clusters,
                                                     optimal_ordering=case.options.optimal_ordering,
                                                     progress=case.options.progress, name=layer)
        clusterModule.write_cluster_analysis(case.t, layer, results[layer], images, case.datasets,
                                             distances=distances, progress=case.options.progress)
    best = clusterModule.select_best_layer(results)
    clusterModule.write_summary(case.t, results, best)
    summary = {"best_layer": best, "clusters": int(results[best]["k"]),
               "nonsingleton_clusters": int(sum(1 for n in results[best]["sizes"] if n > 1))}
    report.write_report(case.dir)
    return [case.t / "ClusterAnalysis", case.t / f"Layer{best.removeprefix('Layer')}"], summary


def robustness(case):
    """-step robustness: the curves (T/Robustness/, cached in the manifest like a step, but outside the
    pipeline's order: nothing depends on them) and, when asked, perturbed images in DataSets/ with
    their perturbation and amplitude in params.csv. Returns the summary."""
    import report
    import robustnessModule as rm
    from common.data import ImageSpec

    opts = case.options
    model, meta = case.model
    names = rm.check_perturbations(opts.perturbations, case.keypoints)
    rm.check_perturb_test(opts.perturb_test, case.keypoints)
    clean_test = rm.clean_split(case.splits["TestSet"])
    out = case.t / rm.ROBUSTNESS
    inputs = {"model": content_hash(case.model_path), "levels": opts.levels, "seed": opts.seed, "perturbations": names,
              "threshold": opts.threshold if case.keypoints else None,
              "test": json_digest([(i, file_fingerprint(case.datasets / i)) for i in clean_test.images])}
    manifest = read_manifest(case)
    record = manifest["steps"].get("robustness")
    if record and record["inputs"] == inputs and _intact(case, record["outputs"]):
        print(f"[robustness] curves up to date (cached in {case.t.name}/{rm.ROBUSTNESS}/); skipped")
        from common.tables import read_table
        curves = read_table(out / rm.CURVES_FILE, text=("perturbation", "setting"))
    else:
        print(f"[robustness] {len(names)} perturbations x {opts.levels} levels on {len(clean_test)} test images")
        started = time.time()
        curves = rm.robustness_curves(model, meta, case.datasets, clean_test, names, opts.levels, opts.seed,
                                      case.device, opts.batch_size, opts.workers, opts.threshold, opts.progress)
        paths = rm.write_curves(out, curves, case.keypoints)
        paths.append(rm.write_examples(out / rm.EXAMPLES_FILE, case.datasets, clean_test.images[0],
                                       ImageSpec.from_meta(meta), names, opts.levels, opts.seed))
        manifest = read_manifest(case)
        manifest["steps"]["robustness"] = {"inputs": inputs, "summary": {},
                                           "outputs": {str(p.relative_to(case.dir)): _fingerprint(p) for p in paths},
                                           "seconds": round(time.time() - started, 2),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        save_manifest(case, manifest)
    summary = {"curves": rm.describe_curves(curves), "ranges": rm.falling_ranges(curves)}
    if opts.perturb_improvement or opts.perturb_test:
        summary.update(rm.write_perturbed_images(case.datasets, case.splits, ImageSpec.from_meta(meta), curves, names,
                                                 opts.perturb_improvement, opts.perturb_test, opts.seed,
                                                 list(meta["classes"]) if case.keypoints else None, opts.progress))
        case._splits = None
    report.write_report(case.dir)
    return summary


def _step_assign(case):
    import numpy as np

    import assignModule
    import report
    from common.data import ImageSet, ImageSpec
    from testModule import errors_of

    model, meta = case.model
    if "ImprovementSet" not in case.splits:
        raise HUDDError(f"{case.datasets / 'ImprovementSet'}: missing; HUDD step 3 needs an improvement set "
                        f"(images in class folders, or directly inside when unlabelled)")
    layer, images, labels = selected_clusters(case)
    heatmaps = np.load(case.t / "Heatmaps" / f"{layer}.npy", mmap_mode="r")
    improvement = case.splits["ImprovementSet"]
    dataset = ImageSet(case.datasets, improvement.images, ImageSpec.from_meta(meta))
    start = None
    if case.keypoints:      # no ground truth for improvement images: the least peaked keypoint map
        from testModule import least_peaked_start as start
    assignModule.check_clusters(heatmaps, labels, case.t / "ClusterAnalysis" / layer / "clusters.csv")
    keys, cluster_ids, distances = case.engine.distances(model, dataset, layer, heatmaps, labels, case.options.batch_size,
                                                         case.device, rule=case.options.rule,
                                                         workers=case.options.workers, progress=case.options.progress,
                                                         start=start)
    if len(set(keys)) != len(keys):
        raise HUDDError("improvement set: an image key appears twice; key images by their path under DataSets/")
    unsafe = assignModule.select_closest(keys, cluster_ids, distances, labels, factor=case.options.assign_factor)
    sizes = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    quality = assignModule.selection_quality(unsafe, errors_of(case.dir / "improveResult.csv"), sizes)
    # Keypoint ground truth of the unsafe set goes to DataSets/ImprovementSet/labels.csv, not a class column.
    folder = assignModule.write_unsafe_set(case.t, unsafe, case.datasets, improvement.labelled or case.keypoints,
                                           quality, distances=(keys, cluster_ids, distances))
    report.write_report(case.dir)
    # Not labels.csv: the engineer fills it in (step 5), which must not make this step look stale.
    outputs = [p for p in sorted(folder.iterdir()) if p.name != assignModule.LABELS_FILE]
    summary = {"layer": layer, "unsafe_images": int(len(unsafe)),
               "clusters_served": int(unsafe["cluster"].nunique()) if len(unsafe) else 0}
    total = quality[quality["cluster"].astype(str) == "all"]
    if len(total) and total["labelled"].iloc[0] > 0:
        total = total.iloc[0]
        summary.update(unsafe_precision=float(total["precision"]), base_error_rate=float(total["base_error_rate"]),
                       unsafe_errors=int(total["errors"]))
    return outputs, summary


def _step_retrain(case):
    import report
    import retrainModule

    opts = case.options
    frame = retrainModule.retrain(case.dir, case.model_path, opts.mode, reps=opts.reps, seed=opts.seed,
                                  hudd_u_score=opts.hudd_u_score,
                                  epochs=opts.epochs, select=opts.select, budget_factor=opts.baseline_budget_factor,
                                  retrain_factor=opts.retrain_factor, device=opts.device, workers=opts.workers, trust=opts.trust_model,
                                  progress=opts.progress, threshold=opts.threshold, freeze=opts.freeze,
                                  lr=opts.lr, schedule=opts.schedule, monitor_test=opts.monitor_test)
    models_written = [case.dir / "DNNModels" / name for name in frame["model"]]
    report.write_report(case.dir)
    history = [case.t / f"retrain_{opts.mode}_history.{ext}" for ext in ("csv", "png")]
    return [case.t / f"retrain_{opts.mode}.csv", *history, *models_written], retrainModule.retrain_summary(frame)


STEP_FUNCTIONS = {"test": _step_test, "heatmaps": _step_heatmaps, "distances": _step_distances,
                  "clusters": _step_clusters, "assign": _step_assign, "retrain": _step_retrain}


# --- the pipeline -----------------------------------------------------------------------------

def run(case_dir, model_name="OriginalModel.pth", options=None, step=None, until=None):
    """Run the whole pipeline (or one step, forced, after any missing earlier step); return summaries."""
    options = options or Options()
    if options.ray_address and options.engine != "ray":
        raise HUDDError(f"--ray-address {options.ray_address}: only used with --engine ray; add --engine ray or drop it")
    with stage(case_dir, "setup") as where:
        case = Case(case_dir, model_name, options)
        case.lock()
        try:
            if step == "robustness":
                where.name = "robustness"
                return {"robustness": robustness(case)}
            if step == "properties":        # outside the steps' order and cache: its own fingerprint
                where.name = "properties"
                return {"properties": properties(case, force=True)}
            last = step or until or STEPS[-1]
            if last == "retrain":       # a mode the model cannot serve is refused before hours of heatmaps
                import retrainModule

                retrainModule.check_modes_for_model([options.mode], case.model_path, options.trust_model,
                                                    options.hudd_u_score)
            summaries = {}
            for name in STEPS[: STEPS.index(last) + 1]:
                where.name = name
                summaries[name] = run_step(case, name, force=(name == step))
                if name == "clusters" and options.rq:
                    where.name = "properties"
                    table, source = parameters(case)
                    where.name = "rq1"
                    found = rq1(case, table, source)
                    if found:
                        summaries[name] = {**summaries[name], "rq1_explained": found["explained_percent"],
                                           "rq1_inspected": found["inspected_percent"], "rq1": found}
                    where.name = "explain"
                    summaries[name] = {**summaries[name], "rules": explain(case, table, source)}
            return summaries
        finally:
            case.close()
            case.unlock()


def run_pipeline(case_dir, model_name, options, until="assign"):
    """The pipeline up to `until` (for RQ2.py); returns the step summaries."""
    return run(case_dir, model_name, options, until=until)


def summary_text(case_dir, summaries):
    """The short summary printed at the end of every run (report.summary; imported when a run ends)."""
    from report.summary import summary_text as text

    return text(case_dir, summaries)
