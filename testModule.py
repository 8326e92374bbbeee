"""Step 'test': run the DNN over the data sets and decide which images are errors."""
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import ImageSet, ImageSpec, batches
from common.errors import HUDDError
from common.files import write_csv

RESULT_FILES = {"TrainingSet": "trainResult.csv", "TestSet": "testResult.csv", "ImprovementSet": "improveResult.csv"}
SKIPPED_COLUMNS = ["image", "reason"]


def check_classes(meta, splits, model_path):
    """The model's classes must be the class folders, in the same order."""
    folders = next((s.classes for s in splits.values() if s.labelled), None)
    classes = meta.get("classes")
    if folders is None:
        if classes is None:
            raise HUDDError(f"{model_path}: the model file names no classes and no split is labelled; "
                            f"re-save the model with models.save_model(..., classes=[...])")
        return list(classes)
    if classes is not None and list(classes) != list(folders):
        raise HUDDError(f"{model_path}: model classes {list(classes)} differ from the class folders "
                        f"{list(folders)} of DataSets/; use the model trained on these classes")
    return list(folders)


def predict(model, dataset, device, batch_size=64, workers=0, desc=None, progress=True):
    """Logits (N, K) as float32, and {index: reason} for images that could not be read."""
    model.eval()
    outputs, skipped = [None] * len(dataset), {}
    with torch.no_grad():
        for inputs, _, indices, errors in batches(dataset, batch_size, workers, desc=desc, progress=progress):
            logits = model(inputs.to(device)).float().cpu().numpy()
            for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                if error:
                    skipped[index] = error
                else:
                    outputs[index] = logits[row]
    width = next((o.shape[0] for o in outputs if o is not None), 0)
    filled = np.stack([o if o is not None else np.full(width, np.nan, np.float32) for o in outputs]) \
        if outputs else np.zeros((0, 0), np.float32)
    return filled, skipped


def results_frame(images, labels, classes, logits):
    """The original's CSV layout: image,result,expected,predicted,<logit per class> (full precision)."""
    if logits.shape[1] != len(classes):
        raise HUDDError(f"the model has {logits.shape[1]} outputs but there are {len(classes)} classes "
                        f"({', '.join(classes)}); use a model trained on these class folders")
    predicted = [classes[i] for i in logits.argmax(1)]
    if labels and labels[0] is not None:
        expected = list(labels)
        result = ["Correct" if e == p else "Wrong" for e, p in zip(expected, predicted)]
    else:
        expected = [""] * len(images)
        result = ["Unlabelled"] * len(images)
    frame = pd.DataFrame({"image": images, "result": result, "expected": expected, "predicted": predicted})
    logit_columns = pd.DataFrame(logits.astype(np.float64), columns=list(classes))
    return pd.concat([frame, logit_columns], axis=1)


def write_results(case_dir, splits, model, meta, classes, device, batch_size=64, workers=0, progress=True):
    """Write trainResult.csv, testResult.csv and improveResult.csv; unreadable images go to T/skipped.csv.

    Returns {split name: DataFrame}. A corrupt or truncated image is skipped (listed with its reason),
    not fatal: a run over tens of thousands of images must not die at the last one.
    """
    case_dir = Path(case_dir)
    spec = ImageSpec.from_meta(meta)
    datasets = case_dir / "DataSets"
    frames, skipped_rows = {}, []
    for name, split in splits.items():
        dataset = ImageSet(datasets, split.images, spec)
        logits, skipped = predict(model, dataset, device, batch_size, workers, desc=f"test {name}", progress=progress)
        keep = [i for i in range(len(split)) if i not in skipped]
        skipped_rows += [(split.images[i], reason) for i, reason in sorted(skipped.items())]
        if not keep:
            raise HUDDError(f"{datasets / name}: none of its {len(split)} images could be read "
                            f"(first: {split.images[0]}: {skipped.get(0, '')}); replace the files")
        frame = results_frame([split.images[i] for i in keep], [split.labels[i] for i in keep],
                              classes, logits[keep])
        write_csv(case_dir / RESULT_FILES[name], frame)
        frames[name] = frame
    write_csv(case_dir / "T" / "skipped.csv", pd.DataFrame(skipped_rows, columns=SKIPPED_COLUMNS))
    return frames


def read_results(path):
    """Read a result CSV written by write_results, checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise HUDDError(f"{path}: missing; run the test step first (python HUDD.py -o CASE -step test)")
    frame = pd.read_csv(path, keep_default_na=False)
    missing = {"image", "result", "expected", "predicted"} - set(frame.columns)
    if missing:
        raise HUDDError(f"{path}: not a result file (missing columns {sorted(missing)}); rerun the test step")
    return frame


def accuracy_of(frame):
    labelled = frame[frame["result"].isin(["Correct", "Wrong"])]
    return float((labelled["result"] == "Correct").mean()) if len(labelled) else float("nan")
