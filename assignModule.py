"""Step 'assign' (HUDD steps 4-5): pick the unsafe set, the improvement images near the root-cause clusters.

Faithful to the original's ClosestU assignment: each improvement image's heatmap (selected layer,
predicted class) is compared with the members of every cluster that has more than one member; the
distance to a cluster is single linkage (the smallest Euclidean distance to a member); images are
taken greedily, closest first, up to ceil(factor * |c|) images per cluster, each image in at most one
cluster. The improvement set is streamed: per image only its K distances are kept.
"""
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import HUDDError
from common.files import atomic_path, write_csv
from common.tables import read_table, try_read_table

UNSAFE_COLUMNS = ["image", "cluster", "distance", "rank"]
LABEL_COLUMNS = ["image", "cluster", "label"]
DEFAULT_FACTOR = 2.0           # the original's quota: 2 * |c| improvement images per cluster
GIF_SECONDS_PER_FRAME = 0.6    # the original's GIF speed
GIF_MAX_FRAMES = 100           # the closest images only: a GIF of thousands of frames helps nobody
ROUND_DIGITS = 9               # factor * |c| is rounded before ceil so that 0.3 * 10 is 3, not 4
UNLABELLED_SHOWN = 5           # rows named in the "still unlabelled" message
PRECISION_FILE = "precision.csv"  # T/UnsafeSet/precision.csv: how rich in errors the unsafe set is
PRECISION_COLUMNS = ["cluster", "members", "selected", "labelled", "errors", "precision", "base_error_rate", "lift"]
LABELS_FILE = "labels.csv"     # T/UnsafeSet/labels.csv: the engineer's labels of a flat improvement set (step 5)
DISTANCES_FILE = "distances.npz"  # T/UnsafeSet/distances.npz: every improvement image's distance to every cluster


# --- distances -------------------------------------------------------------------------------

