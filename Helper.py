"""The pipeline: the case folder, the order of HUDD's steps, and the step cache in T/manifest.json.

Each step records the fingerprints of its inputs (model file, data listing, the outputs of the step
before it, the options that change its result) and of its outputs. On the next run a step whose
record still matches is skipped, so an interrupted run resumes where it stopped; a step that reruns
drops the records of every step after it. Only this module knows the order of the steps.
"""
import dataclasses
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import HUDDError, InternalError, log_internal_error
from common.files import content_hash, file_fingerprint, json_digest, tree_fingerprint, write_csv, write_json

STEPS = ("test", "heatmaps", "distances", "clusters", "assign", "retrain")
MANIFEST_VERSION = 1


@dataclass
class Options:
    """Every typed option of the command line, with the faithful defaults."""

    device: str = "auto"
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    rule: str = "hudd"
    heatmap_dtype: str = "float32"
    max_clusters: int = 500
    optimal_ordering: bool = False  # scipy's optimal leaf ordering of the dendrogram (the original's; slow)
    rq: bool = False
    mode: str = "HUDD"
    epochs: int = 10
    reps: int = 1
    baseline_budget_factor: float = 1.0
    retrain_factor: float = 1.0  # HUDD retrains on this x |c| of each cluster's unsafe images (the original's 1)
    assign_factor: float = 2.0
    select: str = "train-accuracy"
    trust_model: bool = False
    xlsx: bool = True
    progress: bool = True
    threshold: float = 4.0      # keypoint regressors: Wrong when the mean keypoint error is above this (px)
    freeze: int = 4             # keypoint regressors: first convolutions frozen when retraining (the original's 4)
    lr: float | None = None     # retraining learning rate; None = the original's 1e-3 (SGD, or RMSprop for keypoints)
    schedule: str = "cosine"    # retraining learning-rate schedule: cosine, or constant (the original's)
    monitor_test: bool = False  # record the test accuracy after every retraining epoch (a diagnosis)
    engine: str = "local"       # how per-image work runs: local (this process) or ray (Ray Data actors)
    ray_address: str | None = None  # --engine ray: None starts Ray here; auto or HOST:PORT joins a cluster
    perturbations: tuple | None = None  # robustness: which perturbations (None = every one the task allows)
    levels: int = 5             # robustness: amplitude levels above the clean image
    perturb_improvement: int = 0  # robustness: write an improvement set of this many perturbed training images
    perturb_test: int = 0       # robustness: add this many perturbed test copies (classifiers)

    def subset(self, names):
        return {name: getattr(self, name) for name in names}


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


