"""Benchmark of the measured properties: decoding alone vs decoding + properties, over the tool's loader.

N PNG files (colour, SIDE x SIDE, a bright blob on a noisy background) are written once to a temporary
folder and read back through common.data.ImageSet / batches, as the properties step reads them. The goal
is that the properties cost at most as much as decoding (ratio <= 2).

    .venv/bin/python bench/properties.py                 # N = 3000, 64x64 colour
    .venv/bin/python bench/properties.py -n 5000 --side 28 --channels 1
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_images(root, n, side, channels, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    keys = []
    yy, xx = np.mgrid[:side, :side]
    for i in range(n):
        cy, cx, r = rng.uniform(0.2, 0.8) * side, rng.uniform(0.2, 0.8) * side, rng.uniform(0.1, 0.3) * side
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        base = rng.uniform(0.1, 0.4) + 0.5 * blob + rng.normal(0, 0.03, (side, side))
        image = np.clip(base[..., None] * rng.uniform(0.6, 1.0, channels), 0, 1)
        array = (255 * image).astype(np.uint8)
        key = f"TestSet/c/{i:05d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array[..., 0] if channels == 1 else array).save(root / key)
        keys.append(key)
    return keys


def timed(root, keys, spec, batch_size, measure):
    from common.data import ImageSet, batches
    from explain.properties import _unit, image_properties

    start = time.perf_counter()
    for inputs, _, _, _ in batches(ImageSet(root, keys, _unit(spec)), batch_size, progress=False):
        if measure:
            image_properties(inputs)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="images (default 3000)")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args(argv)
    import torch

    from common.data import ImageSpec

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = write_images(root, args.n, args.side, args.channels)
        spec = ImageSpec(args.channels, args.side, args.side)
        timed(root, keys[:args.batch_size], spec, args.batch_size, True)                    # warm-up
        decode = min(timed(root, keys, spec, args.batch_size, False) for _ in range(args.repeats))
        both = min(timed(root, keys, spec, args.batch_size, True) for _ in range(args.repeats))
    properties = both - decode
    print(f"{args.n} images {args.channels}x{args.side}x{args.side}, batch {args.batch_size}, 1 thread, "
          f"best of {args.repeats}")
    print(f"decoding alone        {decode:7.2f} s  ({args.n / decode:,.0f} images/s)")
    print(f"decoding + properties {both:7.2f} s  ({args.n / both:,.0f} images/s)")
    print(f"properties / decoding {properties / decode:7.2f}  (goal: at most 1)")


if __name__ == "__main__":
    main()
