"""HUDD step 7: retraining in a mode, repeated with the same seeds in every mode.

A mode (selection.modes.MODE_REGISTRY: HUDD's balanced unsafe set, the baselines, ...) names the improvement
images the engineer labels and those added to the training set; retrain reads the case folder once (read_retraining_case), asks the mode for its images per
repetition and trains on them (training/). Beside HUDD and the paper's random baselines: the
uncertainty rankings an engineer would try first (GINI, MARGIN, ENTROPY; MC-DROPOUT for keypoints),
HUDD-U (HUDD's per-cluster counts, most uncertain first), and the reference rows NONE (no added
image: what the extra epochs give) and ALL (the whole labelled improvement set). Every row says
what its selection covers (selection.coverage). RQ2's statistics and repetitions live in evaluation/.
"""
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.data import ImageSet, ImageSpec, list_case, resolve_device
from common.errors import HUDDError
from common.files import write_csv
from common.tables import read_table, try_read_table
from evaluation import rq2_runs
from evaluation.resume import earlier_history, finished_reps, inputs_digest
from selection import coverage as selection_coverage
from selection.uncertainty import CLASS_METHODS
from selection.modes import (DEFAULT_BUDGET_FACTOR, DEFAULT_RETRAIN_FACTOR, DEFAULT_RQ2_MODES,  # noqa: F401
                             IMPROVEMENT_LABELS, MODE_REGISTRY, MODES, NO_LABELS, PAD_STREAM, REFERENCE_MODES,
                             ROUND_DIGITS, UNSAFE_SET_LABELS, Candidates, Mode, ModeImages, SelectionOptions,
                             all_images, balance_unsafe_set, baseline_budget, bl1_images, bl2_images, check_mode,
                             check_modes_for_model, draw_bl1, draw_bl2, hudd_images, hudd_u_images, hudd_u_score,
                             mode_images, mode_score, none_images, pad_by_bootstrap, retrain_quota, uncertain_images)
# Names the callers of this module import from it (the loops, RQ2's statistics), kept where they were.
from evaluation.rq2_runs import threads_per_job  # noqa: F401
from evaluation.statistics import a12, mann_whitney_p, retrain_summary, rq2_table, write_rq2  # noqa: F401
from training import (DEFAULT_SCHEDULE, FROZEN_CONVS, GAUSSIAN_SCALE, GAUSSIAN_SIGMA, HISTORY_CURVES,  # noqa: F401
                      SCHEDULES, SELECTIONS, accuracy, adam, best_epoch, freeze_convolutions, gaussian_targets,
                      rmsprop, scheduler as _scheduler, seed_everything, sgd, train_classifier, train_keypoints,
                      write_history_plot)
from training.recipe import (DEFAULT_EPOCHS, DEFAULT_HOLDOUT, RETRAIN_BATCH_SIZE, Recipe, holdout_split,  # noqa: F401
                             save_retrained, task_selection, test_by_recipe, train_by_recipe)

RETRAIN_COLUMNS = ["mode", "rep", "seed", "n_labelled", "labelled_errors", "precision", "base_error_rate",
                   "n_train_added", "n_distinct_added", "epochs", "best_epoch", "test_accuracy", "original_accuracy",
                   "gain", "improved", "worsened", "improved_per_cluster", "model", "inputs",
                   *selection_coverage.COLUMNS]
KEYPOINT_COLUMNS = ["mean_error", "original_mean_error", "share_under_threshold", "threshold"]   # px, px, fraction, px


@dataclass(frozen=True)
class RetrainOptions(Recipe, SelectionOptions):
    """retrain's keyword options: the training Recipe, and the options a mode's images depend on."""
    trust: bool = False

    def digest(self, keypoints):
        """The options a repetition's result depends on, as the `inputs` digest has always named them."""
        options = dict(epochs=self.epochs, select=self.select, holdout=self.holdout, budget_factor=self.budget_factor,
                       pad_baselines=self.pad_baselines, batch_size=self.batch_size, threshold=self.threshold,
                       freeze=self.freeze if keypoints else None, lr=self.lr, schedule=self.schedule)
        if self.retrain_factor != DEFAULT_RETRAIN_FACTOR:     # only when changed: earlier runs still resume
            options["retrain_factor"] = self.retrain_factor
        if self.hudd_u_score is not None:
            options["hudd_u_score"] = self.hudd_u_score
        return options