class Case:
    """One case folder under analysis with one model; loads what it needs once, lazily."""

    def __init__(self, case_dir, model_name="OriginalModel.pth", options=None):
        import models

        self.dir = Path(case_dir)
        self.options = options or Options()
        if not self.dir.is_dir():
            raise HUDDError(f"{self.dir}: no such case folder; pass -o with a folder that holds DataSets/ "
                            f"(python -m casestudies gaze -o {self.dir} builds one)")
        self.t = self.dir / "T"
        self.datasets = self.dir / "DataSets"
        self.model_path = models.resolve_model_path(self.dir, model_name)
        self._model = self._splits = self._classes = self._loaded = self._engine = None
        self._lock = None

    # --- what the steps share -------------------------------------------------------------
    def _load(self):
        if self._loaded is None:
            import models
            from common.data import resolve_device

            self._loaded = models.load_model(self.model_path, resolve_device(self.options.device),
                                             trust=self.options.trust_model)
        return self._loaded

    @property
    def keypoints(self):
        """True for a keypoint regressor (model task "keypoints"): splits are flat folders with labels.csv."""
        from testModule import is_keypoint_task

        return is_keypoint_task(self._load()[1])

    @property
    def splits(self):
        from common.data import list_case
        from testModule import list_keypoint_case

        if self._splits is None:
            self._splits = list_keypoint_case(self.dir, self._load()[1]["classes"]) if self.keypoints \
                else list_case(self.dir)
        return self._splits

    @property
    def model(self):
        """(model, meta) with the classes checked against the class folders (keypoint names: their components)."""
        if self._model is None:
            from testModule import check_classes, keypoint_components

            model, meta = self._load()
            meta = dict(meta)
            if self.keypoints:
                keypoint_components(meta)
            else:
                meta["classes"] = check_classes(meta, self.splits, self.model_path)
            if meta.get("input_size") is None:
                raise HUDDError(f"{self.model_path}: the pickled model names no input size; re-save it with "
                                f"models.save_model(..., input_size=(C, H, W), mean=..., std=...)")
            self._model = (model, meta)
        return self._model

    @property
    def engine(self):
        """The engine of the per-image work (engines.make_engine), started on first use."""
        if self._engine is None:
            from engines import make_engine

            self._engine = make_engine(self.options.engine, self.options.ray_address, self.options.workers)
        return self._engine

    def close(self):
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def device(self):
        from common.data import resolve_device

        return resolve_device(self.options.device)

    # --- lock -----------------------------------------------------------------------------
    def lock(self):
        """Refuse a second run on the same case folder; the kernel drops the lock if a run is killed."""
        try:
            self.t.mkdir(parents=True, exist_ok=True)
            handle = open(self.t / ".lock", "a+")
        except PermissionError:
            raise HUDDError(f"{self.dir}: not writable; HUDD writes its results to {self.t}: copy the case "
                            f"folder somewhere writable or fix its permissions") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise HUDDError(f"{self.dir}: another HUDD run ({owner}) is using this case folder; wait for it "
                            f"to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def unlock(self):
        if self._lock:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    # --- manifest -------------------------------------------------------------------------
    @property
    def manifest_path(self):
        return self.t / "manifest.json"

    def manifest(self):
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            if data.get("version") == MANIFEST_VERSION:
                return data
        except (OSError, ValueError):
            pass
        return {"version": MANIFEST_VERSION, "steps": {}}

    def save_manifest(self, data):
        write_json(self.manifest_path, data)


# --- the step cache ---------------------------------------------------------------------------

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


def is_current(case, name, manifest=None):
    manifest = manifest or case.manifest()
    record = manifest["steps"].get(step_key(case, name))
    return bool(record) and record["inputs"] == _inputs(case, name, manifest) and _intact(case, record["outputs"])


def run_step(case, name, force=False):
    """Run one step unless its cached result is current; return its record's summary."""
    manifest = case.manifest()
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
    manifest = case.manifest()
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
    case.save_manifest(manifest)
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


def error_images(case):
    """The test set's error images, in testResult.csv order (the rows of every heatmap array)."""
    from testModule import read_results

    frame = read_results(case.dir / "testResult.csv")
    wrong = frame[frame["result"] == "Wrong"].reset_index(drop=True)
    if wrong.empty:
        raise HUDDError(f"{case.dir / 'testResult.csv'}: the DNN makes no errors on the test set, so there is "
                        f"nothing to debug; add harder test images or check the model")
    return wrong


def _heatmap_layers(case):
    """The kept layers of the heatmap step, in forward order, and the error images (heatmap rows)."""
    from common.tables import read_table

    hint = "rerun the heatmaps step (python HUDD.py -o CASE -step heatmaps)"
    layers = read_table(case.t / "Heatmaps" / "layers.csv", required=("layer", "kept"), missing_hint=hint)
    index = read_table(case.t / "Heatmaps" / "index.csv", required=("image",), missing_hint=hint)
    kept = layers[layers["kept"].astype(str) == "True"]["layer"].tolist()
    return kept, index["image"].tolist()


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

    layers, images = _heatmap_layers(case)
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

    layers, images = _heatmap_layers(case)
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


def rq1(case):
    """RQ1 (-rq True) on the selected layer's clusters: CASE/RQ1.xlsx and RQ1.csv; the summary, or None
    without DataSets/params.csv. Not a cached step: it takes a moment, and clusters need not rerun for it."""
    import clusterModule

    layer, images, labels = selected_clusters(case)
    summary = clusterModule.write_rq1(case.dir, images, labels, layer=layer)
    if summary:
        print(clusterModule.format_rq1(summary))      # the report follows with the clusters in words (explain)
    return summary


def explain(case):
    """The clusters in words (-rq True; not a cached step, seconds): with DataSets/params.csv a rule per
    cluster over the parameters (rules.csv), and always a description (descriptions.csv: confusion, medoid).
    Returns the console lines, one per cluster."""
    import explainModule
    import report
    from clusterModule import CLUSTER_ANALYSIS, read_params
    from common.tables import try_read_table
    import pandas as pd

    from testModule import read_results

    layer, images, labels = selected_clusters(case)
    clusters = pd.DataFrame({"image": images, "cluster": labels})
    results = read_results(case.dir / "testResult.csv")
    info = try_read_table(case.t / CLUSTER_ANALYSIS / layer / "cluster_info.csv")
    medoids = dict(zip(info["cluster"], info["medoid"].astype(str))) if info is not None and \
        {"cluster", "medoid"} <= set(info.columns) else None
    neighbours = _nearest_training(case, layer, medoids) if medoids else None
    descriptions = explainModule.describe_clusters(clusters, results, medoids, neighbours)
    params_path = case.datasets / "params.csv"
    rules = None
    if params_path.is_file():
        try:
            rules = explainModule.cluster_rules(read_params(params_path), clusters, results)
        except HUDDError as exc:        # RQ1 has said what is wrong with params.csv; descriptions still help
            print(f"[explain] no rules over {params_path.name}: {exc}")
    explainModule.write_rules(case.t, layer, rules, descriptions)
    report.write_report(case.dir)
    lines = explainModule.format_rules(rules).splitlines() if rules is not None else \
        [f"cluster {r.cluster} ({r.size} images): {r.confusion}" for r in descriptions.itertuples()]
    for line in lines:
        print(f"[explain] {line}")
    return lines


def _nearest_training(case, layer, medoids):
    """{cluster: the training images nearest to its medoid by the selected layer's heatmaps} (one streamed pass)."""
    import numpy as np

    import assignModule
    import explainModule
    from common.data import ImageSet, ImageSpec

    heatmaps = np.load(case.t / "Heatmaps" / f"{layer}.npy", mmap_mode="r")
    row_of = {image: i for i, image in enumerate(_heatmap_layers(case)[1])}
    centres = {c: np.asarray(heatmaps[row_of[m]], dtype=np.float32).ravel() for c, m in medoids.items()
               if m in row_of}
    model, meta = case.model
    train = case.splits["TrainingSet"]
    start = None
    if case.keypoints:
        from testModule import least_peaked_start as start
    batches = assignModule.improvement_heatmaps(model, ImageSet(case.datasets, train.images, ImageSpec.from_meta(meta)),
                                                layer, case.options.batch_size, case.device, rule=case.options.rule,
                                                workers=case.options.workers, progress=case.options.progress,
                                                start=start)
    return explainModule.nearest_training(centres, batches)


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
    manifest = case.manifest()
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
        manifest = case.manifest()
        manifest["steps"]["robustness"] = {"inputs": inputs, "summary": {},
                                           "outputs": {str(p.relative_to(case.dir)): _fingerprint(p) for p in paths},
                                           "seconds": round(time.time() - started, 2),
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        case.save_manifest(manifest)
    summary = {"curves": rm.describe_curves(curves), "ranges": rm.falling_ranges(curves)}
    if opts.perturb_improvement or opts.perturb_test:
        summary.update(rm.write_perturbed_images(case.datasets, case.splits, ImageSpec.from_meta(meta), curves, names,
                                                 opts.perturb_improvement, opts.perturb_test, opts.seed,
                                                 list(meta["classes"]) if case.keypoints else None, opts.progress))
        case._splits = None
    report.write_report(case.dir)
    return summary


def selected_clusters(case):
    """The best layer and its clusters: (layer, images, cluster labels) from T/ClusterAnalysis."""
    import clusterModule

    layer = clusterModule.best_layer_from_summary(case.t)
    clusters = clusterModule.read_clusters(case.t, layer)
    return layer, clusters["image"].tolist(), clusters["cluster"].to_numpy()


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
                                           quality)
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

class stage:
    """`with stage(case_dir, name) as where:` turns an unexpected exception into an InternalError.

    Its traceback goes to CASE/T/error.log; a HUDDError (the user's input) passes unchanged. Set
    `where.name` as the work moves on, so the message names the step that failed.
    """

    def __init__(self, case_dir, name):
        self.case_dir, self.name = case_dir, name

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or isinstance(exc, (HUDDError, InternalError)) or not isinstance(exc, Exception):
            return False
        raise log_internal_error(self.case_dir, self.name, exc) from exc


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
            last = step or until or STEPS[-1]
            summaries = {}
            for name in STEPS[: STEPS.index(last) + 1]:
                where.name = name
                summaries[name] = run_step(case, name, force=(name == step))
                if name == "clusters" and options.rq:
                    where.name = "rq1"
                    found = rq1(case)
                    if found:
                        summaries[name] = {**summaries[name], "rq1_explained": found["explained_percent"],
                                           "rq1_inspected": found["inspected_percent"], "rq1": found}
                    where.name = "explain"
                    summaries[name] = {**summaries[name], "rules": explain(case)}
            return summaries
        finally:
            case.close()
            case.unlock()


def run_pipeline(case_dir, model_name, options, until="assign"):
    """The pipeline up to `until` (for RQ2.py); returns the step summaries."""
    return run(case_dir, model_name, options, until=until)


def summary_text(case_dir, summaries):
    """The short summary printed at the end of every run."""
    lines = ["", "HUDD summary"]
    test = summaries.get("test")
    if test:
        lines.append(f"  test accuracy        {100 * test['test_accuracy']:.2f}% "
                     f"({test['test_errors']} errors in {test['test_images']} test images)")
        if test.get("mean_error") is not None:
            lines.append(f"  mean keypoint error  {test['mean_error']:.2f} px (accuracy = share of images within "
                         f"the threshold)")
    clusters = summaries.get("clusters")
    if clusters:
        lines.append(f"  best layer           {clusters['best_layer']}  ({clusters['clusters']} root-cause clusters)")
        if clusters.get("rq1_explained") is not None:
            lines.append(f"  RQ1 explained        {clusters['rq1_explained']:.1f}% of clusters; "
                         f"{clusters['rq1_inspected']:.2f}% of error images inspected at 5 per cluster")
        for i, line in enumerate(clusters.get("rules") or []):
            lines.append(f"  {'clusters in words' if i == 0 else '':<20} {line}")
    assign = summaries.get("assign")
    if assign:
        if assign.get("unsafe_precision") is not None:
            lines.append(f"  unsafe set           {assign['unsafe_images']} images, {100 * assign['unsafe_precision']:.0f}% "
                         f"of them errors (improvement set: {100 * assign['base_error_rate']:.0f}%)")
        else:
            lines.append(f"  unsafe set           {assign['unsafe_images']} improvement images to label")
    robust = summaries.get("robustness")
    if robust:
        for i, line in enumerate(robust["curves"]):
            lines.append(f"  {'robustness' if i == 0 else '':<20} {line}")
        if robust.get("improvement_images") is not None:
            lines.append(f"  improvement set      {robust['improvement_images']} perturbed training images "
                         f"(DataSets/ImprovementSet; perturbation and amplitude in DataSets/params.csv)")
        if robust.get("test_copies") is not None:
            lines.append(f"  test set             {robust['test_copies']} perturbed test copies added "
                         f"(DataSets/TestSet/<class>/perturbed/)")
    retrain = summaries.get("retrain")
    if retrain:
        gains = retrain.get("gains") or []
        spread = (f", mean of {len(gains)} repetitions: {', '.join(f'{g:+.2f}' for g in gains)}"
                  if len(gains) > 1 else "")
        lines.append(f"  after retraining     {100 * retrain['test_accuracy']:.2f}% "
                     f"({retrain['mode']}, gain {retrain['gain']:+.2f} points{spread})")
        if retrain.get("mean_error") is not None:
            lines.append(f"  mean keypoint error  {retrain['original_mean_error']:.2f} px before, "
                         f"{retrain['mean_error']:.2f} px after retraining")
    report = Path(case_dir) / "T" / "report.html"
    if report.is_file():
        lines.append(f"  report               {report.resolve()}")
    lines.append(f"  results              {Path(case_dir).resolve() / 'T'}")
    return "\n".join(lines)
