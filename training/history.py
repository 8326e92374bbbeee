"""The picture of a training's history: accuracy per epoch for every repetition, the kept epoch marked."""
from common.files import atomic_path

HISTORY_CURVES = (("train_accuracy", "training", "-"), ("val_accuracy", "held-out", "--"), ("test_accuracy", "test", ":"))


def write_history_plot(history, path, original_accuracy=None):
    """One PNG of the accuracies per retraining epoch (every repetition; the kept epoch marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history is None or not len(history):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for rep, part in history.groupby("rep"):
        for column, name, style in HISTORY_CURVES:
            if column in part.columns and part[column].notna().any():
                line, = ax.plot(part["epoch"], 100 * part[column], style, label=f"{name}, rep {rep}")
                kept = part[part["kept"].astype(str) == "True"]
                ax.plot(kept["epoch"], 100 * kept[column], "o", color=line.get_color())
    if original_accuracy is not None:
        ax.axhline(100 * original_accuracy, color="grey", lw=0.8, label="test, before retraining")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{history['mode'].iloc[0]}: accuracy per epoch (dot: kept epoch)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
