"""The pictures an engineer looks at per layer: one GIF per cluster, the WICD curve with the chosen k."""
from pathlib import Path

import numpy as np

from common.files import atomic_path

GIF_SECONDS_PER_FRAME = 0.6         # 100 images per minute, the paper's setting
GIF_MAX_FRAMES = 100                # longer clusters show their 100 images closest to the medoid
GIF_MAX_SIDE = 256


def _read_frame(path, size=None):
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is None:
            scale = min(1.0, GIF_MAX_SIDE / max(img.size))
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return np.asarray(img), size


def write_gif(paths, out, seconds_per_frame=GIF_SECONDS_PER_FRAME):
    """An animated GIF of the images, all at the first image's size (capped at GIF_MAX_SIDE)."""
    import imageio.v3 as iio

    frames, size = [], None
    for path in paths:
        frame, size = _read_frame(path, size)
        frames.append(frame)
    with atomic_path(out) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(round(seconds_per_frame * 1000)),
                    loop=0)
    return Path(out)


def plot_wicd(result, out, layer=""):
    """The WICD curve and its 4th-order gradient, the chosen k marked on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ks, k = result["ks"], result["k"]
    top.plot(ks, result["curve"], color="tab:blue")
    bottom.plot(ks, result["gradient"], color="tab:orange")
    if k in set(np.asarray(ks).tolist()):
        i = int(k - ks[0])
        top.plot([k], [result["curve"][i]], "ro", ms=6)
        bottom.plot([k], [result["gradient"][i]], "ro", ms=6)
    for ax in (top, bottom):
        ax.axvline(k, color="red", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    top.set_ylabel("WICD (normalised)")
    bottom.set_ylabel("4th-order gradient")
    bottom.set_xlabel("number of clusters k")
    top.set_title(f"{layer}: k = {k} ({result['knee_method']})")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(out)