def rep_seed(seed, rep):
    """The seed of repetition `rep`: the same for every mode, different for every repetition."""
    return int(np.random.SeedSequence([int(seed), int(rep)]).generate_state(1)[0])


def retraining_images(mode, unsafe, cluster_sizes, improvement, wrong, seed, budget_factor=DEFAULT_BUDGET_FACTOR,
                      pad_baselines=True, retrain_factor=DEFAULT_RETRAIN_FACTOR):
    """The improvement images a repetition adds to the training set (with duplicates), and how many were labelled.

    HUDD: the balanced unsafe set (retrain_factor x |c| images per cluster); the engineer labelled the
    whole unsafe set. BL1/BL2: a fresh draw of baseline_budget(len(unsafe)) images for this seed; with
    `pad_baselines` (the original) a draw smaller than HUDD's balanced set is bootstrapped up to its
    size, so no mode adds fewer training images.
    """
    options = RetrainOptions(budget_factor=budget_factor, pad_baselines=pad_baselines, retrain_factor=retrain_factor)
    picked = mode_images(mode, Candidates(unsafe, cluster_sizes, list(improvement), list(wrong)), seed, options)
    return picked.added, len(picked.labelled)


# --- the case folder, read once ---------------------------------------------------------------------

@dataclass(frozen=True)
class RetrainingCase:
    """Everything a retraining run needs from the case folder (read_retraining_case)."""
    case_dir: Path
    model_path: Path         # the analysed model: every repetition starts from its weights
    meta: dict               # the analysed model file's metadata
    keypoints: bool          # a keypoint regressor (task "keypoints"), else a classifier
    classes: list            # class names, or keypoint names for a regressor
    train_images: list
    train_labels: list       # class names, or (K, 2) keypoints
    test_images: list        # testResult.csv's order
    test_labels: list
    was_correct: np.ndarray  # per test image: the original DNN gets it right
    original_mean_error: float   # keypoints: testResult.csv's mean avg_error (px); NaN for a classifier
    members: pd.DataFrame    # image, cluster: the selected layer's root-cause clusters
    candidates: Candidates
    label_of: dict           # {improvement image: label} from the mode's label source
    wrong_of: dict           # {improvement image: the original DNN gets it wrong}, images with a known result
    spec: ImageSpec          # how the model reads an image
    coverage: selection_coverage.CoverageBasis = None   # what each selection's coverage columns are measured against

    @property
    def original_accuracy(self):
        return float(self.was_correct.mean())

    @property
    def base_error_rate(self):
        """The share of the improvement images with a known result that the original DNN gets wrong."""
        return float(np.mean(list(self.wrong_of.values()))) if self.wrong_of else float("nan")

    def target(self, label):
        """A label as the training loss wants it: a class index, or the keypoints themselves."""
        return label if self.keypoints else self.classes.index(label)

    def dataset(self, images, labels):
        return ImageSet(self.case_dir / "DataSets", images, self.spec, [self.target(label) for label in labels])


def read_cluster_members(case_dir):
    """The selected layer's clusters: DataFrame[image, cluster] of the test error images, from T/ClusterAnalysis/."""
    import clusterModule

    t_dir = Path(case_dir) / "T"
    frame = clusterModule.read_summary(t_dir)
    selected = frame[frame["selected"].astype(str).str.lower() == "true"]["layer"].tolist()
    if len(selected) != 1:
        raise HUDDError(f"{t_dir / 'ClusterAnalysis' / 'summary.csv'}: {len(selected)} layers marked selected; "
                        f"rerun the clusters step")
    return clusterModule.read_clusters(t_dir, selected[0])


def read_unsafe(case_dir):
    return read_table(Path(case_dir) / "T" / "UnsafeSet" / "unsafe.csv", required=("image", "cluster", "distance", "rank"),
                      missing_hint="run the assign step first (python HUDD.py -o CASE -step assign)")


