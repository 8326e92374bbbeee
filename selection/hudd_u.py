"""HUDD-U: HUDD's unsafe set with the same number of images per root-cause cluster, each cluster's
candidates taken most uncertain first instead of closest first.

HUDD's assignment (assignModule.greedy_assign) works in rounds: in round r every still unassigned
improvement image is a candidate of its r-th nearest cluster (single-linkage distance), and within
the round candidates are taken closest first while their cluster is under its quota. HUDD-U keeps
those rounds and candidates and changes one thing: within a round, the most uncertain candidate is
taken first (ties: the earlier image). Its quota per cluster is the number of images HUDD's own
assignment puts there, so both ask the engineer to label the same count per cluster. It is HUDD's own
greedy_assign, run over stand-in distances (round_order) that keep each image's order of clusters
and order each round by uncertainty; the true distances are written back into the result.

Why the counts are exactly equal: HUDD assigns sum(q_c) <= M images; HUDD-U gets q_c = HUDD's count.
Were a cluster c short at the end, it was short whenever an image was offered to it, so it took
every image offered; an image still unassigned at the end was offered to every cluster over the K
rounds, c included, so none would be left: all M images assigned, yet with c short fewer than
sum(q_c) <= M are. So every cluster ends at its quota.
"""
import numpy as np

from assignModule import DEFAULT_FACTOR, greedy_assign, select_closest
from common.errors import HUDDError
from selection.uncertainty import rank


def round_order(distances, scores):
    """(M, K) stand-in distances under which assignModule.greedy_assign runs HUDD-U.

    The value of image i at its r-th nearest cluster is r * M + (i's place when all images are ranked
    most uncertain first, ties to the earlier image). Each row keeps the order of its clusters (ties
    to the lower column, as greedy_assign's stable sort), and within every round the candidates come
    most uncertain first. Values stay below K * M, exact in float64.
    """
    m, k = distances.shape
    nearest_first = np.argsort(distances, axis=1, kind="stable")
    place = np.empty(m, dtype=np.float64)
    place[rank(scores)] = np.arange(m)
    stand_in = np.empty((m, k), dtype=np.float64)
    np.put_along_axis(stand_in, nearest_first, np.arange(k)[None, :] * float(m) + place[:, None], axis=1)
    return stand_in


def cluster_counts(unsafe, cluster_ids):
    """{cluster id: number of images of `unsafe` in it} for every id of `cluster_ids` (0 when absent)."""
    counts = unsafe["cluster"].value_counts()
    return {int(c): int(counts.get(int(c), 0)) for c in cluster_ids}


def select_uncertain_first(keys, cluster_ids, distances, scores, cluster_labels, factor=DEFAULT_FACTOR):
    """HUDD-U's unsafe set: DataFrame[image, cluster, distance, rank], the layout of
    assignModule.select_closest, with the same number of images per cluster as select_closest.

    keys (M,), cluster_ids (K,), distances (M, K): the assign step's (assignModule.cluster_distances);
    scores (M,): uncertainty of each image in `keys` order, higher = more uncertain (uncertainty.align_scores);
    cluster_labels, factor: as select_closest (quota ceil(factor x |c|) for HUDD; default the original's 2).
    rank is the order of selection, so selection.modes.balance_unsafe_set keeps the most uncertain
    ceil(f x |c|) of each cluster; `distance` (to the cluster the image went to) keeps its bootstrap weights.
    """
    hudd = select_closest(keys, cluster_ids, np.asarray(distances, dtype=np.float64), cluster_labels, factor)
    return _uncertain_first(keys, cluster_ids, distances, scores, cluster_counts(hudd, cluster_ids))


def select_like_unsafe_set(unsafe, keys, cluster_ids, distances, scores, source="T/UnsafeSet/distances.npz"):
    """HUDD-U's unsafe set with the per-cluster counts of HUDD's own `unsafe` (T/UnsafeSet/unsafe.csv), from
    the distances the assign step saved; see select_uncertain_first for the arguments and the result.

    The distances must be the ones `unsafe` was chosen from: HUDD's greedy assignment over them with
    those counts gives back exactly its images and clusters (the counts argument of this module's
    docstring), else one HUDDError naming `source`.
    """
    counts = cluster_counts(unsafe, cluster_ids)
    outside = sorted(set(int(c) for c in unsafe["cluster"]) - set(counts))
    hudd = greedy_assign(keys, cluster_ids, np.asarray(distances, dtype=np.float64), counts) if not outside else None
    if hudd is None or set(zip(hudd["image"], hudd["cluster"])) != set(zip(unsafe["image"], unsafe["cluster"])):
        raise HUDDError(f"{source}: these distances do not give the unsafe set of T/UnsafeSet/unsafe.csv; rerun the "
                        f"assign step (python HUDD.py -o CASE -step assign)")
    return _uncertain_first(keys, cluster_ids, distances, scores, counts)


def _uncertain_first(keys, cluster_ids, distances, scores, counts):
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(keys),):
        raise HUDDError(f"HUDD-U: {scores.size} uncertainty scores for {len(keys)} improvement images; "
                        f"pass one score per image of the assign step (selection.uncertainty.align_scores)")
    if not np.isfinite(scores).all():
        raise HUDDError(f"HUDD-U: {int((~np.isfinite(scores)).sum())} uncertainty scores are not numbers; "
                        f"rerun the test step (python HUDD.py -o CASE -step test)")
    distances = np.asarray(distances, dtype=np.float64)
    chosen = greedy_assign(keys, cluster_ids, round_order(distances, scores), counts)
    row = {key: i for i, key in enumerate(keys)}
    column = {int(c): j for j, c in enumerate(cluster_ids)}
    chosen["distance"] = [distances[row[i], column[int(c)]] for i, c in zip(chosen["image"], chosen["cluster"])]
    return chosen
