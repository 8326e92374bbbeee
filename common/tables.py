"""The one reader of the project's CSVs: image keys, labels and class names always stay text.

pandas guesses column types, so a class folder named ``0`` comes back as the integer 0 and
``00042`` as 42; a label then matches no class name. Every CSV the tool reads back (result CSVs,
clusters.csv, unsafe.csv, labels.csv, summary.csv, params.csv, the retrain and RQ2 tables) goes
through `read_table`: every value is read as text, then only the columns that are not text by name
and whose every value is a number (or empty) become numbers.
"""
from pathlib import Path

import pandas as pd

from common.errors import HUDDError

# Columns that hold names, never quantities: image keys, class names, labels, layer and file names.
TEXT_COLUMNS = frozenset({
    "image", "result", "expected", "predicted", "label", "medoid", "layer", "mode", "model", "inputs",
    "reason", "worst_component", "worst_KP", "improved_per_cluster", "select", "parameter", "condition",
})
MISSING = frozenset({"", "nan", "NaN", "NA", "N/A", "null", "None"})   # empty cells of a numeric column
BOOLEANS = {"True": True, "False": False}


def read_table(path, required=(), missing_hint=None, text=()):
    """Read a CSV with names as text; a missing, unreadable or incomplete file is one HUDDError.

    `required`: columns that must be present (the error names those missing). `missing_hint`: what
    to do when the file does not exist (e.g. "run the test step first"); without it a missing file
    is reported as missing. `text`: more columns to keep as text (e.g. a params.csv column).
    """
    path = Path(path)
    if not path.is_file():
        raise HUDDError(f"{path}: missing; {missing_hint or 'rerun the step that writes it'}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise HUDDError(f"{path}: empty; {missing_hint or 'rerun the step that writes it'}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise HUDDError(f"{path}: not a readable CSV ({reason}); fix or remove it") from None
    absent = [c for c in required if c not in frame.columns]
    if absent:
        raise HUDDError(f"{path}: missing columns {absent}; {missing_hint or 'rerun the step that writes it'}")
    keep = TEXT_COLUMNS | set(text)
    for column in frame.columns:
        if column not in keep:
            frame[column] = typed_column(frame[column])
    return frame


def typed_column(values):
    """A text column as numbers when every non-empty value is one, as booleans when all are True/False."""
    present = values[~values.isin(MISSING)]
    if len(present) and present.isin(BOOLEANS).all() and len(present) == len(values):
        return values.map(BOOLEANS).astype(bool)
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.isna().any():
        return values
    converted = pd.to_numeric(values.where(~values.isin(MISSING)), errors="coerce")
    if len(present) == len(values) and (converted == converted.round()).all() and \
            not present.str.contains(r"[.eE]", regex=True).any():
        return converted.astype("int64")
    return converted.astype("float64")


def try_read_table(path, **options):
    """read_table, or None when the file is missing or unreadable (the report shows what exists)."""
    try:
        return read_table(path, **options)
    except (HUDDError, OSError):
        return None
