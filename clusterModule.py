"""The clustering step (HUDD steps 1 and 2): heatmap distances, Ward clusters per layer, the best layer,
and the folders an engineer inspects.

The work lives in clustering/ (one module per concern) and RQ1 in explain/rq1.py; this module is the
step's one entry point, so Helper, bench/ and tests import the step from one place.
"""
from clustering import CLUSTER_ANALYSIS
from clustering.blocks import BLOCK_ROWS
from clustering.distances import (EXACT_RECOMPUTE_RATIO, FEATURE_CHUNK_BYTES, XLSX_MAX_COLUMNS, load_distances,
                                  pairwise_distances, write_distances, write_distances_xlsx)
from clustering.figures import GIF_MAX_FRAMES, GIF_MAX_SIDE, GIF_SECONDS_PER_FRAME, plot_wicd, write_gif
from clustering.folders import (best_layer_from_summary, copy_best_layer, member_file_name, member_order,
                                read_clusters, read_summary, summary_frame, write_cluster_analysis, write_summary)
from clustering.hac import (FLAT_TOLERANCE, GRADIENT_STEP, MAX_CLUSTERS_CAP, MIN_MAX_CLUSTERS,
                            MIN_POINTS_FOR_GRADIENT, choose_k, cluster_layer, gradient_o4, max_clusters_for, wicd,
                            wicd_curve)
from clustering.layers import INPUT_LAYER, layer_number, select_best_layer
from clustering.ward import WARD_FLOAT64_MAX_N, cut, ward_condensed
from explain.rq1 import (IMAGES_INSPECTED_PER_CLUSTER, RQ1_EXPLAINED_RATIO, format_rq1, read_params, rq1,
                         rq1_clusters, rq1_summary, write_rq1)

__all__ = [
    "CLUSTER_ANALYSIS", "BLOCK_ROWS",
    "EXACT_RECOMPUTE_RATIO", "FEATURE_CHUNK_BYTES", "XLSX_MAX_COLUMNS", "load_distances", "pairwise_distances",
    "write_distances", "write_distances_xlsx",
    "GIF_MAX_FRAMES", "GIF_MAX_SIDE", "GIF_SECONDS_PER_FRAME", "plot_wicd", "write_gif",
    "best_layer_from_summary", "copy_best_layer", "member_file_name", "member_order", "read_clusters",
    "read_summary", "summary_frame", "write_cluster_analysis", "write_summary",
    "FLAT_TOLERANCE", "GRADIENT_STEP", "MAX_CLUSTERS_CAP", "MIN_MAX_CLUSTERS", "MIN_POINTS_FOR_GRADIENT",
    "choose_k", "cluster_layer", "gradient_o4", "max_clusters_for", "wicd", "wicd_curve",
    "INPUT_LAYER", "layer_number", "select_best_layer",
    "WARD_FLOAT64_MAX_N", "cut", "ward_condensed",
    "IMAGES_INSPECTED_PER_CLUSTER", "RQ1_EXPLAINED_RATIO", "format_rq1", "read_params", "rq1", "rq1_clusters",
    "rq1_summary", "write_rq1",
]
