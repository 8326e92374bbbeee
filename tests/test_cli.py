"""The command lines: every pipeline option reachable and typed, help that prints, bad values refused."""
import dataclasses
import subprocess
import sys

import pytest

import Helper
import HUDD
import RQ2
from conftest import ROOT

NOT_FLAGS = {"progress"}         # set by --no-progress


@pytest.mark.parametrize("script", ["HUDD.py", "RQ2.py"])
def test_help_prints(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "-o" in done.stdout


def test_every_pipeline_option_has_a_flag():
    dests = {action.dest for action in HUDD.parser()._actions}
    missing = {f.name for f in dataclasses.fields(Helper.Options)} - NOT_FLAGS - dests
    assert not missing, f"options without a command-line flag: {sorted(missing)}"


def test_flags_become_typed_options():
    args = HUDD.parser().parse_args(["-o", "CASE", "-rq", "False", "--xlsx", "false", "--optimal-ordering", "True",
                                     "--threshold", "2.5", "--freeze", "0", "--lr", "0.01", "--epochs", "3",
                                     "--no-progress"])
    options = HUDD.options_from(args)
    assert options.rq is False and options.xlsx is False and options.optimal_ordering is True
    assert (options.threshold, options.freeze, options.lr, options.epochs) == (2.5, 0, 0.01, 3)
    assert options.progress is False
    defaults = HUDD.options_from(HUDD.parser().parse_args(["-o", "CASE"]))
    assert defaults == dataclasses.replace(Helper.Options(), progress=True)


@pytest.mark.parametrize("argv", [["--freeze", "-1"], ["--threshold", "0"], ["--lr", "-1"], ["--epochs", "0"],
                                  ["-rq", "maybe"], ["-mode", "BL3"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        HUDD.parser().parse_args(["-o", "CASE", *argv])
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_rq2_passes_keypoint_options_to_the_pipeline():
    args = RQ2.parser().parse_args(["-o", "CASE", "--threshold", "3", "--freeze", "2", "--lr", "0.002"])
    options = RQ2.pipeline_options(args)
    assert (options.threshold, options.freeze, options.lr) == (3.0, 2, 0.002)


def test_retrain_factor_reaches_the_retrain_step_and_its_cache_key():
    options = HUDD.options_from(HUDD.parser().parse_args(["-o", "CASE", "--retrain-factor", "2"]))
    assert options.retrain_factor == 2.0 and "retrain_factor" in Helper.STEP_OPTIONS["retrain"]
    args = RQ2.parser().parse_args(["-o", "CASE", "--retrain-factor", "1.5"])
    assert RQ2.pipeline_options(args).retrain_factor == 1.5
    with pytest.raises(SystemExit):
        HUDD.parser().parse_args(["-o", "CASE", "--retrain-factor", "0"])