def _as_rows(array, name):
    array = np.asarray(array)
    if array.ndim < 2:
        raise HUDDError(f"{name}: expected an array of heatmaps (images, ...), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array.reshape(array.shape[0], -1)


def check_clusters(cluster_heatmaps, cluster_labels, source="cluster labels"):
    """Validated (members as rows, labels, ids of the clusters with 2+ members, {id: size}).

    Every engine calls it before any image is read, so bad clusters fail before minutes of LRP.
    """
    members = _as_rows(cluster_heatmaps, "cluster heatmaps")
    labels = np.asarray(cluster_labels)
    if labels.shape != (members.shape[0],):
        raise HUDDError(f"cluster labels: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{members.shape[0]} error heatmaps; pass one cluster id per heatmap row "
                        f"(T/ClusterAnalysis/<Layer>/clusters.csv)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise HUDDError(f"cluster labels: expected integer cluster ids, got {labels.dtype}")
    ids, sizes = np.unique(labels, return_counts=True)
    kept = ids[sizes > 1]
    if kept.size == 0:
        raise HUDDError(f"{source}: every root-cause cluster has a single member, so no cluster can attract "
                        f"improvement images; add test images that the DNN gets wrong, or lower --max-clusters")
    return members, labels, kept, dict(zip(ids.tolist(), sizes.tolist()))


class SingleLinkage:
    """Smallest Euclidean distance from a batch of heatmaps to the members of each cluster, by matrix products.

    Members and batches are centred on the members' mean first: the distances do not change, and
    ||a||^2 + ||b||^2 - 2ab loses far less precision in float32 when the norms are small. The product
    runs in torch, beside the heatmap engine: numpy's own BLAS threads, started between two LRP
    batches, fight torch's for the cores and ran the product 5x slower (bench/assign.py).
    """

    def __init__(self, members, labels, cluster_ids):
        import torch

        keep = np.flatnonzero(np.isin(labels, cluster_ids))
        owner = np.searchsorted(cluster_ids, labels[keep])
        by_cluster = np.argsort(owner, kind="stable")
        members = members[keep[by_cluster]]
        self.starts = np.searchsorted(owner[by_cluster], np.arange(len(cluster_ids)))
        self.dim = members.shape[1]
        self.dtype = np.promote_types(members.dtype, np.float32)
        self.centre = members.mean(axis=0, dtype=np.float64).astype(self.dtype)
        centred = np.ascontiguousarray(members - self.centre, dtype=self.dtype)
        self.member_sq = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)
        self.members_t = torch.from_numpy(centred).T

    def __call__(self, batch):
        import torch

        batch = _as_rows(batch, "improvement heatmaps")
        if batch.shape[1] != self.dim:
            raise HUDDError(f"improvement heatmaps have {batch.shape[1]} values per image but the cluster "
                            f"heatmaps have {self.dim}; compute both at the same (selected) layer")
        batch = np.ascontiguousarray(batch - self.centre, dtype=self.dtype)
        batch_sq = np.einsum("ij,ij->i", batch, batch, dtype=np.float64)
        products = (torch.from_numpy(batch) @ self.members_t).numpy().astype(np.float64)
        squared = batch_sq[:, None] + self.member_sq[None, :] - 2.0 * products
        nearest = np.minimum.reduceat(squared, self.starts, axis=1)
        return np.sqrt(np.maximum(nearest, 0.0))


def cluster_distances(cluster_heatmaps, cluster_labels, improvement_batches, source="cluster labels"):
    """Single-linkage distance of every improvement image to every non-singleton cluster.

    Returns (keys, cluster_ids, distances (M, K)); singleton clusters are left out (the original
    treated them as noise). Only the (M, K) distances are kept while the batches stream past.
    """
    members, labels, cluster_ids, _ = check_clusters(cluster_heatmaps, cluster_labels, source)
    linkage = SingleLinkage(members, labels, cluster_ids)
    keys, blocks = [], []
    for batch_keys, batch in improvement_batches:
        batch_keys = list(batch_keys)
        if len(batch_keys) != len(batch):
            raise HUDDError(f"improvement batch: {len(batch_keys)} keys for {len(batch)} heatmaps")
        if not batch_keys:
            continue
        keys += batch_keys
        blocks.append(linkage(batch))
    if len(set(keys)) != len(keys):
        raise HUDDError("improvement set: an image key appears twice; key images by their path under DataSets/")
    distances = np.concatenate(blocks) if blocks else np.zeros((0, len(cluster_ids)))
    return keys, cluster_ids, distances


# --- greedy selection ------------------------------------------------------------------------

def cluster_quotas(cluster_sizes, factor=DEFAULT_FACTOR):
    """ceil(factor * |c|) per cluster; the sum is the number of images the engineer is asked to label."""
    if not factor > 0:
        raise HUDDError(f"assign factor {factor}: must be positive (the original uses 2)")
    return {c: int(math.ceil(round(factor * n, ROUND_DIGITS))) for c, n in cluster_sizes.items()}


def greedy_assign(keys, cluster_ids, distances, quotas):
    """The original's ClosestU selection, without its distance sentinel.

    Round r looks at each still unassigned image's r-th nearest cluster; within a round, images are
    taken closest first while their cluster is under quota. So an image whose nearest cluster is full
    overflows to its next nearest one, after the images for which that cluster is the nearest.
    Ties go to the earlier image, then the lower cluster id. Returns DataFrame[image, cluster, distance,
    rank], rank = order of selection within the cluster (1 = first, the closest of the first round).
    """
    distances = np.asarray(distances, dtype=np.float64)
    m, k = distances.shape
    cluster_ids = np.asarray(cluster_ids)
    remaining = np.array([quotas[int(c)] for c in cluster_ids], dtype=np.int64)
    order = np.argsort(distances, axis=1, kind="stable")      # each image's clusters, nearest first
    assigned = np.zeros(m, dtype=bool)
    rows = []
    for round_ in range(k):
        if remaining.sum() == 0 or assigned.all():
            break
        candidates = np.flatnonzero(~assigned)
        clusters = order[candidates, round_]
        dist = distances[candidates, clusters]
        for pos in np.lexsort((clusters, candidates, dist)):
            cluster = clusters[pos]
            if remaining[cluster] > 0:
                remaining[cluster] -= 1
                assigned[candidates[pos]] = True
                rows.append((keys[candidates[pos]], int(cluster_ids[cluster]), float(dist[pos])))
    frame = pd.DataFrame(rows, columns=UNSAFE_COLUMNS[:3])
    frame["rank"] = frame.groupby("cluster").cumcount() + 1
    frame = frame.sort_values(["cluster", "rank"], kind="stable").reset_index(drop=True)
    return frame.astype({"cluster": np.int64, "distance": np.float64, "rank": np.int64})


def select_unsafe_set(cluster_heatmaps, cluster_labels, improvement_batches, factor=DEFAULT_FACTOR,
                      source="cluster labels"):
    """The unsafe set: DataFrame[image, cluster, distance, rank] (see greedy_assign).

    cluster_heatmaps: (N, ...) heatmaps of the test error images at the selected layer;
    cluster_labels: (N,) their cluster ids; improvement_batches: iterable of (image keys, heatmaps (n, ...)).
    """
    keys, cluster_ids, distances = cluster_distances(cluster_heatmaps, cluster_labels, improvement_batches, source)
    return select_closest(keys, cluster_ids, distances, cluster_labels, factor)


def select_closest(keys, cluster_ids, distances, cluster_labels, factor=DEFAULT_FACTOR):
    """The unsafe set from distances already computed (by either engine): quotas from the clusters' sizes
    in `cluster_labels`, then greedy_assign."""
    ids, counts = np.unique(np.asarray(cluster_labels), return_counts=True)
    sizes = dict(zip(ids.tolist(), counts.tolist()))
    quotas = cluster_quotas({int(c): sizes[int(c)] for c in cluster_ids}, factor)
    return greedy_assign(keys, cluster_ids, distances, quotas)


def improvement_heatmaps(model, dataset, layer, batch_size, device, rule="hudd", workers=0, progress=True,
                         start=None):
    """Yield (image keys, flattened float32 heatmaps of `layer`) over `dataset` (an ImageSet), batch by batch.

    Relevance starts from the predicted class, as for the error images, or from `start(outputs)` (a
    keypoint regressor: testModule.least_peaked_start, which needs no ground truth). Unreadable
    images are skipped.
    """
    import torch

    from common.data import batches
    from heatmapModule import layer_relevance

    model.eval()
    for inputs, _, indices, errors in batches(dataset, batch_size, workers, desc=f"heatmaps {layer}",
                                              progress=progress):
        keep = [i for i, e in enumerate(errors) if not e]
        if not keep:
            continue
        relevance = layer_relevance(model, inputs[keep].to(device), rule=rule, start=start, layers=[layer])[layer]
        if torch.is_tensor(relevance):
            relevance = relevance.detach().float().cpu().numpy()
        keys = [dataset.images[int(indices[i])] for i in keep]
        yield keys, np.asarray(relevance, dtype=np.float32).reshape(len(keep), -1)


# --- selection quality --------------------------------------------------------------------------

def selection_quality(unsafe, wrong_of, cluster_sizes=None):
    """How rich in errors the unsafe set is: per cluster and over all ("all"), the share of its images that
    the DNN under analysis gets wrong (precision), against the improvement set's base error rate.

    `wrong_of`: {improvement image: wrong} for the labelled improvement images (testModule.errors_of);
    images without a label are left out of the shares (`labelled` counts those with one). A random draw
    of any size (BL1 and BL2 label one) has the base rate as its expected precision; `lift` is
    precision / base rate. Returns DataFrame[PRECISION_COLUMNS]; empty when nothing is labelled.
    """
    if not wrong_of:
        return pd.DataFrame(columns=PRECISION_COLUMNS)
    base = float(np.mean(list(wrong_of.values())))
    sizes = dict(cluster_sizes or {})

    def row(cluster, images):
        known = [bool(wrong_of[i]) for i in images if i in wrong_of]
        errors = int(sum(known))
        precision = errors / len(known) if known else float("nan")
        members = sizes.get(cluster, float("nan")) if cluster != "all" else int(sum(sizes.values())) if sizes \
            else float("nan")
        return {"cluster": cluster, "members": members, "selected": len(images), "labelled": len(known),
                "errors": errors, "precision": precision, "base_error_rate": base,
                "lift": precision / base if base > 0 else float("nan")}

    rows = [row(int(c), list(group["image"])) for c, group in unsafe.groupby("cluster", sort=True)]
    rows.append(row("all", list(unsafe["image"])))
    return pd.DataFrame(rows, columns=PRECISION_COLUMNS)


# --- the unsafe-set folder -------------------------------------------------------------------

def _copy_name(rank, image):
    return f"{int(rank):04d}_{Path(image).name}"


def _write_gif(path, image_paths):
    import imageio.v2 as imageio
    from PIL import Image

    frames, size = [], None
    for image_path in image_paths[:GIF_MAX_FRAMES]:
        with Image.open(image_path) as img:
            img = img.convert("RGB")
            size = size or img.size
            frames.append(np.asarray(img if img.size == size else img.resize(size)))
    if frames:
        imageio.mimsave(path, frames, format="GIF", duration=GIF_SECONDS_PER_FRAME * 1000, loop=0)


def _old_labels(path):
    frame = try_read_table(path)
    if frame is None or not {"image", "label"} <= set(frame.columns):
        return {}
    return {i: l for i, l in zip(frame["image"], frame["label"]) if l.strip()}


def write_unsafe_set(t_dir, unsafe, datasets_dir, labelled, quality=None, distances=None):
    """Write T/UnsafeSet/: unsafe.csv, <cluster>/<rank>_<name> copies, <cluster>_<n>.gif, and labels.csv if unlabelled.

    `quality` (selection_quality's frame), when the improvement set is labelled, goes to precision.csv;
    `distances` (cluster_distances' keys, cluster ids, (M, K) distances) to distances.npz (write_distances).
    The folder is built beside the old one and swapped in, so an interrupted write leaves the old set.
    For a flat (unlabelled) improvement set, labels.csv has an empty label column for the engineer
    (HUDD step 5); labels already typed for images that are still selected are kept.
    Returns the path of T/UnsafeSet.
    """
    t_dir, datasets_dir = Path(t_dir), Path(datasets_dir)
    missing = set(UNSAFE_COLUMNS) - set(unsafe.columns)
    if missing:
        raise HUDDError(f"unsafe set: missing columns {sorted(missing)}; pass the frame select_unsafe_set returns")
    target = t_dir / "UnsafeSet"
    t_dir.mkdir(parents=True, exist_ok=True)
    old_labels = _old_labels(target / LABELS_FILE)
    build = Path(tempfile.mkdtemp(prefix=".UnsafeSet.", dir=t_dir))
    try:
        write_csv(build / "unsafe.csv", unsafe[UNSAFE_COLUMNS])
        if quality is not None and len(quality):
            write_csv(build / PRECISION_FILE, quality[PRECISION_COLUMNS])
        if distances is not None:
            write_distances(build / DISTANCES_FILE, *distances)
        for cluster, group in unsafe.groupby("cluster", sort=True):
            folder = build / str(cluster)
            folder.mkdir()
            sources = []
            for image, rank in zip(group["image"], group["rank"]):
                source = datasets_dir / image
                if not source.is_file():
                    raise HUDDError(f"{source}: improvement image is gone; rerun the assign step "
                                    f"(python HUDD.py -o CASE -step assign)")
                shutil.copy2(source, folder / _copy_name(rank, image))
                sources.append(source)
            _write_gif(build / f"{cluster}_{len(group)}.gif", sources)
        if not labelled:
            labels = unsafe[["image", "cluster"]].copy()
            labels["label"] = [old_labels.get(i, "") for i in labels["image"]]
            write_csv(build / LABELS_FILE, labels)
        trash = t_dir / f".UnsafeSet.old.{build.name.split('.')[-1]}"
        if target.exists():
            target.rename(trash)
        build.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return target


def write_distances(path, keys, cluster_ids, distances):
    """Save the assign step's distances atomically: `images` (M keys), `clusters` (K ids), `distances` (M, K).

    HUDD-U orders each cluster's candidates by uncertainty over them, and coverage names the cluster
    each selected image is closest to, without a second LRP pass over the improvement set.
    """
    distances = np.asarray(distances, dtype=np.float64)
    cluster_ids = np.asarray(cluster_ids, dtype=np.int64)
    if distances.shape != (len(keys), len(cluster_ids)):
        raise HUDDError(f"{path}: {distances.shape} distances for {len(keys)} images and {len(cluster_ids)} clusters; "
                        f"pass cluster_distances' three results together")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=np.array(list(keys), dtype=str), clusters=cluster_ids, distances=distances)
    return Path(path)


