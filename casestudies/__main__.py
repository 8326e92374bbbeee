"""`python -m casestudies NAME -o CASE`: build a built-in case study (data sets + trained DNN)."""
import argparse
import sys
import time

from casestudies import NAMES, SCALE_NAMES, build
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
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        case = build(args.name, args.output, seed=args.seed, scale=args.scale, progress=not args.quiet,
                     force=args.force, threads=args.threads)
    except HUDDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import models
    from casestudies.casefolder import read_marker

    written = read_marker(case / "DataSets")
    _, meta = models.load_model(case / "DNNModels" / "OriginalModel.pth")
    print(f"{args.name}: {case}/DataSets (written in {written.get('write_seconds', 0):.0f} s) and "
          f"{case}/DNNModels/OriginalModel.pth (trained in {meta['extra'].get('train_seconds', 0):.0f} s); "
          f"{time.time() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