def _split_labels(split):
    """{image: its label} of a split's labelled images."""
    return {i: label for i, label in zip(split.images, split.labels) if label is not None}


def _unsafe_labels(case_dir, unsafe, improvement, classes, keypoints):
    """Labels of the unsafe set: the class folders (simulated step 5) or the engineer's T/UnsafeSet/labels.csv;
    keypoints: the rows of DataSets/ImprovementSet/labels.csv, which the engineer extends in step 5."""
    import assignModule

    if keypoints:
        label_of = _split_labels(improvement)
        todo = [i for i in unsafe["image"] if i not in label_of]
        if todo:
            raise HUDDError(f"{Path(case_dir) / 'DataSets' / 'ImprovementSet' / 'labels.csv'}: no keypoints for "
                            f"{len(todo)} unsafe-set images (first: {todo[0]}); add their rows (image,<keypoint>_x,"
                            f"<keypoint>_y,...) for the images of T/UnsafeSet/unsafe.csv, then rerun -step retrain")
        return {i: label_of[i] for i in unsafe["image"]}
    if not improvement.labelled:
        return assignModule.read_labels(Path(case_dir) / "T", classes)
    label_of = dict(zip(improvement.images, improvement.labels))
    gone = [i for i in unsafe["image"] if i not in label_of]
    if gone:
        raise HUDDError(f"T/UnsafeSet/unsafe.csv: {len(gone)} images are no longer in DataSets/ImprovementSet "
                        f"(first: {gone[0]}); rerun the assign step")
    return {i: label_of[i] for i in unsafe["image"]}


def _improvement_labels(case_dir, mode, improvement, improved, keypoints):
    """Labels of every improvement image with a result, for a mode that simulates labelling any of them."""
    import testModule

    if not improvement.labelled:
        what = "random" if mode in ("BL1", "BL2") else "the"
        raise HUDDError(f"{Path(case_dir) / 'DataSets' / 'ImprovementSet'}: {mode} simulates labelling {what} "
                        f"improvement images it picks, so it needs the improvement set in class folders; use -mode "
                        f"HUDD (or NONE) for a flat set")
    if improved is None:
        improved = testModule.read_results(Path(case_dir) / "improveResult.csv")    # raises: run the test step
    return _split_labels(improvement) if keypoints else dict(zip(improved["image"], improved["expected"]))


def _read_splits(case_dir, meta, model_path):
    """(splits, classes) of the model's task: class folders or keypoint labels.csv files."""
    import testModule

    need = ("TrainingSet", "TestSet", "ImprovementSet")
    if testModule.is_keypoint_task(meta):
        classes = list(meta["classes"])
        return testModule.list_keypoint_case(case_dir, classes, need=need), classes
    splits = list_case(case_dir, need=need)
    return splits, testModule.check_classes(meta, splits, model_path)


def _mode_scores(case_dir, method, images, classes, model_path, spec, options):
    """(len(images),) uncertainty of each image under `method`: from improveResult.csv's class columns, or
    (MC-DROPOUT) from seeded dropout passes of the model over the images."""
    import models
    from selection import uncertainty

    if method in CLASS_METHODS:
        scored, scores = uncertainty.results_scores(Path(case_dir) / "improveResult.csv", method, classes)
        return uncertainty.align_scores(images, scored, scores)
    model, _ = models.load_model(model_path, options.device, trust=options.trust)
    dataset = ImageSet(Path(case_dir) / "DataSets", images, spec)
    scores, _ = uncertainty.mc_dropout_spread(model, dataset, options.device, batch_size=options.batch_size,
                                              workers=options.workers, progress=options.progress,
                                              model_name=Path(model_path).name)
    return scores


def _coverage_basis(case_dir, images, wrong_of, distances):
    params_csv = Path(case_dir) / "DataSets" / "params.csv"
    params = read_table(params_csv) if params_csv.is_file() else None
    return selection_coverage.coverage_basis(images, wrong_of, distances, params, str(params_csv))


