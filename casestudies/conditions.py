"""The named conditions of a case folder, and the DNN's error rate in each, per split.

A case names its conditions as 0/1 columns of ``DataSets/params.csv`` whose names start with
``condition_`` (``condition_low_light``: 1 for each image taken in low light). The built-in gaze and
openclosed cases write them with every ``--design`` but the default; for a default build they are
derived from the simulator parameters (casestudies/eyes.py: condition_masks).

    python -m casestudies.conditions CASE [-o TABLE.csv]     # after HUDD.py -o CASE -step test

prints and writes, per split and condition, the images, their share of the split, the DNN's errors
and error rate (from trainResult.csv, testResult.csv, improveResult.csv).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import HUDDError

PREFIX = "condition_"
NONE = "none of them"
ALL = "all"
RESULT_FILES = {"TrainingSet": "trainResult.csv", "TestSet": "testResult.csv", "ImprovementSet": "improveResult.csv"}
COLUMNS = ["split", "condition", "images", "share", "errors", "error_rate"]


def read_conditions(params, path="params.csv"):
    """{condition name: boolean array} from the 0/1 ``condition_`` columns of a params table ({} if none)."""
    conditions = {}
    for column in [c for c in params.columns if str(c).startswith(PREFIX)]:
        values = pd.to_numeric(params[column], errors="coerce")
        if values.isna().any() or not values.isin([0, 1]).all():
            bad = params[column][values.isna() | ~values.isin([0, 1])].iloc[0]
            raise HUDDError(f"{path}: column {column!r} holds {bad!r}; a condition column holds 0 or 1 per image")
        conditions[column[len(PREFIX):]] = values.to_numpy() == 1
    return conditions


def case_conditions(case_dir):
    """(params table, {condition: mask}) of a case folder: its condition columns, else the simulator's."""
    from casestudies import eyes
    from casestudies.casefolder import read_marker
    from common.tables import read_table

    datasets = Path(case_dir) / "DataSets"
    params = read_table(datasets / "params.csv", missing_hint="build the case with python -m casestudies")
    conditions = read_conditions(params, datasets / "params.csv")
    if not conditions:
        marker = read_marker(datasets) or {}
        if marker.get("case_study") not in ("gaze", "openclosed"):
            raise HUDDError(f"{datasets / 'params.csv'}: no {PREFIX}<name> columns; add one 0/1 column per "
                            f"condition")
        conditions = eyes.condition_masks(params, marker["case_study"])
    return params, conditions


def condition_table(case_dir):
    """Per split and condition (and `none of them`, `all`): images, share of the split, errors, error rate."""
    import testModule

    case = Path(case_dir)
    params, conditions = case_conditions(case)
    split_of = params["image"].astype(str).str.split("/").str[0].to_numpy()
    rows = []
    for split, name in RESULT_FILES.items():
        wrong = testModule.errors_of(case / name)
        if not wrong:
            raise HUDDError(f"{case / name}: missing; run python HUDD.py -o {case} -m MODEL -step test first")
        inside = split_of == split
        error = np.array([wrong.get(image, False) for image in params["image"]]) & inside
        masks = {**conditions, NONE: ~np.any(list(conditions.values()), axis=0), ALL: np.ones(len(params), bool)}
        for condition, mask in masks.items():
            members = mask & inside
            n, errors = int(members.sum()), int((error & members).sum())
            rows.append([split, condition, n, n / max(int(inside.sum()), 1), errors, errors / n if n else np.nan])
    return pd.DataFrame(rows, columns=COLUMNS)


def wide(table):
    """One row per condition: share and error rate in each split (the layout of the reports)."""
    pivot = table.pivot(index="condition", columns="split", values=["share", "error_rate"])
    columns = [(value, split) for value in ("share", "error_rate") for split in RESULT_FILES]
    pivot = pivot[columns].reindex(list(dict.fromkeys(table["condition"])))
    pivot.columns = [f"{value}_{split}" for value, split in columns]
    return pivot.reset_index()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m casestudies.conditions", description=__doc__.split("\n")[0])
    parser.add_argument("case", help="case folder (after HUDD.py -step test)")
    parser.add_argument("-o", "--output", help="write the long table to this CSV")
    args = parser.parse_args(argv)
    try:
        table = condition_table(args.case)
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        from common.files import write_csv

        write_csv(args.output, table)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(wide(table).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
