"""Which improvement images a retraining mode labels and adds to the training set (HUDD steps 4 to 6).

HUDD's bootstrap-balanced unsafe set, the paper's random baselines BL1 and BL2, the uncertainty
rankings (GINI, MARGIN, ENTROPY; MC-DROPOUT for keypoints), HUDD-U, and the reference modes NONE and
ALL, each one entry of MODE_REGISTRY; retrainModule trains on what a mode returns.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from common.errors import HUDDError
from selection.uncertainty import CLASS_METHODS, KEYPOINT_METHOD

DEFAULT_BUDGET_FACTOR = 1.0    # baselines label as many images as HUDD (the paper); 0.3 = the original code
DEFAULT_RETRAIN_FACTOR = 1.0   # HUDD retrains on the |c| closest unsafe images per cluster (the original's quota)
ROUND_DIGITS = 9               # factor * n is rounded before ceil so that 0.3 * 10 is 3, not 4
PAD_STREAM = 1                 # padding draws from its own random stream, not the sample's


@dataclass(frozen=True)
class SelectionOptions:
    """The options a mode's images depend on (retrainModule.RetrainOptions adds the training recipe)."""
    budget_factor: float = DEFAULT_BUDGET_FACTOR     # the baselines' labelling budget, times the unsafe set's size
    pad_baselines: bool = True                       # bootstrap a smaller draw up to HUDD's balanced size
    retrain_factor: float = DEFAULT_RETRAIN_FACTOR   # HUDD's images per cluster, times |c|
    hudd_u_score: str = None                         # HUDD-U's uncertainty; None: GINI (MC-DROPOUT for keypoints)


# --- step 6: HUDD's balanced unsafe set, the baselines' draws ------------------------------------

def retrain_quota(size, factor=DEFAULT_RETRAIN_FACTOR):
    """How many of a cluster's first-ranked unsafe images HUDD retrains on: ceil(factor x |c|).

    factor 1 is the original's; the assign step selects 2 x |c| (--assign-factor), all of which the
    engineer labels, so factor 2 retrains on every labelled image instead of half of them.
    """
    if not factor > 0:
        raise HUDDError(f"--retrain-factor {factor}: must be positive (1 = the original's |c| images per cluster, "
                        f"2 = the whole unsafe set at the default --assign-factor)")
    return int(math.ceil(round(factor * size, ROUND_DIGITS)))


def balance_unsafe_set(unsafe, cluster_sizes, seed, factor=DEFAULT_RETRAIN_FACTOR):
    """HUDD's bootstrap balancing (step 6): per cluster its retrain_quota first-ranked images (|c| at the
    original's factor 1), duplicated up to the largest quota.

    Faithful to the original with its bugs fixed: duplicates are drawn (seeded, with replacement)
    with weight 1 - d_i / sum(d), so closer images are repeated more, and exactly up to the target;
    each image stays in its own cluster; a cluster with one image repeats it.
    Returns DataFrame[image, cluster, duplicate], clusters in ascending order.
    """
    quota = {c: retrain_quota(size, factor) for c, size in cluster_sizes.items()}
    rng = np.random.default_rng(seed)
    present = sorted(int(c) for c in unsafe["cluster"].unique())
    unknown = [c for c in present if c not in cluster_sizes]
    if unknown:
        raise HUDDError(f"unsafe set: clusters {unknown[:5]} are not in the selected layer's clusters.csv; "
                        f"rerun the assign step (python HUDD.py -o CASE -step assign)")
    if not present:
        return pd.DataFrame({"image": [], "cluster": [], "duplicate": []})
    target = max(quota[c] for c in present)
    parts = []
    for cluster in present:
        group = unsafe[unsafe["cluster"] == cluster].sort_values("rank", kind="stable")
        group = group.head(quota[cluster])
        kept = list(group["image"])
        distance = group["distance"].to_numpy(dtype=np.float64)
        weights = None
        if len(kept) > 1 and distance.sum() > 0:
            weights = 1.0 - distance / distance.sum()
            weights /= weights.sum()
        extra = target - len(kept)
        duplicates = [kept[i] for i in rng.choice(len(kept), size=extra, replace=True, p=weights)] if extra else []
        parts.append(pd.DataFrame({"image": kept + duplicates, "cluster": cluster,
                                   "duplicate": [False] * len(kept) + [True] * len(duplicates)}))
    return pd.concat(parts, ignore_index=True)


def baseline_budget(n_labelled, factor=DEFAULT_BUDGET_FACTOR):
    """How many improvement images a baseline may label: factor x the number HUDD asked to label."""
    if not factor > 0:
        raise HUDDError(f"--baseline-budget-factor {factor}: must be positive (1 = HUDD's budget, 0.3 = the "
                        f"original code)")
    return int(math.ceil(round(factor * n_labelled, ROUND_DIGITS)))


