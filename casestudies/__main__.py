"""`python -m casestudies NAME -o CASE`: build a built-in case study (data sets + trained DNN)."""
import argparse
import sys
import time

from casestudies import ARCHS, DEFAULT_ARCH, DEFAULT_DESIGN, DESIGNS, NAMES, SCALE_NAMES, build
from common.errors import HUDDError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m casestudies", description=__doc__.split(": ", 1)[1])
    parser.add_argument("name", choices=NAMES, help="which case study")
    parser.add_argument("-o", "--output", required=True, help="case folder to create (CASE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data sets and training (default 0)")
    parser.add_argument("--scale", choices=SCALE_NAMES, default="default",
                        help="default: the full case study; small: a few hundred images, for tests")
    parser.add_argument("--force", action="store_true", help="replace existing DataSets/ and OriginalModel.pth")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for training (default: all CPUs; 1 is faster on a busy machine)")
    parser.add_argument("--arch", choices=ARCHS, default=DEFAULT_ARCH,
                        help="the DNN: smallalexnet (AlexNet's shape, the default) or smallalexnet-bn "
                             "(BatchNorm after each convolution, fits its training set)")
    parser.add_argument("--design", choices=DESIGNS, default=DEFAULT_DESIGN,
                        help="gaze, openclosed: how rare the named conditions are in TrainingSet: rarer "
                             "(4 times rarer than in TestSet, the default), incomplete (each at most 1%%), "
                             "oracle (at TestSet's share)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--from-rules", metavar="CASE", help="instead of a case study: render an improvement set "
                        "inside the rules of CASE's root-cause clusters (-rq True writes them) into -o")
    parser.add_argument("--per-cluster", type=int, default=100, help="with --from-rules: images per cluster "
                        "(default 100)")
    args = parser.parse_args(argv)
    start = time.time()
    if args.from_rules:
        return _from_rules(args, start)
    try:
        case = build(args.name, args.output, seed=args.seed, scale=args.scale, progress=not args.quiet,
                     force=args.force, threads=args.threads, arch=args.arch, design=args.design)
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import models
    from casestudies.casefolder import read_marker

    written = read_marker(case / "DataSets")
    _, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    fit = meta["extra"].get("train_accuracy")
    fit = "" if fit is None else f", training accuracy {fit:.2%}"
    print(f"{args.name}: {case}/DataSets (written in {written.get('write_seconds', 0):.0f} s) and "
          f"{case}/DNNModels/OriginalModel.pth (trained in {meta['extra'].get('train_seconds', 0):.0f} s{fit}); "
          f"{time.time() - start:.0f} s in all")
    return 0


def _from_rules(args, start):
    from casestudies import fromrules

    try:
        used = fromrules.generate(args.from_rules, args.output, per_cluster=args.per_cluster, seed=args.seed,
                                  progress=not args.quiet, task=args.name)
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name} from rules: {len(used)} images for {used['cluster'].nunique()} clusters in "
          f"{args.output}/ImprovementSet, parameters in {args.output}/params.csv; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
