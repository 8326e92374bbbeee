"""The typed options of a HUDD run: one dataclass, the command line's flags with the faithful defaults."""
from dataclasses import dataclass


@dataclass
class Options:
    """Every typed option of the command line, with the faithful defaults."""

    device: str = "auto"
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    rule: str = "hudd"
    heatmap_dtype: str = "float32"
    max_clusters: int = 500
    optimal_ordering: bool = False  # scipy's optimal leaf ordering of the dendrogram (the original's; slow)
    rq: bool = False
    mode: str = "HUDD"          # retrainModule.MODES
    hudd_u_score: str | None = None  # HUDD-U's uncertainty score; None = GINI (MC-DROPOUT for a keypoint DNN)
    epochs: int = 10
    reps: int = 1
    baseline_budget_factor: float = 1.0
    retrain_factor: float = 1.0  # HUDD retrains on this x |c| of each cluster's unsafe images (the original's 1)
    assign_factor: float = 2.0
    select: str = "train-accuracy"
    trust_model: bool = False
    xlsx: bool = True
    progress: bool = True
    threshold: float = 4.0      # keypoint regressors: Wrong when the mean keypoint error is above this (px)
    freeze: int = 4             # keypoint regressors: first convolutions frozen when retraining (the original's 4)
    lr: float | None = None     # retraining learning rate; None = the original's 1e-3 (SGD, or RMSprop for keypoints)
    schedule: str = "cosine"    # retraining learning-rate schedule: cosine, or constant (the original's)
    monitor_test: bool = False  # record the test accuracy after every retraining epoch (a diagnosis)
    engine: str = "local"       # how per-image work runs: local (this process) or ray (Ray Data actors)
    ray_address: str | None = None  # --engine ray: None starts Ray here; auto or HOST:PORT joins a cluster
    perturbations: tuple | None = None  # robustness: which perturbations (None = every one the task allows)
    levels: int = 5             # robustness: amplitude levels above the clean image
    perturb_improvement: int = 0  # robustness: write an improvement set of this many perturbed training images
    perturb_test: int = 0       # robustness: add this many perturbed test copies (classifiers)

    def subset(self, names):
        return {name: getattr(self, name) for name in names}
