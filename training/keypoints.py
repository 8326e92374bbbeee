"""Training a keypoint regressor as the original's retrainKP: MSE between its output maps and Gaussian targets."""
import numpy as np
import torch
from torch import nn

from training.loop import fit
from training.optimisers import rmsprop

GAUSSIAN_SIGMA = 5.0           # px: the original's keypoint target maps
GAUSSIAN_SCALE = 10.0          # their peak value
FROZEN_CONVS = 4               # the original's modifyToTrain froze conv2d_1 to conv2d_4 when retraining


def gaussian_targets(coords, size, sigma=GAUSSIAN_SIGMA, scale=GAUSSIAN_SCALE):
    """(B, K, 2) keypoints (x, y in pixel-index units, NaN = missing) -> (B, K, H, W) target maps:
    scale * exp(-d^2 / (2 sigma^2)) around each keypoint; a missing keypoint's map is all zero."""
    coords = torch.as_tensor(coords, dtype=torch.float32)
    h, w = int(size[0]), int(size[1])
    ys = torch.arange(h, dtype=torch.float32, device=coords.device).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32, device=coords.device).view(1, 1, 1, w)
    dx = xs - coords[..., 0, None, None]
    dy = ys - coords[..., 1, None, None]
    maps = scale * torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))
    return torch.nan_to_num(maps, nan=0.0)


def freeze_convolutions(model, count=FROZEN_CONVS):
    """Stop training the first `count` convolutions (the original froze KPNet's first four when retraining)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)][:count]
    for conv in convs:
        for param in conv.parameters():
            param.requires_grad_(False)
    return len(convs)


def train_keypoints(model, train_set, *, epochs, device, optimizer=rmsprop, batch_size=128, seed=0, workers=0,
                    select="train-loss", val_set=None, desc="train", progress=True, scheduler=None,
                    sigma=GAUSSIAN_SIGMA, scale=GAUSSIAN_SCALE, threshold=None, freeze=0, monitor=None, position=None):
    """Train a keypoint regressor in place: MSE between its output maps and Gaussian target maps.

    train_set yields (image, (K, 2) keypoints with NaN for missing). `select`: "train-loss" (the
    original: lowest mean training loss), "val-accuracy" (share of `val_set` images whose mean error is
    within `threshold`), "train-accuracy" (that share on the training batches) or "last". `freeze`:
    leave the first that many convolutions untrained (the original: 4). History as train_classifier.
    """
    from testModule import DEFAULT_THRESHOLD, decode_keypoints, keypoint_errors, mean_errors, predict_keypoints

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if freeze:
        freeze_convolutions(model, freeze)
    loss_fn = nn.MSELoss()

    def step(outputs, targets):
        loss = loss_fn(outputs, gaussian_targets(targets, outputs.shape[-2:], sigma, scale))
        errors = mean_errors(keypoint_errors(decode_keypoints(outputs.detach().cpu()), targets.cpu().numpy()))
        return loss, int((errors <= threshold).sum())

    def validate():
        coords, _, _ = predict_keypoints(model, val_set, device, workers=workers, progress=False)
        errors = mean_errors(keypoint_errors(coords, np.stack(val_set.targets)))
        return float(np.mean(errors <= threshold))

    return fit(model, train_set, step, validate if val_set is not None else None, epochs=epochs, device=device,
               optimizer=optimizer, batch_size=batch_size, seed=seed, workers=workers, select=select, desc=desc,
               progress=progress, scheduler=scheduler, monitor=monitor, position=position)
