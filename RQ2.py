"""RQ2 of the HUDD paper: does retraining on HUDD's unsafe set beat BL1 and BL2 at the same labelling budget?

    python RQ2.py -o CASE -m MODEL [-reps N] [-modes HUDD,BL1,BL2,...|all] [--epochs E] [--seed S] [--jobs J]

Runs the pipeline up to the unsafe set (cached steps are skipped), then retrains the model N times
per mode, repetition r using the same seed in every mode, and writes CASE/RQ2.csv, CASE/RQ2.xlsx and
CASE/RQ2_boxplot.png (mean, std, min, max of test accuracy and gain; Mann-Whitney U p-value and
Vargha-Delaney A12 of HUDD, and HUDD-U, against each other mode; gain over NONE and share of ALL - NONE
when those reference rows ran; what each selection covers). Each repetition's model is kept in DNNModels/ and
its row in T/retrain_<mode>.csv as soon as it finishes, so an interrupted RQ2 resumes at the first
repetition it had not finished when the same command is run again.
"""
import argparse
import sys

import Helper
import retrainModule
from common.errors import HUDDError, InternalError
from evaluation.rq2_runs import run_rq2
from HUDD import UNCERTAINTY_SCORES, boolean, nonnegative_int, positive_float, positive_int
from training.loop import SELECTIONS
from training.optimisers import SCHEDULES
from training.recipe import DEFAULT_EPOCHS, DEFAULT_HOLDOUT, RETRAIN_BATCH_SIZE

DEFAULT_REPS = 10              # the original's repetitions per mode


ALL_MODES = "all"              # -modes all: every mode the model's task can run


def mode_list(text):
    if text.strip() == ALL_MODES:
        return [ALL_MODES]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in retrainModule.MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(retrainModule.MODES)}, "
                                         f"or {ALL_MODES}, got {text!r}")
    return modes


def task_modes(modes, model_path, trust=False):
    """-modes all: every mode of the model's task (MC-DROPOUT for keypoint DNNs with dropout layers, GINI,
    MARGIN, ENTROPY for classifiers); any other list as given."""
    if modes != [ALL_MODES]:
        return modes
    import models
    import testModule
    from selection.uncertainty import CLASS_METHODS, KEYPOINT_METHOD, dropout_layers

    model, meta = models.load_model(model_path, "cpu", trust=trust)
    keypoints = testModule.is_keypoint_task(meta)
    left_out = CLASS_METHODS if keypoints else (KEYPOINT_METHOD,)
    if keypoints and not dropout_layers(model):
        left_out += (KEYPOINT_METHOD, "HUDD-U")
    return [m for m in retrainModule.MODES if m not in left_out]