def read_retraining_case(case_dir, model_path, mode, trust=False, options=None):
    """Read once what `mode` retrains on and what its result rows compare against: the model's metadata,
    the splits and their labels, the unsafe set and clusters, the test and improvement results, the
    mode's uncertainty scores and the assign step's distances (RetrainOptions `options`: HUDD-U's score,
    and the device of an MC-dropout pass)."""
    import assignModule
    import models
    import testModule

    entry = check_mode(mode)
    options = options or RetrainOptions(trust=trust)
    case_dir = Path(case_dir)
    _, meta = models.load_model(model_path, "cpu", trust=trust)
    keypoints = testModule.is_keypoint_task(meta)
    method = mode_score(mode, keypoints, options, Path(model_path).name)
    splits, classes = _read_splits(case_dir, meta, model_path)
    unsafe, members = read_unsafe(case_dir), read_cluster_members(case_dir)
    tested = testModule.read_results(case_dir / "testResult.csv")
    improve_csv = case_dir / "improveResult.csv"
    improved = testModule.read_results(improve_csv) if improve_csv.is_file() else None
    known = pd.DataFrame({"image": [], "result": []}) if improved is None else \
        improved[improved["result"].isin(["Correct", "Wrong"])]
    wrong = (known["result"] == "Wrong").tolist()
    improvement = splits["ImprovementSet"]
    if entry.labels == UNSAFE_SET_LABELS:
        label_of = _unsafe_labels(case_dir, unsafe, improvement, classes, keypoints)
    elif entry.labels == IMPROVEMENT_LABELS:
        label_of = _improvement_labels(case_dir, mode, improvement, improved, keypoints)
    else:
        label_of = {}
    distances = assignModule.read_distances(case_dir / "T")
    if entry.distances and distances is None:
        raise HUDDError(f"{case_dir / 'T' / 'UnsafeSet' / assignModule.DISTANCES_FILE}: missing; -mode {mode} needs "
                        f"the assign step's distances of every improvement image, so rerun the assign step "
                        f"(python HUDD.py -o CASE -step assign)")
    spec = ImageSpec.from_meta(meta)
    scores = None if method is None else _mode_scores(case_dir, method, list(known["image"]), classes, model_path,
                                                      spec, options)
    test_images = list(tested["image"])
    if keypoints:
        test_label_of = _split_labels(splits["TestSet"])
        test_labels = [test_label_of[i] for i in test_images]
    else:
        test_labels = list(tested["expected"])
    return RetrainingCase(
        case_dir=case_dir, model_path=Path(model_path), meta=meta, keypoints=keypoints, classes=classes,
        train_images=list(splits["TrainingSet"].images), train_labels=list(splits["TrainingSet"].labels),
        test_images=test_images, test_labels=test_labels, was_correct=(tested["result"] == "Correct").to_numpy(),
        original_mean_error=float(tested["avg_error"].astype(float).mean()) if keypoints else float("nan"),
        members=members, candidates=Candidates(unsafe, members["cluster"].value_counts().to_dict(),
                                               list(known["image"]), wrong, scores, distances),
        label_of=label_of, wrong_of=dict(zip(known["image"], wrong)), spec=spec,
        coverage=_coverage_basis(case_dir, list(known["image"]), dict(zip(known["image"], wrong)), distances))


# --- step 7: retraining --------------------------------------------------------------------------

