"""What a selection of improvement images reaches: errors, root-cause clusters, named conditions.

HUDD's argument against an uncertainty ranking is coverage: its unsafe set spreads over every
root-cause cluster, where a ranking may pile onto one frequent cause. These figures measure that for
any selection (HUDD, HUDD-U, BL1/BL2 draws, GINI/MARGIN/ENTROPY rankings) at one labelling budget.
A selection is a list of indices into the improvement set (M images, in one fixed order).
"""
from typing import NamedTuple

import numpy as np
import pandas as pd

from common.errors import HUDDError

COVERAGE_KEYS = ("selected", "labelled", "errors", "precision", "clusters_reached", "clusters", "top_cluster",
                 "top_cluster_share")
CONDITION_COLUMNS = ["condition", "selected", "selected_share", "improvement", "improvement_share", "lift"]
NO_CLUSTER = -1                # an image that reaches no root-cause cluster (not in an assignment table)


def nearest_clusters(distances, cluster_ids):
    """(M,) id of the cluster each improvement image is closest to, from its (M, K) distances to the clusters
    `cluster_ids`; ties go to the lower column, as in the first round of assignModule.greedy_assign."""
    distances = np.asarray(distances, dtype=np.float64)
    cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
    if distances.ndim != 2 or distances.shape[1] != len(cluster_ids) or not len(cluster_ids):
        raise HUDDError(f"cluster distances: expected shape (images, {len(cluster_ids)} clusters), got "
                        f"{distances.shape}; pass the assign step's distances and cluster ids together")
    return cluster_ids[np.argmin(distances, axis=1)] if len(distances) else np.zeros(0, dtype=np.int64)


def assigned_clusters(images, assignment):
    """(M,) cluster that an assignment table (DataFrame[image, cluster], e.g. T/UnsafeSet/unsafe.csv) gives
    each of `images`, NO_CLUSTER for images not in it.

    With HUDD's own table an image that overflowed from a full cluster counts for the cluster it went
    to, not its nearest; nearest_clusters is the rule for every other selection.
    """
    where = dict(zip(assignment["image"], assignment["cluster"].astype(np.int64)))
    return np.array([where.get(image, NO_CLUSTER) for image in images], dtype=np.int64)


def _check_selection(selected, m):
    selected = np.asarray(selected)
    if selected.ndim != 1 or (selected.size and not np.issubdtype(selected.dtype, np.integer)):
        raise HUDDError(f"selection: expected a list of image indices, got an array of shape {selected.shape} "
                        f"and type {selected.dtype}")
    if selected.size and (selected.min() < 0 or selected.max() >= m):
        raise HUDDError(f"selection: index {selected.min() if selected.min() < 0 else selected.max()} is outside "
                        f"the improvement set's {m} images")
    if len(np.unique(selected)) != len(selected):
        raise HUDDError("selection: an image is listed twice; a labelling budget counts distinct images")
    return selected.astype(np.int64)


def coverage(selected, reached, clusters, wrong=None):
    """Coverage of one selection, {COVERAGE_KEYS}.

    selected: indices into the improvement set; reached (M,): the root-cause cluster each improvement
    image reaches (nearest_clusters or assigned_clusters; NO_CLUSTER for none); clusters: the ids of
    all root-cause clusters images can reach; wrong (M,): 1 where the DNN gets the image wrong, 0 where
    it gets it right, NaN where unlabelled (None: nothing labelled).
    selected = number of images; labelled, errors: among them, those with a label and those wrong;
    precision = errors / labelled; clusters_reached = distinct clusters reached by the selection, of
    `clusters` in all; top_cluster = the cluster reached by most selected images (ties: the lower id),
    top_cluster_share = its images / selected. NaN (top_cluster NO_CLUSTER) where undefined.
    """
    reached = np.asarray(reached, dtype=np.int64)
    clusters = np.unique(np.asarray(clusters, dtype=np.int64))
    unknown = np.setdiff1d(reached, np.append(clusters, NO_CLUSTER))
    if unknown.size:
        raise HUDDError(f"coverage: images reach clusters {unknown[:5].tolist()} that are not among the root-cause "
                        f"clusters {clusters[:10].tolist()}; pass the cluster ids of the same assign step")
    selected = _check_selection(selected, len(reached))
    if wrong is None:
        labels = np.full(len(selected), np.nan)
    else:
        wrong = np.asarray(wrong, dtype=np.float64)
        if wrong.shape != reached.shape:
            raise HUDDError(f"coverage: {wrong.size} error flags for {reached.size} improvement images")
        labels = wrong[selected]
    known = labels[~np.isnan(labels)]
    hit = reached[selected]
    ids, counts = np.unique(hit[hit != NO_CLUSTER], return_counts=True)
    top = int(np.argmax(counts)) if counts.size else None
    return {"selected": int(len(selected)), "labelled": int(known.size), "errors": int(known.sum()),
            "precision": float(known.mean()) if known.size else float("nan"),
            "clusters_reached": int(ids.size), "clusters": int(clusters.size),
            "top_cluster": int(ids[top]) if top is not None else NO_CLUSTER,
            "top_cluster_share": float(counts[top] / len(selected)) if top is not None else float("nan")}


def condition_columns(params):
    """The columns of a parameter table that name conditions: every value 0 or 1, at least one 1."""
    found = []
    for column in params.columns:
        if column == "image":
            continue
        values = pd.to_numeric(params[column], errors="coerce")
        if values.isin((0, 1)).all() and (values == 1).any():
            found.append(column)
    return found


