"""The `landmarks` case study (the paper's FLD): KPNet regresses 27 eye-region landmarks of grayscale renders.

    python -m casestudies landmarks -o CASE [--scale small|default] [--seed S] [--force] [--threads N]

The eye simulator (casestudies/eyes.py, gaze-task parameter distributions with its rare conditions:
extreme head pose, low light, half-closed eyes, blur, noise, glasses) renders each scene, converted to
grayscale at IMAGE_SIZE px, with its landmarks in 5 named components (COMPONENTS). Layout:

    DataSets/<split>/<nnnnnn>.png      images directly in the split folder (no class folders)
    DataSets/<split>/labels.csv        image (path relative to DataSets/), <keypoint>_x, <keypoint>_y, ...
    DataSets/params.csv                image, then every simulator parameter (RQ1)

Coordinates are in pixel-index units: (0, 0) is the centre of the top-left pixel. A keypoint hidden
by the eyelids or outside the image is missing: its two cells are empty (read as NaN; the original's
convention, both values <= 1e-5, is also read as missing). The improvement set has a labels.csv too,
which simulates HUDD step 5 (the engineer labelling the unsafe set).

The DNN is KPNet (input IMAGE_SIZE, width multiplier NET_WIDTH) trained with Adam on the original's
Gaussian target maps (sigma 5 px, peak 10; retrainModule.train_keypoints), saved as
DNNModels/OriginalModel.pth with task "keypoints", classes = the keypoint names and
extra["components"] = COMPONENTS. An image is an error when its mean keypoint error exceeds 4 px.

Measured at default scale (2 CPU cores shared with other jobs, threads=1): 5 min 47 s in all (images
about 30 s, training 329 s); test set 92.93% within 4 px (106 errors in 1500), mean error 2.61 px.
"""
import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from casestudies import eyes
from casestudies.casefolder import MODEL_FILE, plan, publish, read_marker, run_chunks, staging_dir
from common.errors import HUDDError
from common.files import write_csv

NAME = "landmarks"
IMAGE_SIZE = 64
NET_WIDTH = 0.25               # of the original KPNet's channels (96/192/224/128 -> 24/48/56/32)
KEYPOINTS = list(eyes.LANDMARK_NAMES)
_PARTS = eyes.LANDMARK_COMPONENTS
COMPONENTS = {"corners": _PARTS["corner"], "upper_lid": _PARTS["upper_lid"], "lower_lid": _PARTS["lower_lid"],
              "iris": _PARTS["iris_centre"] + _PARTS["iris"], "brow": _PARTS["brow"]}
SPLIT_IDS = {"TrainingSet": 1, "TestSet": 2, "ImprovementSet": 3}
TASK_ID = 3                    # separates this case study's random streams from gaze (1) and openclosed (2)
SCALES = {                     # images per split, training epochs, learning rate, batch size
    "small": ({"TrainingSet": 240, "TestSet": 100, "ImprovementSet": 200}, 4, 2e-3, 16),
    "default": ({"TrainingSet": 4000, "TestSet": 1500, "ImprovementSet": 6000}, 10, 2e-3, 32),
}
CHUNK = 250
PNG_LEVEL = 1
LABELS_FILE = "labels.csv"


def build(case_dir, seed=0, scale="default", progress=True, force=False, threads=None):
    """Build the landmarks case folder (data sets, labels, params.csv, trained KPNet); return its path.

    Refuses to replace existing data sets or model unless `force`; a build killed while training
    resumes at training (casestudies/casefolder.py). `threads`: torch threads for training.
    """
    if scale not in SCALES:
        raise HUDDError(f"--scale {scale!r}; use small or default")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HUDDError(f"--seed {seed!r}; use a non-negative integer")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise HUDDError(f"--threads {threads!r}; use a positive integer")
    case = Path(case_dir)
    marker = {"case_study": NAME, "seed": seed, "scale": scale}
    if plan(case, marker, force) == "data":
        staging = staging_dir(case)
        start = time.time()
        mean, std = write_datasets(staging, seed, scale, progress)
        publish(case, staging, {**marker, "mean": [mean], "std": [std], "write_seconds": round(time.time() - start, 1)})
    written = read_marker(case / "DataSets")
    train_original(case, (written["mean"][0],), (written["std"][0],), seed, scale, progress, threads)
    return case