def retrain(case_dir, model_path, mode="HUDD", *, reps=1, seed=0, resume=False, bar_position=None, **options):
    """HUDD step 7 (or a baseline), `reps` times: retrain the analysed model on the training set + the mode's images.

    `options` are RetrainOptions. Each repetition starts from the model file's weights and trains by
    the Recipe (SGD lr 1e-3, momentum 0.9, weight decay 5e-4; a keypoint regressor: the original's
    retrainKP), keeping the best epoch by `select`. Every epoch goes to T/retrain_<mode>_history.csv
    (+ .png). Saves DNNModels/<mode>_<rep>_<test accuracy %>.pth and T/retrain_<mode>.csv
    (RETRAIN_COLUMNS, a row per repetition written after each; test_accuracy a fraction, gain in points,
    improved/worsened against testResult.csv, precision = share of the mode's labelled images the
    original DNN gets wrong; a keypoint DNN's test_accuracy is the share within `threshold` px, with
    KEYPOINT_COLUMNS; then what the labelled images cover: selection.coverage.COLUMNS and a
    share_<name>, base_share_<name> per condition of params.csv). Returns that table.

    resume: keep the rows of an earlier T/retrain_<mode>.csv with the same seed and inputs (column
    `inputs`: a digest of the model file, training set, clusters, unsafe set, labels and options) whose
    model file is still there, and train only the other repetitions (RQ2.py).
    """
    import testModule

    check_mode(mode)
    opts = RetrainOptions(**options)
    opts.check()
    if reps < 1 or opts.epochs < 1:
        raise HUDDError(f"reps={reps}, epochs={opts.epochs}: both must be at least 1")
    retrain_quota(1, opts.retrain_factor)
    opts = replace(opts, device=resolve_device(opts.device))
    case = read_retraining_case(case_dir, model_path, mode, trust=opts.trust, options=opts)
    opts = replace(opts, threshold=testModule.DEFAULT_THRESHOLD if opts.threshold is None else float(opts.threshold))
    inputs = inputs_digest(case.case_dir, model_path, mode, **opts.digest(case.keypoints), **_mode_inputs(case, mode))
    out_csv, history_csv = (case.case_dir / "T" / f"retrain_{mode}{suffix}.csv" for suffix in ("", "_history"))
    columns = _columns(case)
    earlier = finished_reps(out_csv, inputs, case.case_dir) if resume else {}
    old_history = try_read_table(history_csv) if resume else None
    test_set = case.dataset(case.test_images, case.test_labels)
    rows, histories = [], []
    for rep in range(1, reps + 1):
        seed_r = rep_seed(seed, rep)
        picked = mode_images(mode, case.candidates, seed_r, opts)
        covered = selection_coverage.selection_columns(picked.labelled, case.coverage)
        if earlier.get((rep, seed_r)) is not None:
            rows.append({**earlier[(rep, seed_r)], **covered})
            histories += earlier_history(old_history, rep, inputs)
            print(f"[retrain] {mode} repetition {rep}/{reps} finished in an earlier run ({rows[-1]['model']}); kept")
            write_csv(out_csv, pd.DataFrame(rows, columns=columns))
            continue
        row, history = retrain_once(case, picked, mode, rep, seed_r, opts, test_set,
                                    desc=f"{mode} rep {rep}/{reps}", position=bar_position)
        rows.append(dict(row, inputs=inputs, **covered))
        histories += [{"mode": mode, "rep": rep, **h, "kept": h["epoch"] == row["best_epoch"], "inputs": inputs}
                      for h in history]
        write_csv(history_csv, pd.DataFrame(histories))
        write_history_plot(pd.DataFrame(histories), history_csv.with_suffix(".png"), case.original_accuracy)
        write_csv(out_csv, pd.DataFrame(rows, columns=columns))
    return pd.DataFrame(rows, columns=columns)


def _columns(case):
    """A retrain row's columns: RETRAIN_COLUMNS (the keypoint columns before the coverage ones), then a
    share_<name> and base_share_<name> per condition of params.csv."""
    base = RETRAIN_COLUMNS[:-len(selection_coverage.COLUMNS)]
    conditions = [prefix + c[len(selection_coverage.CONDITION_PREFIX):] for c in case.coverage.conditions
                  for prefix in (selection_coverage.SHARE, selection_coverage.BASE_SHARE)]
    return base + (KEYPOINT_COLUMNS if case.keypoints else []) + selection_coverage.COLUMNS + conditions


def _mode_inputs(case, mode):
    """What a new mode's result depends on beyond the digest's usual inputs: the distances HUDD-U orders by."""
    import assignModule
    from common.files import content_hash

    if not check_mode(mode).distances:
        return {}
    return {"distances": content_hash(case.case_dir / "T" / "UnsafeSet" / assignModule.DISTANCES_FILE)}


