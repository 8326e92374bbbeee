"""RQ1 of the HUDD paper: does a root-cause cluster capture one condition?

A cluster is explained when some parameter varies much less inside it than over all clustered
error images. Parameters come from DataSets/params.csv (a simulator's) or from the measured image
properties (explain.properties.parameter_table); written to CASE/RQ1.xlsx and RQ1.csv.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from clustering import CLUSTER_ANALYSIS
from clustering.folders import best_layer_from_summary, read_clusters
from common.errors import HUDDError
from common.files import atomic_path, write_csv
from common.tables import read_table

RQ1_EXPLAINED_RATIO = 0.5           # a cluster is explained when some parameter's variance ratio is below this
IMAGES_INSPECTED_PER_CLUSTER = 5    # the tool paper's Table 1 measure


def _variance(values):
    return float(np.var(values, ddof=1)) if len(values) > 1 else float("nan")


def rq1(params, clusters, notes=None):
    """Variance ratios per non-singleton cluster and numeric parameter (the paper's RQ1).

    ratio = var(parameter in cluster) / var(parameter over all images of non-singleton clusters),
    with the n-1 estimator, 1 when the denominator is 0. `params`: DataFrame with column 'image'
    and one column per parameter; `clusters`: DataFrame image, cluster. Images without a params
    row and non-numeric columns are left out, with a line in `notes` (a list) for each.
    Returns one row per (cluster, parameter).
    """
    notes = [] if notes is None else notes
    for frame, what in ((params, "params"), (clusters, "clusters")):
        if "image" not in frame.columns:
            raise HUDDError(f"{what} table needs a column 'image' (path relative to DataSets/)")
    if "cluster" not in clusters.columns:
        raise HUDDError("clusters table needs a column 'cluster'")
    params = params.assign(image=params["image"].astype(str)).drop_duplicates("image").set_index("image")
    numeric = {}
    for column in params.columns:
        values = pd.to_numeric(params[column], errors="coerce")
        given = params[column].notna() & (params[column].astype(str).str.strip() != "")
        if (values.isna() & given).any() or values.notna().sum() == 0:
            notes.append(f"parameter {column!r} is not numeric; left out of RQ1")
            continue
        numeric[column] = values
    sizes = clusters.groupby("cluster")["image"].transform("size")
    members = clusters[sizes > 1].copy()
    members["image"] = members["image"].astype(str)
    missing = ~members["image"].isin(params.index)
    if missing.any():
        notes.append(f"params.csv has no row for {int(missing.sum())} of {len(members)} clustered error images "
                     f"(e.g. {members.loc[missing, 'image'].iloc[0]}); they are left out of RQ1")
    members = members[~missing]
    rows = []
    for column, values in numeric.items():
        per_image = values.reindex(members["image"]).to_numpy()
        known = ~np.isnan(per_image)
        overall = _variance(per_image[known])
        if not np.isfinite(overall):
            continue
        for cluster, group in members.assign(value=per_image)[known].groupby("cluster"):
            v = group["value"].to_numpy()
            if len(v) < 2:
                continue
            var = _variance(v)
            ratio = 1.0 if not overall else var / overall
            rows.append({"cluster": int(cluster), "size": int((clusters["cluster"] == cluster).sum()),
                         "parameter": column, "ratio": ratio, "reduction": 1.0 - ratio, "n": len(v),
                         "mean": v.mean(), "min": v.min(), "max": v.max(), "variance": var,
                         "median": float(np.median(v)), "std": float(np.std(v, ddof=1)),
                         "q1": float(np.percentile(v, 25)), "q3": float(np.percentile(v, 75))})
    return pd.DataFrame(rows, columns=["cluster", "size", "parameter", "ratio", "reduction", "n", "mean", "min",
                                       "max", "variance", "median", "std", "q1", "q3"])


def rq1_clusters(table, test_means=None):
    """One row per cluster: its smallest ratio, the parameter that gives it, explained or not, and that
    parameter's mean in the cluster against its mean over the whole test set (`test_means`: {parameter: mean})."""
    if table.empty:
        return pd.DataFrame(columns=["cluster", "size", "min_ratio", "best_parameter", "explained", "best_mean",
                                     "test_set_mean"])
    best = table.loc[table.groupby("cluster")["ratio"].idxmin()]
    wide = table.pivot(index="cluster", columns="parameter", values="ratio").add_prefix("ratio_")
    frame = pd.DataFrame({"cluster": best["cluster"].to_numpy(), "size": best["size"].to_numpy(),
                          "min_ratio": best["ratio"].to_numpy(), "best_parameter": best["parameter"].to_numpy(),
                          "explained": (best["ratio"] < RQ1_EXPLAINED_RATIO).to_numpy(),
                          "best_mean": best["mean"].to_numpy(),
                          "test_set_mean": [(test_means or {}).get(p, np.nan) for p in best["parameter"]]})
    return frame.merge(wide.reset_index(), on="cluster").sort_values("cluster").reset_index(drop=True)


def rq1_summary(table, clusters, per_cluster=IMAGES_INSPECTED_PER_CLUSTER):
    """The numbers the paper reports: clusters, % explained, and the share of error images inspected."""
    per = rq1_clusters(table)
    sizes = clusters.groupby("cluster").size()
    inspected = int(np.minimum(sizes, per_cluster).sum())
    n_errors = int(len(clusters))
    explained = int(per["explained"].sum())
    analysed = int(len(per))
    return {"clusters": int(len(sizes)), "clusters_nonsingleton": int((sizes > 1).sum()),
            "clusters_with_parameters": analysed, "explained": explained,
            "explained_percent": 100.0 * explained / analysed if analysed else float("nan"),
            "mean_min_reduction_pct": 100.0 * (1 - per["min_ratio"].mean()) if analysed else float("nan"),
            "mean_reduction_pct": 100.0 * (1 - table.groupby("parameter")["ratio"].mean().mean())
            if analysed else float("nan"),
            "error_images": n_errors, "inspected": inspected, "per_cluster": per_cluster,
            "inspected_percent": 100.0 * inspected / n_errors if n_errors else float("nan")}


def write_rq1(case_dir, images=None, labels=None, layer=None, per_cluster=IMAGES_INSPECTED_PER_CLUSTER,
              params=None, source=None):
    """CASE/RQ1.xlsx (sheets Clusters, Ratios, Summary) and CASE/RQ1.csv.

    The clusters are `images` with their `labels` when given, else T/ClusterAnalysis/<layer>/clusters.csv
    of `layer` (default: the selected layer of summary.csv). The parameters are `params` when given (with
    `source`, explain.properties.parameter_table's, kept in the summary), else DataSets/params.csv.
    Returns the summary dict (see rq1_summary; format_rq1 makes it a console line), or None after printing
    why when neither is there. Notes on skipped rows or columns are printed and kept under 'notes'.
    """
    case_dir = Path(case_dir)
    params_path = case_dir / "DataSets" / "params.csv"
    if params is None:
        if not params_path.is_file():
            print(f"RQ1 not available: {params_path} not found (it needs a column 'image', the path relative to "
                  f"DataSets/, then one column per simulator parameter), and no measured properties were given "
                  f"(-step properties)")
            return None
        params, source = read_params(params_path), source or "params"
    t_dir = case_dir / "T"
    if images is not None:
        if labels is None or len(labels) != len(images):
            raise HUDDError(f"RQ1: {len(images)} images but {None if labels is None else len(labels)} cluster labels")
        clusters = pd.DataFrame({"image": [str(i) for i in images], "cluster": np.asarray(labels).astype(int)})
        if layer is None and (t_dir / CLUSTER_ANALYSIS / "summary.csv").is_file():
            layer = best_layer_from_summary(t_dir)
    else:
        layer = layer or best_layer_from_summary(t_dir)
        clusters = read_clusters(t_dir, layer)
    notes = []
    table = rq1(params, clusters, notes)
    for note in notes:
        print(f"RQ1 note: {note}")
    test_rows = params[params["image"].astype(str).str.startswith("TestSet/")]
    per = rq1_clusters(table, {p: pd.to_numeric(test_rows[p], errors="coerce").mean() for p in set(table["parameter"])})
    summary = rq1_summary(table, clusters, per_cluster)
    summary.update({"layer": layer, "notes": notes, "source": source})
    with atomic_path(case_dir / "RQ1.xlsx") as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            per.to_excel(writer, sheet_name="Clusters", index=False)
            table.to_excel(writer, sheet_name="Ratios", index=False)
            pd.DataFrame([{k: v for k, v in summary.items() if k != "notes"}]).to_excel(
                writer, sheet_name="Summary", index=False)
    write_csv(case_dir / "RQ1.csv", per)
    return summary


def read_params(params_path):
    """DataSets/params.csv as a DataFrame, or a HUDDError saying what is wrong with the file."""
    params = read_table(params_path, missing_hint="write one row per image (column 'image', then one column "
                                                  "per parameter) or remove it")
    if "image" not in params.columns:
        raise HUDDError(f"{params_path}: needs a column 'image' (path relative to DataSets/, e.g. "
                        f"TestSet/<class>/<file>)")
    return params


SOURCES = {"params": "DataSets/params.csv", "properties": "measured image properties, T/properties.csv",
           "params+properties": "DataSets/params.csv and measured image properties"}


def format_rq1(summary):
    """The console lines for a write_rq1 summary."""
    if not summary:
        return "RQ1 not available (no DataSets/params.csv)"
    source = SOURCES.get(summary.get("source"))
    return (f"RQ1 ({summary['layer']}{'; ' + source if source else ''}): {summary['clusters']} root-cause clusters "
            f"({summary['clusters_nonsingleton']} with 2+ images); {summary['explained']} of "
            f"{summary['clusters_with_parameters']} ({summary['explained_percent']:.1f}%) explained by a parameter "
            f"(variance ratio < {RQ1_EXPLAINED_RATIO}); inspecting {summary['per_cluster']} images per cluster "
            f"= {summary['inspected']} of {summary['error_images']} error images "
            f"({summary['inspected_percent']:.2f}%)")
