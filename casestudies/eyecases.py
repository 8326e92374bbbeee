"""The simulator case studies: `gaze` (8 gaze directions, the paper's GD) and `openclosed` (the paper's OC)."""
import functools

import numpy as np
import pandas as pd
from PIL import Image

from casestudies import eyes
from casestudies.casefolder import run_chunks
from common.files import write_csv

IMAGE_SIZE = 48
SPLIT_IDS = {"TrainingSet": 1, "TestSet": 2, "ImprovementSet": 3}
TASK_IDS = {"gaze": 1, "openclosed": 2}
SCALES = {
    "small": {"TrainingSet": 320, "TestSet": 120, "ImprovementSet": 240},
    "default": {"TrainingSet": 14000, "TestSet": 3000, "ImprovementSet": 12000},   # Step 3: 4 x the test set
}
CHUNK = 250
PNG_LEVEL = 1               # fast zlib level; the pixels are what matter


def labels_for(task, params):
    if task == "gaze":
        return eyes.gaze_labels(params["gaze_h"], params["gaze_v"])
    return eyes.eye_state_labels(params["eyelid_opening"])


def write_datasets(root, task, seed, scale, progress=True, design=eyes.DEFAULT_DESIGN):
    """Render every split of `task` into `root` (a DataSets folder) and write params.csv.

    `design` sets how rare the named conditions are in TrainingSet (casestudies.DESIGNS); a design other
    than the default also writes each condition as a 0/1 column of params.csv (eyes.CONDITION_COLUMN).
    Returns the per-channel mean and std of the training images (for the model's normalisation).
    """
    tables, sums = [], None
    for split, n in SCALES[scale].items():
        rng = np.random.default_rng([seed, TASK_IDS[task], SPLIT_IDS[split]])
        params = eyes.sample_parameters(rng, n, task, split, design)
        labels = labels_for(task, params)
        images = [f"{split}/{label}/{i:06d}.png" for i, label in enumerate(labels)]
        for label in (eyes.GAZE_SECTORS if task == "gaze" else eyes.EYE_STATES):
            (root / split / label).mkdir(parents=True, exist_ok=True)
        rows = params.to_dict("records")
        jobs = list(zip(range(n), images, rows))
        chunks = [jobs[i:i + CHUNK] for i in range(0, n, CHUNK)]
        work = functools.partial(_render_chunk, str(root), (seed, TASK_IDS[task], SPLIT_IDS[split]))
        stats = run_chunks(work, chunks, progress, f"{task} {split}", n)
        if split == "TrainingSet":
            sums = np.sum(stats, axis=0)
        columns = [params] if design == eyes.DEFAULT_DESIGN else [params, eyes.condition_columns(params, task)]
        tables.append(pd.concat([pd.DataFrame({"image": images}), *columns], axis=1))
    write_csv(root / "params.csv", pd.concat(tables, ignore_index=True))
    count = sums[0]
    mean = sums[1:4] / count
    std = np.sqrt(np.maximum(sums[4:7] / count - mean ** 2, 1e-12))
    return tuple(np.round(mean, 4).tolist()), tuple(np.round(std, 4).tolist())


def _render_chunk(root, key, jobs):
    """Render and save (index, image path, parameters) jobs; return [pixel count, channel sums, sums of squares]."""
    total = np.zeros(7)
    for i, name, row in jobs:
        image, _, _ = eyes.render_eye(row, IMAGE_SIZE, np.random.default_rng([*key, i]))
        Image.fromarray(image).save(f"{root}/{name}", compress_level=PNG_LEVEL)
        pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
        total += np.concatenate([[len(pixels)], pixels.sum(0), (pixels ** 2).sum(0)])
    return total
