"""The folders an engineer inspects, T/ClusterAnalysis/<Layer>/ and T/Layer<X>/, and reading them back.

Each folder is built beside the old one and swapped in, so a killed run leaves the previous
folder intact and later steps never see half a folder.
"""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from clustering import CLUSTER_ANALYSIS
from clustering.blocks import progress_bar
from clustering.figures import GIF_MAX_FRAMES, GIF_SECONDS_PER_FRAME, plot_wicd, write_gif
from clustering.layers import layer_number, layer_sort_key
from common.errors import HUDDError
from common.files import atomic_path, write_csv
from common.tables import read_table


def member_file_name(image):
    """The file name of a member copy: its key relative to DataSets/ with '/' turned into '__'.

    Unique (keys are) and it keeps the class folder visible; nothing ever parses it back.
    """
    return str(image).replace("\\", "/").replace("/", "__")


def member_order(result, cluster, distances=None):
    """Rows of a cluster, medoid first, then by raw distance to the medoid (row order without D)."""
    rows = np.flatnonzero(np.asarray(result["labels"]) == cluster)
    medoid = int(result["medoids"][cluster - 1])
    others = rows[rows != medoid]
    if distances is not None and len(others):
        others = others[np.argsort(np.asarray(distances[medoid], dtype=np.float64)[others], kind="stable")]
    return np.concatenate([[medoid], others]).astype(np.int64)


def _fresh_dir(final):
    """A temporary folder beside `final`; `_swap_dir` puts it in place of `final` in two renames."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def _swap_dir(tmp, final):
    final = Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_cluster_analysis(t_dir, layer, result, images, datasets_dir, distances=None, copy_images=True,
                           gif_max_frames=GIF_MAX_FRAMES, seconds_per_frame=GIF_SECONDS_PER_FRAME,
                           progress=True):
    """T/ClusterAnalysis/<Layer>/: clusters.csv, <cluster>/ member copies, AllClusters/<cluster>.gif
    (clusters of 2+ members, 100 images per minute), WICD.png, wicd.csv and cluster_info.csv.

    `images`: the image keys (relative to DataSets/) in heatmap row order; `distances` (default
    T/<Layer>HMDistance.npy when present) orders members by distance to the medoid. The folder is built
    beside the old one and swapped in, so a killed run leaves the previous folder intact.
    """
    datasets_dir = Path(datasets_dir)
    labels = np.asarray(result["labels"])
    images = [str(i) for i in images]
    if len(images) != len(labels):
        raise HUDDError(f"{Path(t_dir) / 'Heatmaps' / 'index.csv'}: {len(images)} images but {len(labels)} "
                        f"clustered rows; rerun -step heatmaps and -step distances")
    final = Path(t_dir) / CLUSTER_ANALYSIS / layer
    if distances is None and (Path(t_dir) / f"{layer}HMDistance.npy").is_file():
        distances = np.load(Path(t_dir) / f"{layer}HMDistance.npy", mmap_mode="r")
    tmp = _fresh_dir(final)
    try:
        write_csv(tmp / "clusters.csv", pd.DataFrame({"image": images, "cluster": labels}))
        write_csv(tmp / "wicd.csv", pd.DataFrame({"k": result["ks"], "wicd": result["curve"],
                                                   "gradient": result["gradient"]}))
        info = []
        (tmp / "AllClusters").mkdir()
        for c in progress_bar(range(1, result["k"] + 1), result["k"], f"{layer} clusters", progress):
            order = member_order(result, c, distances)
            gif = ""
            if copy_images:
                folder = tmp / str(c)
                folder.mkdir()
                for row in order:
                    source = datasets_dir / images[row]
                    if not source.is_file():
                        raise HUDDError(f"{source}: error image missing; restore DataSets/ or rerun -step test")
                    shutil.copyfile(source, folder / member_file_name(images[row]))
            if len(order) > 1:
                gif = f"AllClusters/{c}.gif"
                write_gif([datasets_dir / images[r] for r in order[:gif_max_frames]], tmp / gif, seconds_per_frame)
            info.append({"cluster": c, "size": len(order), "medoid": images[int(result["medoids"][c - 1])],
                         "icd": float(result["icd"][c - 1]), "gif": gif})
        write_csv(tmp / "cluster_info.csv", pd.DataFrame(info))
        if len(result["ks"]):
            plot_wicd(result, tmp / "WICD.png", layer)
        _swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def summary_frame(results, best):
    rows = []
    for layer in sorted(results, key=layer_sort_key):
        r = results[layer]
        sizes = np.asarray(r["sizes"])
        rows.append({"layer": layer, "k": int(r["k"]), "wicd": float(r["wicd"]),
                     "wicd_normalised": float(r["wicd_normalised"]), "silhouette": float(r["silhouette"]),
                     "n_clusters_nonsingleton": int(np.sum(sizes > 1)),
                     "sizes": ";".join(str(int(s)) for s in sizes), "selected": layer == best})
    return pd.DataFrame(rows, columns=["layer", "k", "wicd", "wicd_normalised", "silhouette",
                                       "n_clusters_nonsingleton", "sizes", "selected"])


def write_summary(t_dir, results, best, copy_best=True):
    """T/ClusterAnalysis/summary.csv and .xlsx (one row per layer), and the best layer's clusters
    copied to T/Layer<X>/ (what the README of the original promised)."""
    folder = Path(t_dir) / CLUSTER_ANALYSIS
    frame = summary_frame(results, best)
    write_csv(folder / "summary.csv", frame)
    with atomic_path(folder / "summary.xlsx") as tmp:
        frame.to_excel(tmp, index=False, engine="openpyxl", sheet_name="summary")
    if copy_best:
        copy_best_layer(t_dir, best)
    return folder / "summary.csv"


def copy_best_layer(t_dir, best):
    """T/<best>/ = a copy of T/ClusterAnalysis/<best>/; an older run's T/Layer<i>/ is removed."""
    source = Path(t_dir) / CLUSTER_ANALYSIS / best
    if not source.is_dir():
        raise HUDDError(f"{source}: missing; rerun -step clusters")
    final = Path(t_dir) / best
    tmp = _fresh_dir(final)
    try:
        os.rmdir(tmp)
        shutil.copytree(source, tmp)
        _swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in Path(t_dir).glob("Layer*"):
        if stale.is_dir() and layer_number(stale.name) is not None and stale.name != best:
            shutil.rmtree(stale)        # a previous run's best layer
    return final


def read_summary(t_dir):
    return read_table(Path(t_dir) / CLUSTER_ANALYSIS / "summary.csv", required=("layer", "selected"),
                      missing_hint="run the clustering step first (-step clusters)")


def read_clusters(t_dir, layer):
    """A layer's clusters.csv: image (text) and cluster (int), one row per error image."""
    return read_table(Path(t_dir) / CLUSTER_ANALYSIS / layer / "clusters.csv", required=("image", "cluster"),
                      missing_hint="run the clustering step first (-step clusters)")


def best_layer_from_summary(t_dir):
    frame = read_summary(t_dir)
    chosen = frame[frame["selected"].astype(str).str.lower() == "true"]
    if chosen.empty:
        raise HUDDError(f"{Path(t_dir) / CLUSTER_ANALYSIS / 'summary.csv'}: no layer marked selected; "
                        f"rerun -step clusters")
    return str(chosen["layer"].iloc[0])
