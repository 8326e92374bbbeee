"""HUDD command line: `python HUDD.py -o CASE -m MODEL -mode HUDD|BL1|BL2|HUDD-U|GINI|... [-rq True] [-step STEP]`."""
import argparse
import dataclasses
import sys

import Helper
from common.errors import HUDDError, InternalError


def boolean(text):
    """'True'/'False' as the original's flags were written, but really parsed."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y"):
        return True
    if value in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def perturbation_list(text):
    import robustnessModule

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    try:
        return tuple(robustnessModule.check_perturbations(names))
    except HUDDError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


UNCERTAINTY_SCORES = ("GINI", "MARGIN", "ENTROPY", "MC-DROPOUT")   # selection.uncertainty's, without importing torch


def parser():
    import retrainModule

    defaults = Helper.Options()
    p = argparse.ArgumentParser(prog="HUDD.py", description="Heatmap-based Unsupervised Debugging of DNNs.")
    p.add_argument("-o", "--outputPathX", dest="case", required=True, help="the case folder (holds DataSets/)")
    p.add_argument("-m", "--modelName", dest="model", default="OriginalModel.pth",
                   help="model file in CASE/DNNModels/ or a path (default: OriginalModel.pth)")
    p.add_argument("-mode", "--retrainMode", dest="mode", choices=list(retrainModule.MODES), default=defaults.mode,
                   help="how the retraining images are chosen (default: HUDD): HUDD, BL1, BL2; HUDD-U (HUDD's "
                        "per-cluster counts, most uncertain first); GINI, MARGIN, ENTROPY (the most uncertain "
                        "improvement images; MC-DROPOUT for a keypoint DNN with dropout); NONE (no added image: the "
                        "floor); ALL (the whole labelled improvement set: the ceiling)")
    p.add_argument("--hudd-u-score", choices=list(UNCERTAINTY_SCORES), default=defaults.hudd_u_score,
                   help="-mode HUDD-U: the uncertainty that orders each cluster's candidates (default: GINI for a "
                        "classifier, MC-DROPOUT for a keypoint DNN)")
    p.add_argument("-rq", dest="rq", type=boolean, default=False, metavar="True|False",
                   help="compute RQ1 and a rule per cluster from DataSets/params.csv, or from the measured image "
                        "properties (T/properties.csv, measured first) when it is absent")
    p.add_argument("-step", dest="step", choices=[*Helper.STEPS, "robustness", "properties"],
                   help="rerun this one step on the cached T/ folder (earlier missing steps run first); "
                        "robustness: perturbation curves and, when asked, perturbed images (see --perturb-*); "
                        "properties: measure T/properties.csv again (brightness, contrast, sharpness, ...)")
    p.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="local engine: data-loading processes; ray engine: actors (0 = one per CPU or GPU)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--rule", default=defaults.rule, help="LRP rule preset: hudd, hudd-compat, epsilon, composite")
    p.add_argument("--heatmap-dtype", choices=["float32", "float16"], default=defaults.heatmap_dtype)
    p.add_argument("--xlsx", type=boolean, default=defaults.xlsx, metavar="True|False",
                   help="also export distance matrices as XLSX, as the original (only up to 16,384 images)")
    p.add_argument("--max-clusters", type=positive_int, default=defaults.max_clusters,
                   help="largest number of clusters tried (default 500; never more than half the errors)")
    p.add_argument("--optimal-ordering", type=boolean, default=defaults.optimal_ordering, metavar="True|False",
                   help="optimal leaf ordering of the dendrogram, as the original (slow beyond a few thousand errors)")
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="retraining epochs (original: 10)")
    p.add_argument("--reps", type=positive_int, default=defaults.reps, help="retraining repetitions")
    p.add_argument("--baseline-budget-factor", type=float, default=defaults.baseline_budget_factor,
                   help="BL1/BL2 labelling budget as a share of HUDD's (1 = equal; 0.3 = the original code)")
    p.add_argument("--retrain-factor", type=positive_float, default=defaults.retrain_factor,
                   help="HUDD's retraining images per cluster, times its size (original: 1; 2 = every labelled "
                        "image of the unsafe set at the default --assign-factor)")
    p.add_argument("--assign-factor", type=float, default=defaults.assign_factor,
                   help="unsafe-set quota per cluster, times its size (original: 2)")
    p.add_argument("--select", choices=["train-accuracy", "val-accuracy", "last"], default=defaults.select,
                   help="which retraining epoch to keep (original: best training accuracy)")
    p.add_argument("--lr", type=positive_float, default=defaults.lr,
                   help="retraining learning rate (default: the original's 1e-3, SGD; RMSprop for keypoints)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default=defaults.schedule,
                   help="retraining learning-rate schedule (default cosine: falls to 0 over the epochs; the "
                        "original's: constant)")
    p.add_argument("--monitor-test", type=boolean, default=defaults.monitor_test, metavar="True|False",
                   help="record the test accuracy after every retraining epoch in T/retrain_<mode>_history.csv "
                        "(a diagnosis; never used to choose the kept epoch)")
    p.add_argument("--threshold", type=positive_float, default=defaults.threshold,
                   help="keypoint regressors: an image is Wrong when its mean keypoint error is above this (px; "
                        "default 4)")
    p.add_argument("--freeze", type=nonnegative_int, default=defaults.freeze,
                   help="keypoint regressors: convolutions frozen when retraining (default 4, the original's; 0 = none)")
    p.add_argument("--engine", choices=["local", "ray"], default=defaults.engine,
                   help="how the test step's inference and the assign step's improvement heatmaps run: local (this "
                        "process) or ray (Ray Data actors; --workers actors, 0 = one per CPU or GPU)")
    p.add_argument("--ray-address", default=defaults.ray_address,
                   help="--engine ray: auto or HOST:PORT or ray://HOST:PORT joins a running cluster, a token-protected "
                        "one with this machine's token (docs/ray.md); default: a Ray of its own on this machine, "
                        "even beside another cluster")
    p.add_argument("--perturbations", type=perturbation_list, default=defaults.perturbations,
                   help="-step robustness: comma-separated, from brightness,contrast,blur,noise,dead-pixels,"
                        "occlusion,rotation (default: all; no rotation for keypoint DNNs)")
    p.add_argument("--levels", type=positive_int, default=defaults.levels,
                   help="-step robustness: amplitude levels above the clean image (default 5)")
    p.add_argument("--perturb-improvement", type=nonnegative_int, default=defaults.perturb_improvement,
                   metavar="N", help="-step robustness: write DataSets/ImprovementSet as N perturbed training images "
                                     "at the amplitudes where accuracy falls (an existing set is moved aside)")
    p.add_argument("--perturb-test", type=nonnegative_int, default=defaults.perturb_test, metavar="N",
                   help="-step robustness: add N perturbed test copies in DataSets/TestSet/<class>/perturbed/ "
                        "(classifiers), so that clusters, RQ1 and rules name the perturbations")
    p.add_argument("--trust-model", action="store_true", help="allow loading a full pickle (it can run code)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def options_from(args):
    fields = {f.name for f in dataclasses.fields(Helper.Options)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    return Helper.Options(**values)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        summaries = Helper.run(args.case, args.model, options_from(args), step=args.step)
        with Helper.stage(args.case, "summary"):
            print(Helper.summary_text(args.case, summaries))
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InternalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished steps are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