def read_distances(t_dir):
    """(image keys, cluster ids, (M, K) distances) from T/UnsafeSet/distances.npz, or None when it is missing."""
    path = Path(t_dir) / "UnsafeSet" / DISTANCES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, ids, distances = data["images"].tolist(), data["clusters"], data["distances"]
    except (OSError, ValueError, KeyError) as exc:
        raise HUDDError(f"{path}: unreadable ({exc}); rerun the assign step (python HUDD.py -o CASE -step assign)")
    if distances.shape != (len(keys), len(ids)):
        raise HUDDError(f"{path}: {distances.shape} distances for {len(keys)} images and {len(ids)} clusters; rerun "
                        f"the assign step (python HUDD.py -o CASE -step assign)")
    return keys, ids.astype(np.int64), distances.astype(np.float64)


def read_labels(t_dir, classes):
    """The engineer's labels of the unsafe set, {image: class}, from T/UnsafeSet/labels.csv.

    Raises HUDDError naming the rows still unlabelled, or labels that are not class names.
    """
    path = Path(t_dir) / "UnsafeSet" / LABELS_FILE
    frame = read_table(path, missing_hint="run the assign step first (python HUDD.py -o CASE -step assign), "
                                          "then write each image's class in its label column")
    missing = set(LABEL_COLUMNS) - set(frame.columns)
    if missing:
        raise HUDDError(f"{path}: missing columns {sorted(missing)}; keep the columns image,cluster,label "
                        f"as the assign step wrote them")
    frame["label"] = frame["label"].str.strip()
    empty = frame[frame["label"] == ""]
    if len(empty):
        shown = ", ".join(f"row {i + 2} {img}" for i, img in zip(empty.index[:UNLABELLED_SHOWN],
                                                                  empty["image"][:UNLABELLED_SHOWN]))
        more = f" and {len(empty) - UNLABELLED_SHOWN} more" if len(empty) > UNLABELLED_SHOWN else ""
        raise HUDDError(f"{path}: {len(empty)} of {len(frame)} images still unlabelled ({shown}{more}); "
                        f"write each image's class in the label column, then rerun -step retrain")
    unknown = sorted(set(frame["label"]) - set(map(str, classes)))
    if unknown:
        raise HUDDError(f"{path}: labels {unknown[:UNLABELLED_SHOWN]} are not classes of the model "
                        f"({', '.join(map(str, classes))}); use one of those names")
    return dict(zip(frame["image"], frame["label"]))
