"""Per-image inference shared by the test step and both engines: logits, keypoint maps decoded to
coordinates, and the stacking of per-image outputs with NaN rows for unreadable images.

It lives here, not in testModule, so that engines/ (which testModule calls) never imports testModule.
"""
import numpy as np
import torch

from common.data import batches

TOP_POINTS = 64               # a predicted coordinate is the weighted mean of the 64 highest pixels of its map


def stack_filled(items, empty_shape):
    """Per-image arrays stacked into one float32 array, NaN rows for the images that could not be read
    (None). The row shape is the first read image's, or `empty_shape` when no image was read; both
    engines build their outputs with it so that an unreadable image looks the same on either."""
    shape = next((np.shape(i) for i in items if i is not None), tuple(empty_shape))
    if not len(items):
        return np.zeros((0, *shape), np.float32)
    return np.stack([np.asarray(i, np.float32) if i is not None else np.full(shape, np.nan, np.float32)
                     for i in items])


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
    return stack_filled(outputs, (0,)), skipped


def _top_points(maps, n_points):
    """Normalised weights and x, y of the `n_points` highest pixels of each (N, K, H, W) map."""
    maps = torch.as_tensor(maps, dtype=torch.float32)
    n, k, h, w = maps.shape
    values, where = maps.reshape(n, k, h * w).topk(min(n_points, h * w), dim=2)
    weights = values.clamp(min=0)
    total = weights.sum(2, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp(min=1e-30), torch.full_like(weights, 1.0 / values.shape[2]))
    return weights, (where % w).float(), torch.div(where, w, rounding_mode="floor").float()


def decode_keypoints(maps, n_points=TOP_POINTS):
    """(N, K, H, W) output maps -> (N, K, 2) coordinates (x, y): the mean of the `n_points` highest
    pixels of each map, weighted by their values (clipped at 0; equal weights if all are <= 0)."""
    weights, x, y = _top_points(maps, n_points)
    return torch.stack([(weights * x).sum(2), (weights * y).sum(2)], dim=2).numpy()


def map_spread(maps, n_points=TOP_POINTS):
    """(N, K) spread of each map (px): the weighted standard distance of its `n_points` highest pixels
    from their weighted mean. A sharp, single peak gives a small spread; an unsure map a wide one."""
    weights, x, y = _top_points(maps, n_points)
    mx, my = (weights * x).sum(2, keepdim=True), (weights * y).sum(2, keepdim=True)
    return (weights * ((x - mx) ** 2 + (y - my) ** 2)).sum(2).sqrt()


def predict_keypoints(model, dataset, device, batch_size=64, workers=0, desc=None, progress=True,
                      n_points=TOP_POINTS):
    """(N, K, 2) predicted coordinates, (N, K) peak values of the maps, {index: reason} of unreadable images."""
    model.eval()
    coords, peaks, skipped = [None] * len(dataset), [None] * len(dataset), {}
    with torch.no_grad():
        for inputs, _, indices, errors in batches(dataset, batch_size, workers, desc=desc, progress=progress):
            maps = model(inputs.to(device)).float().cpu()
            decoded = decode_keypoints(maps, n_points)
            top = maps.flatten(2).amax(2).numpy()
            for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
                if error:
                    skipped[index] = error
                else:
                    coords[index], peaks[index] = decoded[row], top[row]
    return stack_filled(coords, (0, 2)), stack_filled(peaks, (0,)), skipped
