"""The pictures of the robustness step: one accuracy curve per perturbation, and one test image under
every perturbation and level."""
from pathlib import Path

from common.data import ImageSet
from robustness.perturbations import PERTURBATIONS, PerturbedSet, amplitudes


def plot_curve(path, name, rows, keypoints):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.files import atomic_path

    fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=100)
    ax.plot(rows["amplitude"], 100 * rows["accuracy"], marker="o", color="#1f5f8b")
    ax.set_ylim(0, 100)
    ax.set_xlabel("amplitude (0 = clean, 1 = " + PERTURBATIONS[name].at_full + ")", fontsize=7)
    ax.set_ylabel("within threshold %" if keypoints else "accuracy %")
    ax.set_title(name)
    for a, acc, setting in zip(rows["amplitude"], rows["accuracy"], rows["setting"]):
        ax.annotate(setting, (a, 100 * acc), textcoords="offset points", xytext=(0, 6), fontsize=5, ha="center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_examples(path, datasets_dir, image, spec, perturbations, levels, seed=0):
    """One test image under every perturbation and level (rows = perturbations, columns = levels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.files import atomic_path

    amps = amplitudes(levels)
    base = ImageSet(datasets_dir, [image], spec)
    fig, axes = plt.subplots(len(perturbations), len(amps), figsize=(1.1 * len(amps), 1.15 * len(perturbations)),
                             dpi=100, squeeze=False)
    for r, name in enumerate(perturbations):
        for level, a in enumerate(amps):
            shown = PerturbedSet(base, [name], [a], seed, "curves", [level]).image01(0)[0]
            ax = axes[r][level]
            ax.imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if level == 0:
                ax.set_ylabel(name, fontsize=7)
            if r == 0:
                ax.set_title(f"{a:.1f}", fontsize=7)
    fig.tight_layout(pad=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