def write_datasets(root, seed, scale, progress=True):
    """Render every split into `root` (a DataSets folder) with labels.csv per split and params.csv.

    Returns the mean and std of the training pixels (in [0, 1], for the model's normalisation).
    """
    root = Path(root)
    sizes = SCALES[scale][0]
    tables, stats = [], None
    for split, n in sizes.items():
        key = (seed, TASK_ID, SPLIT_IDS[split])
        params = eyes.sample_parameters(np.random.default_rng(key), n, "gaze", split)
        images = [f"{split}/{i:06d}.png" for i in range(n)]
        (root / split).mkdir(parents=True, exist_ok=True)
        jobs = list(zip(range(n), images, params.to_dict("records")))
        chunks = [jobs[i:i + CHUNK] for i in range(0, n, CHUNK)]
        results = run_chunks(functools.partial(_render_chunk, str(root), key), chunks, progress,
                             f"{NAME} {split}", n)
        points = np.concatenate([r[0] for r in results])
        labels = pd.DataFrame(points.reshape(n, -1), columns=_label_columns())
        write_csv(root / split / LABELS_FILE, pd.concat([pd.DataFrame({"image": images}), labels], axis=1))
        if split == "TrainingSet":
            stats = np.sum([r[1] for r in results], axis=0)
        tables.append(pd.concat([pd.DataFrame({"image": images}), params], axis=1))
    write_csv(root / "params.csv", pd.concat(tables, ignore_index=True))
    mean = stats[1] / stats[0]
    std = np.sqrt(max(stats[2] / stats[0] - mean ** 2, 1e-12))
    return round(float(mean), 4), round(float(std), 4)


def _label_columns():
    return [f"{name}_{axis}" for name in KEYPOINTS for axis in ("x", "y")]


def _render_chunk(root, key, jobs):
    """Render and save (index, path, parameters) jobs as grayscale PNGs.

    Returns ((n, 27, 2) keypoints in pixel-index units, NaN where hidden; [pixels, sum, sum of squares]).
    """
    points, total = [], np.zeros(3)
    for i, name, row in jobs:
        rgb, landmarks, visible = eyes.render_eye(row, IMAGE_SIZE, np.random.default_rng([*key, i]))
        gray = Image.fromarray(rgb).convert("L")
        gray.save(f"{root}/{name}", compress_level=PNG_LEVEL)
        kp = np.round(landmarks.astype(np.float64) - 0.5, 3)    # pixel centres are at i + 0.5 in the renderer
        kp[~visible] = np.nan
        points.append(kp)
        pixels = np.asarray(gray, dtype=np.float64) / 255.0
        total += [pixels.size, pixels.sum(), (pixels ** 2).sum()]
    return np.stack(points), total


def train_original(case_dir, mean, std, seed, scale, progress=True, threads=None):
    """Train KPNet on the training split as written (read back through ImageSet) and save OriginalModel.pth."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _train(Path(case_dir), mean, std, seed, scale, progress)
    finally:
        torch.set_num_threads(previous)


def _train(case, mean, std, seed, scale, progress):
    import torch

    import models
    import retrainModule
    from common.data import ImageSet, ImageSpec, resolve_device
    from testModule import list_keypoint_case

    _, epochs, lr, batch_size = SCALES[scale]
    train = list_keypoint_case(case, KEYPOINTS)["TrainingSet"]
    spec = ImageSpec(1, IMAGE_SIZE, IMAGE_SIZE, tuple(mean), tuple(std), "exact")
    arch_args = dict(num_keypoints=len(KEYPOINTS), in_channels=1, input_size=IMAGE_SIZE, width=NET_WIDTH)
    torch.manual_seed(seed)
    model = models.KPNet(**arch_args)
    start = time.time()
    history = retrainModule.train_keypoints(
        model, ImageSet(case / "DataSets", train.images, spec, train.labels), epochs=epochs,
        device=resolve_device("auto"), seed=seed, batch_size=batch_size, select="last",
        optimizer=functools.partial(retrainModule.adam, lr=lr),
        scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
        desc=f"train {NAME}", progress=progress)
    path = case / "DNNModels" / MODEL_FILE
    models.save_model(path, model, "kpnet", classes=KEYPOINTS, input_size=(1, IMAGE_SIZE, IMAGE_SIZE),
                      mean=mean, std=std, arch_args=arch_args, task="keypoints", preprocess="exact",
                      extra={"trained_by": "casestudies", "case_study": NAME, "seed": seed, "scale": scale,
                             "components": COMPONENTS, "epochs": epochs,
                             "final_train_loss": history[-1]["train_loss"],
                             "final_train_accuracy": history[-1]["train_accuracy"],
                             "train_seconds": round(time.time() - start, 1)})
    return path