def draw_bl2(images, budget, seed):
    """BL2: `budget` distinct improvement images drawn uniformly at random."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(budget, len(images)), replace=False)
    return [images[i] for i in sorted(picks)]


def draw_bl1(images, wrong, budget, seed):
    """BL1: the images the original DNN gets wrong among a BL2 draw from the whole improvement set."""
    wrong_of = dict(zip(images, wrong))
    return [image for image in draw_bl2(images, budget, seed) if wrong_of[image]]


def pad_by_bootstrap(images, size, seed):
    """Duplicate uniformly drawn images (seeded) until the list has `size` entries, as the original padded BL1/BL2."""
    if not images or len(images) >= size:
        return list(images)
    picks = np.random.default_rng([seed, PAD_STREAM]).choice(len(images), size=size - len(images), replace=True)
    return list(images) + [images[i] for i in picks]


# --- the modes: what each labels and adds to the training set -------------------------------------

class Candidates(NamedTuple):
    """What a mode chooses its images from."""
    unsafe: pd.DataFrame     # T/UnsafeSet/unsafe.csv: image, cluster, distance, rank
    cluster_sizes: dict      # {cluster: |c|}: the selected layer's root-cause clusters
    improvement: list        # improvement images with a known result (Correct or Wrong), in improveResult.csv order
    wrong: list              # per improvement image: True when the original DNN gets it wrong
    scores: np.ndarray = None    # per improvement image: its uncertainty under the mode's score (higher = less sure)
    distances: tuple = None      # the assign step's (image keys, cluster ids, (M, K) distances), T/UnsafeSet/distances.npz


class ModeImages(NamedTuple):
    """A mode's images in one repetition, keyed by their path relative to DataSets/."""
    labelled: list           # what the engineer labels (the labelling budget spent; precision)
    added: list              # what joins the training set, duplicates included, in order


def hudd_images(candidates, budget, seed, options):
    """HUDD: the engineer labels the whole unsafe set; the balanced unsafe set joins the training set."""
    balanced = balance_unsafe_set(candidates.unsafe, candidates.cluster_sizes, seed, options.retrain_factor)
    return ModeImages(list(candidates.unsafe["image"]), list(balanced["image"]))


def _baseline(sample, candidates, seed, options):
    """A baseline's training images: its sample, padded (with `pad_baselines`) to HUDD's balanced size."""
    balanced = balance_unsafe_set(candidates.unsafe, candidates.cluster_sizes, seed, options.retrain_factor)
    return pad_by_bootstrap(sample, len(balanced), seed) if options.pad_baselines else sample


def bl1_images(candidates, budget, seed, options):
    """BL1: the engineer labels a random draw of `budget` improvement images; its errors join the training set."""
    sample = draw_bl1(list(candidates.improvement), list(candidates.wrong), budget, seed)
    return ModeImages(draw_bl2(list(candidates.improvement), budget, seed), _baseline(sample, candidates, seed, options))


def bl2_images(candidates, budget, seed, options):
    """BL2: the engineer labels a random draw of `budget` improvement images; all of them join the training set."""
    sample = draw_bl2(list(candidates.improvement), budget, seed)
    return ModeImages(list(sample), _baseline(sample, candidates, seed, options))


def uncertain_images(candidates, budget, seed, options):
    """GINI, MARGIN, ENTROPY, MC-DROPOUT: the engineer labels the `budget` most uncertain improvement images
    (ties: the earlier image); all of them join the training set, padded as the baselines' samples."""
    from selection.uncertainty import rank

    sample = [candidates.improvement[i] for i in rank(candidates.scores, budget)]
    return ModeImages(sample, _baseline(sample, candidates, seed, options))


def hudd_u_images(candidates, budget, seed, options):
    """HUDD-U: the engineer labels as many images per cluster as HUDD's unsafe set holds, each cluster's
    candidates most uncertain first; the set is balanced as HUDD's (its first-ranked = most uncertain)."""
    from selection.hudd_u import select_like_unsafe_set
    from selection.uncertainty import align_scores

    keys, cluster_ids, distances = candidates.distances
    scores = align_scores(keys, candidates.improvement, candidates.scores)
    chosen = select_like_unsafe_set(candidates.unsafe, keys, cluster_ids, distances, scores)
    balanced = balance_unsafe_set(chosen, candidates.cluster_sizes, seed, options.retrain_factor)
    return ModeImages(list(chosen["image"]), list(balanced["image"]))


def none_images(candidates, budget, seed, options):
    """NONE, the floor: nothing labelled, nothing added; the training set alone, by the same recipe."""
    return ModeImages([], [])


def all_images(candidates, budget, seed, options):
    """ALL, the ceiling: every improvement image with a known result is labelled and joins the training set,
    as BL2 with an unlimited budget (padded as the baselines' samples when HUDD's balanced set is larger)."""
    sample = list(candidates.improvement)
    return ModeImages(sample, _baseline(sample, candidates, seed, options))


