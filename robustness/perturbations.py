"""The perturbations: small declarative objects, each a name, what its amplitude means physically, and a
function of an image in [0, 1] and an amplitude in [0, 1] (0 is the identity, 1 the strongest level
tried). The photometric and geometric operations are torchvision.transforms.v2's functional ops; random
parts (noise, dead pixels, where the occluder sits, the sense of a rotation) come from a numpy generator
seeded by (seed, purpose, perturbation, level, image index), so every perturbed image is the same for a
seed whatever the batch size or the number of workers."""
import math
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import HUDDError

PURPOSE = {"curves": 0, "improvement": 1, "test": 2}


def _brightness(x, a, rng):
    import torchvision.transforms.v2.functional as F

    return F.adjust_brightness(x, 1.0 - 0.9 * a)


def _contrast(x, a, rng):
    import torchvision.transforms.v2.functional as F

    return F.adjust_contrast(x, 1.0 - 0.9 * a)


def _blur_sigma(a, shape):
    return a * max(shape[-2:]) / 16.0


def _blur(x, a, rng):
    import torchvision.transforms.v2.functional as F

    sigma = _blur_sigma(a, x.shape)
    largest = min(x.shape[-2:]) - (1 - min(x.shape[-2:]) % 2)      # odd and inside the image
    kernel = max(3, min(2 * math.ceil(3 * sigma) + 1, largest))
    return F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def _noise(x, a, rng):
    return x + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)) * (0.25 * a)


def _dead_pixels(x, a, rng):
    dead = torch.from_numpy(rng.random(x.shape[-2:]) < 0.25 * a)
    return x.masked_fill(dead, 0.0)


def _occlusion_side(a, shape):
    return int(round(0.5 * a * min(shape[-2:])))


def _occlusion(x, a, rng):
    import torchvision.transforms.v2.functional as F

    side = _occlusion_side(a, x.shape)
    if side == 0:
        return x
    top = int(rng.integers(0, x.shape[-2] - side + 1))
    left = int(rng.integers(0, x.shape[-1] - side + 1))
    return F.erase(x, top, left, side, side, torch.tensor(0.5))


def _rotation(x, a, rng):
    import torchvision.transforms.v2.functional as F

    sign = 1.0 if rng.random() < 0.5 else -1.0
    return F.rotate(x, sign * 45.0 * a, interpolation=F.InterpolationMode.BILINEAR, fill=0.0)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: `apply(image in [0, 1], amplitude in [0, 1], rng)`, with what amplitude 1 means
    and `describe(amplitude, shape)`, the amplitude in physical terms."""

    name: str
    apply: object
    describe: object
    at_full: str            # the strongest level, in the image's own terms (the README's table)
    geometric: bool = False  # moves the pixels, so keypoints would move with them

    def setting(self, amplitude, shape):
        """The amplitude in physical terms, for curves.csv and the plots."""
        return self.describe(float(amplitude), shape)


PERTURBATIONS = {p.name: p for p in (
    Perturbation("brightness", _brightness, lambda a, shape: f"x{1 - 0.9 * a:.2f} intensity", "intensity x0.1"),
    Perturbation("contrast", _contrast, lambda a, shape: f"x{1 - 0.9 * a:.2f} contrast", "contrast x0.1"),
    Perturbation("blur", _blur, lambda a, shape: f"sigma {_blur_sigma(a, shape):.2f} px",
                 "Gaussian sigma = image size / 16"),
    Perturbation("noise", _noise, lambda a, shape: f"std {255 * 0.25 * a:.0f} grey levels",
                 "Gaussian noise, std 64 grey levels"),
    Perturbation("dead-pixels", _dead_pixels, lambda a, shape: f"{100 * 0.25 * a:.1f}% pixels black",
                 "25% of the pixels black"),
    Perturbation("occlusion", _occlusion, lambda a, shape: f"{_occlusion_side(a, shape)} px grey square",
                 "a grey square of half the image's side"),
    Perturbation("rotation", _rotation, lambda a, shape: f"+-{45 * a:.0f} deg", "+-45 degrees", geometric=True),
)}


def default_perturbations(keypoints=False):
    """Every perturbation; a keypoint DNN's ground truth would move with a rotation, so it gets none."""
    return [name for name, p in PERTURBATIONS.items() if not (keypoints and p.geometric)]


def check_perturbations(names, keypoints=False):
    """The perturbation names, validated; None means the default list."""
    if names is None:
        return default_perturbations(keypoints)
    names = list(names)
    if not names:
        raise HUDDError(f"--perturbations: no perturbation named; choose from {','.join(PERTURBATIONS)}")
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise HUDDError(f"--perturbations {','.join(names)}: unknown {', '.join(unknown)}; "
                        f"choose from {','.join(PERTURBATIONS)}")
    moving = [n for n in names if keypoints and PERTURBATIONS[n].geometric]
    if moving:
        raise HUDDError(f"--perturbations: {', '.join(moving)} moves the keypoints of a keypoint DNN, whose ground "
                        f"truth would then be wrong; leave it out")
    if len(set(names)) != len(names):
        raise HUDDError(f"--perturbations {','.join(names)}: a perturbation is named twice; name each once")
    return names


def amplitudes(levels):
    """Amplitude of each level: 0 (the clean image), then `levels` steps up to 1."""
    if int(levels) < 1:
        raise HUDDError(f"--levels {levels}: needs at least 1 amplitude level")
    return np.linspace(0.0, 1.0, int(levels) + 1)


def rng_for(seed, purpose, perturbation, level, index):
    """The generator of one perturbed image: independent of batches, workers and the other images."""
    return np.random.default_rng([int(seed), PURPOSE[purpose], list(PERTURBATIONS).index(perturbation),
                                  int(level), int(index)])


def perturb(image, name, amplitude, rng):
    """`image` (C, H, W) in [0, 1] perturbed by `name` at `amplitude` in [0, 1], clipped to [0, 1]."""
    if not 0.0 <= float(amplitude) <= 1.0:
        raise HUDDError(f"perturbation amplitude {amplitude}: must lie in [0, 1]")
    if float(amplitude) == 0.0:
        return image.clone()
    return PERTURBATIONS[name].apply(image, float(amplitude), rng).clamp(0.0, 1.0)


class PerturbedSet(torch.utils.data.Dataset):
    """Images of the case folder perturbed on the fly: the same (input, target, index, error) items as
    ImageSet, with the perturbation applied in [0, 1] before the model's normalisation."""

    def __init__(self, base, names, amplitudes_, seed, purpose, levels=None):
        self.base, self.names, self.amplitudes = base, list(names), list(amplitudes_)
        self.levels = list(levels) if levels is not None else [0] * len(self.names)
        self.seed, self.purpose = seed, purpose
        spec = base.spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.base)

    def image01(self, index):
        tensor, target, _, error = self.base[index]
        clean = (tensor * self.std + self.mean).clamp(0.0, 1.0)
        name = self.names[index]
        if error or name is None:
            return clean, target, error
        rng = rng_for(self.seed, self.purpose, name, self.levels[index], index)
        return perturb(clean, name, self.amplitudes[index], rng), target, error

    def __getitem__(self, index):
        image, target, error = self.image01(index)
        return (image - self.mean) / self.std, target, index, error


class DecodedSet(torch.utils.data.Dataset):
    """An ImageSet's items decoded once and kept: every perturbed pass of the curves then starts from
    memory instead of decoding each file again (a third to a half of a pass on small images)."""

    def __init__(self, base):
        self.spec = base.spec
        self.items = [base[i] for i in range(len(base))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
