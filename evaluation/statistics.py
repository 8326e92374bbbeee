"""RQ2's statistics: Vargha-Delaney A12, Mann-Whitney U, the per-mode table and its files, the run summary."""
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import HUDDError
from common.files import atomic_path, write_csv


def a12(x, y):
    """Vargha-Delaney A12: the probability that a value of x beats one of y (ties count half)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return float("nan")
    greater = (x[:, None] > y[None, :]).sum()
    ties = (x[:, None] == y[None, :]).sum()
    return float((greater + 0.5 * ties) / (x.size * y.size))


def mann_whitney_p(x, y):
    """Two-sided Mann-Whitney U p-value (scipy; exact for small samples without ties)."""
    from scipy.stats import mannwhitneyu

    if len(x) == 0 or len(y) == 0:
        return float("nan")
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def _spread(name, values):
    return {f"{name}_mean": values.mean(), f"{name}_std": values.std(ddof=1) if len(values) > 1 else float("nan"),
            f"{name}_min": values.min(), f"{name}_max": values.max()}


def _mode_order(present, reference, order):
    """The table's rows: the modes of `order` that ran, in that order, then the others sorted; without
    `order`, `reference` first."""
    first = [m for m in (order if order is not None else (reference,)) if m in present]
    return first + sorted(present - set(first))


REFERENCE_ROWS = {"NONE": "floor", "ALL": "ceiling"}   # retrain on no added image / the whole improvement set
STATISTICS_OF = ("HUDD", "HUDD-U")    # the selections whose p and A12 against every other mode the table gives
COVERAGE_MEANS = ("clusters_reached", "clusters", "top_cluster_share")


def rq2_table(results, reference="HUDD", order=None):
    """Per mode: repetitions, mean/std/min/max of test accuracy (%) and gain (points), and for each
    other mode the Mann-Whitney p-value and A12 of `reference` against it (on test accuracy). For keypoint
    regressors test accuracy is the share of images within the error threshold, and mean_error_* (px) are added.
    `order`: the modes listed first, in that order (RQ2 passes the retraining modes).

    With the reference rows: `reference` names NONE (floor) and ALL (ceiling); gain_over_none = gain_mean
    - NONE's, share_of_ceiling = gain_over_none / (ALL's gain_mean - NONE's). HUDD-U, when it ran beside
    another reference, gets its own p_value_HUDD-U_vs and a12_HUDD-U_vs. Coverage (the means of
    clusters_reached, clusters, top_cluster_share and every share_<condition> of the rows) follows.
    """
    missing = {"mode", "test_accuracy", "gain"} - set(results.columns)
    if missing:
        raise HUDDError(f"RQ2 results: missing columns {sorted(missing)}; pass the retrain_<mode>.csv rows")
    present = set(results["mode"])
    against = [reference] + [m for m in STATISTICS_OF if m in present and m != reference]
    accuracy = {m: results.loc[results["mode"] == m, "test_accuracy"].to_numpy() for m in present}
    gain_of = {m: results.loc[results["mode"] == m, "gain"].mean() for m in REFERENCE_ROWS if m in present}
    shares = [c for c in results.columns if c.startswith(("share_", "base_share_"))]
    rows = []
    for mode in _mode_order(present, reference, order):
        part = results[results["mode"] == mode]
        row = {"mode": mode, "reps": len(part), **_spread("accuracy", 100 * part["test_accuracy"]),
               **_spread("gain", part["gain"])}
        if "mean_error" in part.columns and part["mean_error"].notna().any():
            row.update(_spread("mean_error", part["mean_error"]))   # keypoints: px; accuracy = share under threshold
        if "precision" in part.columns and part["precision"].notna().any():
            # labelling precision: share of the images labelled for this mode that the original DNN got wrong
            row.update({"precision_mean": part["precision"].mean(), "base_error_rate": part["base_error_rate"].mean()})
        for name in against:
            row[f"p_value_{name}_vs"] = float("nan") if mode == name else mann_whitney_p(accuracy[name], accuracy[mode])
            row[f"a12_{name}_vs"] = float("nan") if mode == name else a12(accuracy[name], accuracy[mode])
        if gain_of:
            row["reference"] = REFERENCE_ROWS.get(mode, "")
        if "NONE" in gain_of:
            row["gain_over_none"] = row["gain_mean"] - gain_of["NONE"]
            if "ALL" in gain_of:
                span = gain_of["ALL"] - gain_of["NONE"]
                row["share_of_ceiling"] = row["gain_over_none"] / span if span else float("nan")
        for column in [c for c in COVERAGE_MEANS if c in part.columns] + shares:
            row[f"{column}_mean"] = pd.to_numeric(part[column], errors="coerce").mean()
        rows.append(row)
    return pd.DataFrame(rows)


def write_rq2(case_dir, results, reference="HUDD", order=None):
    """Write CASE/RQ2.csv, CASE/RQ2.xlsx (table + repetitions) and CASE/RQ2_boxplot.png; return the table."""
    case_dir = Path(case_dir)
    table = rq2_table(results, reference, order)
    write_csv(case_dir / "RQ2.csv", table)
    with atomic_path(case_dir / "RQ2.xlsx") as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            table.to_excel(writer, sheet_name="RQ2", index=False)
            results.to_excel(writer, sheet_name="repetitions", index=False)
    _write_boxplot(case_dir, table, results)
    return table


def _write_boxplot(case_dir, table, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(table["mode"])
    keypoints = "mean_error" in results.columns and results["mean_error"].notna().any()
    panels = [("test_accuracy", 100, "test images within the threshold (%)" if keypoints else "test accuracy (%)"),
              ("gain", 1, "gain over the original (points)")]
    if keypoints:
        panels.append(("mean_error", 1, "mean keypoint error (px)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (column, scale, title) in zip(axes, panels):
        ax.boxplot([scale * results.loc[results["mode"] == m, column].to_numpy() for m in modes])
        ax.set_xticks(range(1, len(modes) + 1), modes)
        ax.set_title(title)
    fig.suptitle(f"RQ2: {case_dir.name}, {int(table['reps'].max())} repetitions per mode")
    fig.tight_layout()
    with atomic_path(case_dir / "RQ2_boxplot.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def retrain_summary(frame):
    """What the run summary prints: the mode, mean test accuracy (fraction), mean gain and each repetition's (points)."""
    summary = {"mode": str(frame["mode"].iloc[0]), "reps": int(len(frame)),
               "test_accuracy": float(frame["test_accuracy"].mean()), "gain": float(frame["gain"].mean()),
               "gains": [float(g) for g in frame["gain"]],
               "improved": float(frame["improved"].mean()), "worsened": float(frame["worsened"].mean()),
               "precision": float(frame["precision"].mean()) if "precision" in frame.columns else float("nan")}
    if "mean_error" in frame.columns:
        summary.update(mean_error=float(frame["mean_error"].mean()),
                       original_mean_error=float(frame["original_mean_error"].mean()))
    return summary