def retrain_once(case, picked, mode, rep, seed, opts, test_set, desc="retrain", position=None):
    """One repetition: train the model file's weights on the training set + `picked.added`, test, save.

    Takes everything from `case` (read_retraining_case) and `picked` (the mode's ModeImages); returns
    (its result row without `inputs`, the training history)."""
    import models

    train_set, val_set = _training_sets(case, picked.added, seed, opts)
    model, _ = models.load_model(case.model_path, opts.device, trust=opts.trust)
    history = train_by_recipe(model, train_set, opts, keypoints=case.keypoints, seed=seed, val_set=val_set,
                              test_set=test_set, desc=desc, position=position)
    now_correct, errors = test_by_recipe(model, test_set, opts, keypoints=case.keypoints)
    test_accuracy = float(now_correct.mean())
    select = task_selection(opts.select, case.keypoints)
    best = best_epoch(history, select)
    info = {"mode": mode, "rep": rep, "seed": seed, "epochs": opts.epochs, "best_epoch": best, "select": select}
    if case.keypoints:
        info.update(frozen_convolutions=int(opts.freeze), threshold=opts.threshold)
    saved = _save_retrained(case, model, mode, rep, test_accuracy, info)
    known = [case.wrong_of[i] for i in picked.labelled if i in case.wrong_of]
    labelled_errors = int(sum(known)) if known else None
    improved = [img for img, a, b in zip(case.test_images, case.was_correct, now_correct) if not a and b]
    row = {"mode": mode, "rep": rep, "seed": seed, "n_labelled": len(picked.labelled),
           "labelled_errors": labelled_errors, "precision": labelled_errors / len(known) if known else float("nan"),
           "base_error_rate": case.base_error_rate, "n_train_added": len(picked.added),
           "n_distinct_added": len(set(picked.added)), "epochs": opts.epochs, "best_epoch": best,
           "test_accuracy": test_accuracy, "original_accuracy": case.original_accuracy,
           "gain": 100 * (test_accuracy - case.original_accuracy), "improved": len(improved),
           "worsened": int((case.was_correct & ~now_correct).sum()),
           "improved_per_cluster": _per_cluster(improved, case.members), "model": saved.name}
    if case.keypoints:
        row.update({"mean_error": float(np.nanmean(errors)), "original_mean_error": case.original_mean_error,
                    "share_under_threshold": test_accuracy, "threshold": opts.threshold})
    return row, history


def _training_sets(case, added, seed, opts):
    """(the training set + `added`, the held-out share of the training set or None)."""
    fit, held = holdout_split(len(case.train_images), opts, seed)
    val_set = None if held is None else case.dataset([case.train_images[i] for i in held],
                                                     [case.train_labels[i] for i in held])
    images, labels = [case.train_images[i] for i in fit], [case.train_labels[i] for i in fit]
    return case.dataset(images + list(added), labels + [case.label_of[i] for i in added]), val_set


def _save_retrained(case, model, mode, rep, test_accuracy, info):
    """Save DNNModels/<mode>_<rep>_<accuracy>.pth with the original's metadata; drop this rep's older file."""
    folder = case.case_dir / "DNNModels"
    target = save_retrained(folder / f"{mode}_{rep}_{100 * test_accuracy:.2f}.pth", model, case.meta,
                            case.model_path.name, info)
    pattern = re.compile(rf"^{re.escape(mode)}_{rep}_\d+(\.\d+)?\.pth$")
    for old in folder.glob(f"{mode}_{rep}_*.pth"):
        if pattern.match(old.name) and old != target and old.resolve() != case.model_path.resolve():
            old.unlink()
    return target


def _per_cluster(improved_images, members):
    improved = set(improved_images)
    counts = members.assign(hit=members["image"].isin(improved)).groupby("cluster")["hit"].sum()
    return ";".join(f"{int(c)}:{int(n)}" for c, n in counts.items())


def run_rq2(case_dir, model_path, modes=DEFAULT_RQ2_MODES, reps=10, jobs=1, threads=None, **options):
    """RQ2 over these modes and this retraining step (evaluation.rq2_runs.run_rq2). Returns (table, results)."""
    return rq2_runs.run_rq2(case_dir, model_path, modes, reps, jobs, threads, retrain=retrain, known_modes=MODES,
                            **options)