def condition_shares(params, images, selected, conditions=None, source="params.csv"):
    """Share of each condition in the selection against the improvement set: DataFrame[CONDITION_COLUMNS].

    params: the parameter table (DataFrame with an image column, DataSets/params.csv read by
    common.tables.read_table); images (M,): the improvement set's keys; selected: indices into it;
    conditions: the 0/1 columns to count (None: condition_columns(params)). Per condition: selected
    = images of the selection in it, selected_share = selected / selection size, improvement and
    improvement_share the same over the improvement set, lift = selected_share / improvement_share.
    """
    if "image" not in params.columns:
        raise HUDDError(f"{source}: no image column; write one row per image with its path under DataSets/")
    if params["image"].duplicated().any():
        raise HUDDError(f"{source}: image {params['image'][params['image'].duplicated()].iloc[0]} appears twice; "
                        f"keep one row per image")
    table = params.set_index("image")
    missing = [i for i in images if i not in table.index]
    if missing:
        raise HUDDError(f"{source}: no row for {len(missing)} improvement images (first: {missing[0]}); add their "
                        f"parameters or rebuild the case")
    columns = condition_columns(params) if conditions is None else list(conditions)
    for column in columns:
        if column not in table.columns:
            raise HUDDError(f"{source}: no condition column {column!r}; name one of its 0/1 columns")
        values = pd.to_numeric(table[column], errors="coerce")
        if not values.isin((0, 1)).all():
            bad = table[column][~values.isin((0, 1))]
            raise HUDDError(f"{source}: condition column {column!r} holds {bad.iloc[0]!r} (image {bad.index[0]}); "
                            f"write 1 for an image in the condition and 0 otherwise")
    selected = _check_selection(selected, len(images))
    flags = table.loc[list(images), columns].apply(pd.to_numeric).to_numpy(dtype=np.int64).reshape(len(images), -1)
    chosen = flags[selected]
    rows = []
    for j, column in enumerate(columns):
        in_selection, in_improvement = int(chosen[:, j].sum()), int(flags[:, j].sum())
        selected_share = in_selection / len(selected) if len(selected) else float("nan")
        improvement_share = in_improvement / len(images) if len(images) else float("nan")
        rows.append({"condition": column, "selected": in_selection, "selected_share": selected_share,
                     "improvement": in_improvement, "improvement_share": improvement_share,
                     "lift": selected_share / improvement_share if improvement_share else float("nan")})
    return pd.DataFrame(rows, columns=CONDITION_COLUMNS)


# --- the coverage columns of a retraining row ------------------------------------------------------

COLUMNS = ["clusters_reached", "clusters", "top_cluster", "top_cluster_share"]   # appended to each retrain row
CONDITION_PREFIX = "condition_"    # params.csv: a named condition is a 0/1 column condition_<name>
SHARE, BASE_SHARE = "share_", "base_share_"   # + <name>: of the selection, of the improvement set


class CoverageBasis(NamedTuple):
    """What every selection of one case is measured against (coverage_basis)."""
    images: list                  # the improvement set's keys (the assign step's order when it saved distances)
    reached: np.ndarray | None    # (M,) the cluster each image is closest to; None without the assign step's distances
    clusters: np.ndarray | None   # the ids of the clusters images can reach
    wrong: np.ndarray             # (M,) 1 wrong, 0 right, NaN unknown
    params: pd.DataFrame | None   # params.csv when it names conditions for every image of `images`
    conditions: list              # its condition_<name> columns


def coverage_basis(images, wrong_of, distances=None, params=None, source="params.csv"):
    """The CoverageBasis of an improvement set: `distances` = (keys, cluster ids, (M, K)) of the assign step
    (its keys replace `images`), `wrong_of` {image: wrong}, `params` the parameter table or None.

    A params table without a row for some improvement image gives no condition shares (a note says so);
    a condition_<name> column that is not 0/1 is one HUDDError naming it.
    """
    reached = clusters = None
    if distances is not None:
        images, clusters, matrix = distances
        reached = nearest_clusters(matrix, clusters)
    images = list(images)
    wrong = np.array([float(wrong_of[i]) if i in wrong_of else np.nan for i in images])
    columns = [] if params is None else [c for c in params.columns if str(c).startswith(CONDITION_PREFIX)]
    if columns and "image" in params.columns:
        missing = len(set(images) - set(params["image"]))
        if missing:
            print(f"[coverage] {source}: no row for {missing} of {len(images)} improvement images; no condition "
                  f"shares")
            columns = []
        else:
            condition_shares(params, images, [], columns, source)      # validates the columns once, here
    return CoverageBasis(images, reached, clusters, wrong, params if columns else None, columns)


def selection_columns(labelled, basis):
    """{COLUMNS + share_<name>, base_share_<name> per condition} of the selection `labelled` (image keys).

    clusters_reached counts the clusters the selected images are closest to (NaN, like the rest of
    COLUMNS, without the assign step's distances); share_<name> is the share of the selection in
    condition <name>, base_share_<name> that of the improvement set."""
    where = {image: i for i, image in enumerate(basis.images)}
    selected = np.array([where[i] for i in labelled if i in where], dtype=np.int64)
    row = dict.fromkeys(COLUMNS, float("nan"))
    if basis.reached is not None:
        found = coverage(selected, basis.reached, basis.clusters, basis.wrong)
        row.update({key: found[key] for key in COLUMNS})
    if basis.conditions:
        shares = condition_shares(basis.params, basis.images, selected, basis.conditions)
        for condition, share, base in zip(shares["condition"], shares["selected_share"], shares["improvement_share"]):
            name = condition[len(CONDITION_PREFIX):]
            row[SHARE + name], row[BASE_SHARE + name] = share, base
    return row