def parser():
    defaults = Helper.Options()
    p = argparse.ArgumentParser(prog="RQ2.py", description="RQ2: HUDD against BL1 and BL2 over repeated retrainings.")
    p.add_argument("-o", "--outputPathX", dest="case", required=True, help="the case folder (holds DataSets/)")
    p.add_argument("-m", "--modelName", dest="model", default="OriginalModel.pth",
                   help="model file in CASE/DNNModels/ or a path (default: OriginalModel.pth)")
    p.add_argument("-reps", "--reps", dest="reps", type=positive_int, default=DEFAULT_REPS,
                   help=f"retrainings per mode (default: {DEFAULT_REPS}, as the original)")
    p.add_argument("-modes", "--modes", dest="modes", type=mode_list, default=list(retrainModule.DEFAULT_RQ2_MODES),
                   help=f"comma-separated modes of {','.join(retrainModule.MODES)}, or all (every mode the model's "
                        f"task can run) (default: HUDD,BL1,BL2)")
    p.add_argument("--hudd-u-score", choices=list(UNCERTAINTY_SCORES), default=defaults.hudd_u_score,
                   help="-modes HUDD-U: the uncertainty that orders each cluster's candidates (default: GINI for a "
                        "classifier, MC-DROPOUT for a keypoint DNN)")
    p.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                   help=f"retraining epochs (default: {DEFAULT_EPOCHS}, the original's GD/OC)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="base seed; repetition r uses the same seed "
                   "in every mode")
    p.add_argument("--baseline-budget-factor", type=float, default=retrainModule.DEFAULT_BUDGET_FACTOR,
                   help="BL1/BL2 labelling budget as a share of HUDD's (1 = equal; 0.3 = the original code)")
    p.add_argument("--select", choices=list(SELECTIONS), default=defaults.select,
                   help="which retraining epoch to keep (original: best training accuracy; val-accuracy holds out "
                        f"{DEFAULT_HOLDOUT:.0%}% of the training set)")
    p.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                   help="batch size of the pipeline steps (test, heatmaps, assign)")
    p.add_argument("--retrain-batch-size", type=positive_int, default=RETRAIN_BATCH_SIZE,
                   help=f"retraining batch size (default: {RETRAIN_BATCH_SIZE}, the original's)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="modes retrained at once, one process each, sharing the CPUs (default 1: one after another)")
    p.add_argument("--rule", default=defaults.rule, help="LRP rule preset for the pipeline steps")
    p.add_argument("--retrain-factor", type=positive_float, default=defaults.retrain_factor,
                   help="HUDD's retraining images per cluster, times its size (original: 1; 2 = every labelled "
                        "image of the unsafe set at the default --assign-factor)")
    p.add_argument("--assign-factor", type=float, default=defaults.assign_factor,
                   help="unsafe-set quota per cluster, times its size (original: 2)")
    p.add_argument("--lr", type=positive_float, default=defaults.lr,
                   help="retraining learning rate (default: the original's 1e-3, SGD; RMSprop for keypoints)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule,
                   help="retraining learning-rate schedule (default cosine: falls to 0 over the epochs; the "
                        "original's: constant)")
    p.add_argument("--monitor-test", type=boolean, default=defaults.monitor_test, metavar="True|False",
                   help="record the test accuracy after every retraining epoch (a diagnosis)")
    p.add_argument("--threshold", type=positive_float, default=defaults.threshold,
                   help="keypoint regressors: error threshold on the mean keypoint distance (px; default 4)")
    p.add_argument("--freeze", type=nonnegative_int, default=defaults.freeze,
                   help="keypoint regressors: convolutions frozen when retraining (default 4, the original's)")
    p.add_argument("--trust-model", action="store_true", help="allow loading a full pickle (it can run code)")
    p.add_argument("--engine", choices=["local", "ray"], default=defaults.engine,
                   help="how the pipeline's test and assign steps run: local, or ray (Ray Data actors)")
    p.add_argument("--ray-address", default=defaults.ray_address,
                   help="--engine ray: auto or HOST:PORT joins a running cluster (default: start Ray here)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def pipeline_options(args):
    """The Helper options for the steps up to the unsafe set, from this command line."""
    return Helper.Options(device=args.device, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                          rule=args.rule, assign_factor=args.assign_factor, epochs=args.epochs, reps=args.reps,
                          baseline_budget_factor=args.baseline_budget_factor, retrain_factor=args.retrain_factor,
                          select=args.select,
                          threshold=args.threshold, freeze=args.freeze, lr=args.lr, schedule=args.schedule,
                          monitor_test=args.monitor_test, trust_model=args.trust_model, progress=not args.no_progress,
                          engine=args.engine, ray_address=args.ray_address, hudd_u_score=args.hudd_u_score)


def run(args):
    """Pipeline to the unsafe set, then the repetitions under the case folder's lock; returns the RQ2 table."""
    import assignModule

    options = pipeline_options(args)
    with Helper.stage(args.case, "rq2"):
        model_path = Helper.Case(args.case, args.model, options).model_path
        modes = task_modes(args.modes, model_path, args.trust_model)
        retrainModule.check_modes_for_model(modes, model_path, args.trust_model, args.hudd_u_score)
    Helper.run_pipeline(args.case, args.model, options, until="assign")
    needs = [m for m in modes if retrainModule.check_mode(m).distances]
    if needs and assignModule.read_distances(Helper.Case(args.case, args.model, options).t) is None:
        print(f"[rq2] T/UnsafeSet/ has no {assignModule.DISTANCES_FILE} (an assign step of an earlier version), which "
              f"{','.join(needs)} needs: rerunning the assign step")
        Helper.run(args.case, args.model, options, step="assign")
    with Helper.stage(args.case, "rq2"):
        case = Helper.Case(args.case, args.model, options)
        case.lock()
        try:
            table, _ = run_rq2(case.dir, case.model_path, modes, reps=args.reps, jobs=args.jobs,
                               retrain=retrainModule.retrain, known_modes=retrainModule.MODES, seed=args.seed,
                               epochs=args.epochs, select=args.select, budget_factor=args.baseline_budget_factor,
                               retrain_factor=args.retrain_factor, device=args.device,
                               batch_size=args.retrain_batch_size, workers=args.workers, progress=options.progress,
                               trust=args.trust_model, threshold=args.threshold, freeze=args.freeze, lr=args.lr,
                               schedule=args.schedule, monitor_test=args.monitor_test,
                               hudd_u_score=args.hudd_u_score)
            _refresh_report(case.dir)
        finally:
            case.unlock()
    return table


def _refresh_report(case_dir):
    try:
        import report
    except ImportError:
        return
    report.write_report(case_dir)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        table = run(args)
        with Helper.stage(args.case, "rq2"):
            _print_table(args, table)
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InternalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished repetitions are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _print_table(args, table):
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(4).to_string(index=False))
    print(f"\nRQ2 table: {args.case}/RQ2.csv (.xlsx), boxplot: {args.case}/RQ2_boxplot.png")


if __name__ == "__main__":
    sys.exit(main())