UNSAFE_SET_LABELS = "unsafe set"         # class folders, else the engineer's T/UnsafeSet/labels.csv
IMPROVEMENT_LABELS = "improvement set"   # any improvement image: simulated labelling, needs class folders
NO_LABELS = "none"                       # nothing labelled


def hudd_u_score(options, keypoints):
    """HUDD-U's uncertainty score: --hudd-u-score, else GINI for a classifier and MC-DROPOUT for keypoints."""
    if options.hudd_u_score is not None:
        return options.hudd_u_score
    return KEYPOINT_METHOD if keypoints else "GINI"


class Mode(NamedTuple):
    """A retraining mode: `images(candidates, budget, seed, options)` -> ModeImages (options: SelectionOptions),
    where the labels of its images come from, the uncertainty score it ranks by (`score(options, keypoints)`
    -> a name of selection.uncertainty, or None) and whether it needs the assign step's distances."""
    images: Callable
    labels: str
    score: Callable = None
    distances: bool = False


def _fixed(method):
    return lambda options, keypoints: method


MODE_REGISTRY = {
    "HUDD": Mode(hudd_images, UNSAFE_SET_LABELS),
    "BL1": Mode(bl1_images, IMPROVEMENT_LABELS),
    "BL2": Mode(bl2_images, IMPROVEMENT_LABELS),
    "HUDD-U": Mode(hudd_u_images, IMPROVEMENT_LABELS, hudd_u_score, distances=True),
    **{method: Mode(uncertain_images, IMPROVEMENT_LABELS, _fixed(method)) for method in CLASS_METHODS},
    KEYPOINT_METHOD: Mode(uncertain_images, IMPROVEMENT_LABELS, _fixed(KEYPOINT_METHOD)),
    "NONE": Mode(none_images, NO_LABELS),
    "ALL": Mode(all_images, IMPROVEMENT_LABELS),
}
MODES = tuple(MODE_REGISTRY)
DEFAULT_RQ2_MODES = ("HUDD", "BL1", "BL2")     # the paper's RQ2
REFERENCE_MODES = ("NONE", "ALL")              # RQ2's floor and ceiling rows


def check_mode(mode):
    if mode not in MODE_REGISTRY:
        raise HUDDError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    return MODE_REGISTRY[mode]


def mode_score(mode, keypoints, options=None, model_name="the model"):
    """The uncertainty score `mode` ranks by for this task (None for a mode without one); a score the task
    cannot give is one HUDDError saying what to use instead."""
    entry = check_mode(mode)
    method = entry.score(options or SelectionOptions(), keypoints) if entry.score else None
    if method is None:
        return None
    which = f"-mode {mode}" if method == mode else f"-mode {mode} (--hudd-u-score {method})"
    if method in CLASS_METHODS and keypoints:
        raise HUDDError(f"{which}: {model_name} is a keypoint DNN, whose outputs are not class scores; use -mode "
                        f"{KEYPOINT_METHOD} (the spread over its dropout layers), HUDD-U, HUDD, BL1 or BL2")
    if method == KEYPOINT_METHOD and not keypoints:
        raise HUDDError(f"{which}: {model_name} is a classifier; MC dropout is the keypoint DNNs' uncertainty, use "
                        f"-mode {', '.join(CLASS_METHODS)} (or --hudd-u-score GINI) for class scores")
    if method not in CLASS_METHODS + (KEYPOINT_METHOD,):
        raise HUDDError(f"--hudd-u-score {method!r}: use one of {', '.join(CLASS_METHODS + (KEYPOINT_METHOD,))}")
    return method


def check_modes_for_model(modes, model_path, trust=False, hudd_u_score=None):
    """Refuse, before any step runs, a mode the model cannot serve (GINI on a keypoint DNN, MC-DROPOUT without
    dropout layers), each in one line saying what to use."""
    import models
    import testModule
    from selection.uncertainty import dropout_layers

    needs = [mode for mode in modes if check_mode(mode).score is not None]
    if not needs:
        return
    model, meta = models.load_model(model_path, "cpu", trust=trust)
    keypoints = testModule.is_keypoint_task(meta)
    options = SelectionOptions(hudd_u_score=hudd_u_score)
    for mode in needs:
        if mode_score(mode, keypoints, options, Path(model_path).name) == KEYPOINT_METHOD and not dropout_layers(model):
            raise HUDDError(f"{Path(model_path).name}: has no dropout layer, so -mode {mode} cannot measure its "
                            f"uncertainty by MC dropout; use -mode HUDD, BL1 or BL2 for this keypoint DNN, or "
                            f"train it with dropout")


def mode_images(mode, candidates, seed, options=None):
    """The images `mode` labels and adds in the repetition seeded `seed`, at the baselines' labelling budget
    of `options.budget_factor` x the unsafe set's size."""
    entry = check_mode(mode)
    options = options or SelectionOptions()
    return entry.images(candidates, baseline_budget(len(candidates.unsafe), options.budget_factor), seed, options)
