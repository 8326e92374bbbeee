"""Resuming repeated retrainings: the digest of what a repetition's result depends on, and what an earlier run finished."""
from pathlib import Path

from common.files import content_hash, json_digest, tree_fingerprint
from common.tables import try_read_table

DIGESTED_TABLES = ("UnsafeSet/unsafe.csv", "UnsafeSet/labels.csv", "ClusterAnalysis/summary.csv")   # under T/


def inputs_digest(case_dir, model_path, mode, **options):
    """A short digest of everything a repetition's result depends on, but its seed."""
    t = Path(case_dir) / "T"
    parts = {"mode": mode, "options": options, "model": content_hash(model_path),
             "training": tree_fingerprint(Path(case_dir) / "DataSets" / "TrainingSet"),
             "improvement": tree_fingerprint(Path(case_dir) / "DataSets" / "ImprovementSet")}
    for name in DIGESTED_TABLES:
        parts[name] = content_hash(t / name) if (t / name).is_file() else None
    return json_digest(parts)[:16]


def finished_reps(out_csv, inputs, case_dir):
    """{(rep, seed): row} of an earlier run with the same inputs whose model file still exists."""
    frame = try_read_table(out_csv) if Path(out_csv).is_file() else None
    if frame is None or "inputs" not in frame.columns:
        return {}
    frame = frame[(frame["inputs"] == inputs)]
    models_dir = Path(case_dir) / "DNNModels"
    return {(int(row["rep"]), int(row["seed"])): row for row in frame.to_dict("records")
            if (models_dir / row["model"]).is_file()}


def earlier_history(old_history, rep, inputs):
    """The history rows an earlier run wrote for repetition `rep` with the same inputs."""
    if old_history is None or not {"rep", "inputs"} <= set(old_history.columns):
        return []
    return old_history[(old_history["rep"] == rep) & (old_history["inputs"] == inputs)].to_dict("records")
