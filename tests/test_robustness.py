"""Robustness curves and perturbation-based improvement sets: robustnessModule and -step robustness.

What a user relies on: a perturbation at amplitude 0 leaves the image alone and a larger amplitude
degrades it more; curves and written images are the same for a seed whatever the batch size; the
written images are labelled by their source, the improvement set they replace is kept, and
DataSets/params.csv carries each image's perturbation and amplitude so that RQ1 can name it; a rerun
with the same settings rewrites nothing; bad input is one `error:` line.

Speed: one tiny classifier case is built per module (`base_case`) and never changed; each command-line
scenario works on its own copy (copytree keeps mtimes, so the cached steps stay current). The first run
is a real `python HUDD.py`; the others call HUDD.main() in this process, one torch thread. The
landmarks case (keypoints) is built once, small, for the keypoint tests.
"""
import contextlib
import hashlib
import io
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import robustnessModule as rm
from conftest import ROOT, TINY_CLASSES, make_tiny_case

AMPLITUDES = (0.2, 0.4, 0.6, 0.8, 1.0)
PERTURB_ARGS = ("-step", "robustness", "--levels", "2", "--perturb-improvement", "30", "--perturb-test", "24")
TEST_IMAGES = 3 * 8          # make_tiny_case: 8 test images per class
IMPROVEMENT_IMAGES = 3 * 6


# --- helpers ---------------------------------------------------------------------------------------

def hudd(case, *args):
    """`python HUDD.py -o CASE ... --no-progress` as a user runs it."""
    cmd = [sys.executable, "HUDD.py", "-o", str(case), "--no-progress", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def hudd_main(case, *args):
    """HUDD.py's main() in this process (a subprocess start costs seconds on a busy machine), with the
    status a shell would see: argparse's refusal is its SystemExit."""
    import HUDD

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = HUDD.main(["-o", str(case), "--no-progress", *map(str, args)])
        except SystemExit as exc:
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    return result


def one_error_line(result, *fragments):
    """The one line with `error:` (argparse writes `HUDD.py: error:`) of a run refused with status 2."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def hashes(folder):
    """{path relative to folder: sha256} of every file below it."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def mtimes(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def pngs(folder):
    return sorted(Path(folder).rglob("*.png"))


def copy_case(source, target):
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


def random_image(channels=3, size=16, seed=0):
    """An image in [0.05, 0.95]: no pixel is black or exactly 0.5 before a perturbation."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(0.05, 0.95, (channels, size, size)).astype(np.float32))


def gradient_energy(x):
    x = x.numpy().astype(np.float64)
    return float((np.diff(x, axis=-1) ** 2).sum() + (np.diff(x, axis=-2) ** 2).sum())


def clean_split(case):
    """The case's test split without perturbed copies, as Helper.robustness measures it."""
    from common.data import Split, list_case

    test = list_case(case)["TestSet"]
    keep = [i for i, image in enumerate(test.images) if f"/{rm.PERTURBED_FOLDER}/" not in image]
    return Split(test.name, [test.images[i] for i in keep], [test.labels[i] for i in keep], test.classes)


def curves_frame(drops, levels=5):
    """A hand-made curves table: {perturbation: drop per level 1..levels}, clean accuracy 0.9."""
    rows = []
    for name, per_level in drops.items():
        for level, drop in enumerate([0.0, *per_level]):
            rows.append({"perturbation": name, "level": level, "amplitude": level / levels, "setting": "",
                         "images": 100, "errors": 0, "accuracy": 0.9 - drop, "drop": drop, "mean_error": np.nan})
    return pd.DataFrame(rows, columns=rm.CURVE_COLUMNS)


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared machine: a second thread only waits for the first (40 s against 1 s here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_case(tmp_path_factory):
    """The tiny classifier case, never changed by a test."""
    return make_tiny_case(tmp_path_factory.mktemp("robustness") / "base")


@pytest.fixture(scope="module")
def loaded(base_case):
    """(model, meta) of the tiny case, loaded as Helper.Case does."""
    import models

    return models.load_model(base_case / "DNNModels" / "OriginalModel.pth", "cpu")


@pytest.fixture(scope="module")
def perturbed(base_case, tmp_path_factory):
    """A copy of the tiny case after `-step robustness --levels 2 --perturb-improvement 30 --perturb-test 24`."""
    case = copy_case(base_case, tmp_path_factory.mktemp("perturbed") / "case")
    before = hashes(case / "DataSets" / "ImprovementSet")
    result = ok(hudd(case, *PERTURB_ARGS))
    return SimpleNamespace(case=case, datasets=case / "DataSets", result=result, improvement_before=before)


@pytest.fixture(scope="module")
def rerun(perturbed, tmp_path_factory):
    """A copy of `perturbed` run again with the same settings; the state before the rerun is kept."""
    case = copy_case(perturbed.case, tmp_path_factory.mktemp("rerun") / "case")
    before = SimpleNamespace(datasets=mtimes(case / "DataSets"), robustness=mtimes(case / "T" / rm.ROBUSTNESS),
                             params=hashes(case / "DataSets")["params.csv"])
    result = ok(hudd_main(case, *PERTURB_ARGS))
    return SimpleNamespace(case=case, datasets=case / "DataSets", result=result, before=before)


@pytest.fixture(scope="module")
def replaced(perturbed, tmp_path_factory):
    """A copy of `perturbed` run again with --perturb-improvement 12 (everything else the same)."""
    case = copy_case(perturbed.case, tmp_path_factory.mktemp("replaced") / "case")
    aside = case / "DataSets" / rm.MOVED_ASIDE
    before = SimpleNamespace(aside_hashes=hashes(aside), aside_mtimes=mtimes(aside),
                             test_mtimes=mtimes(case / "DataSets" / "TestSet"))
    args = list(PERTURB_ARGS)
    args[args.index("--perturb-improvement") + 1] = "12"
    result = ok(hudd_main(case, *args))
    return SimpleNamespace(case=case, datasets=case / "DataSets", result=result, before=before)


@pytest.fixture(scope="module")
def landmarks(tmp_path_factory):
    """The landmarks case study (a keypoint DNN), built small: DataSets/ and a trained model, no HUDD run."""
    import casestudies

    case = tmp_path_factory.mktemp("landmarks") / "case"
    casestudies.build("landmarks", case, scale="small", progress=False, threads=1)
    return case


# --- 1. amplitude 0 is the identity ---------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", list(rm.PERTURBATIONS))
def test_amplitude_zero_leaves_the_image_unchanged(name, channels):
    """Level 0 of every curve is the clean test set: amplitude 0 must not move a single pixel."""
    image = torch.rand((channels, 16, 16), generator=torch.Generator().manual_seed(5))
    out = rm.perturb(image, name, 0.0, rm.rng_for(0, "curves", name, 0, 0))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out, image)
    assert out is not image          # a copy: perturbing it later cannot change the source


@pytest.mark.parametrize("name", list(rm.PERTURBATIONS))
def test_every_perturbation_works_on_a_grayscale_image(name):
    """Keypoint cases are grayscale: a perturbation keeps the one channel, the size and the range [0, 1]."""
    image = random_image(channels=1)
    out = rm.perturb(image, name, 0.6, np.random.default_rng(0))
    assert out.shape == (1, 16, 16)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, image)


# --- 2. a larger amplitude degrades more -----------------------------------------------------------

RAMP = torch.linspace(0.0, 1.0, 32).repeat(3, 32, 1)     # horizontal intensity ramp, 3 x 32 x 32

MONOTONE = {   # perturbation: (clean image, statistic of (perturbed, clean), +1 rises / -1 falls with amplitude)
    "brightness": (random_image(), lambda y, x: float(y.double().mean()), -1),
    "contrast": (random_image(), lambda y, x: float(y.double().std()), -1),
    "blur": (random_image(), lambda y, x: gradient_energy(y), -1),
    "noise": (random_image(), lambda y, x: float(((y.double() - x.double()) ** 2).mean()), +1),
    "dead-pixels": (random_image(), lambda y, x: float((y == 0).all(0).double().mean()), +1),
    "occlusion": (random_image(), lambda y, x: float((y == 0.5).all(0).double().mean()), +1),
    "rotation": (RAMP, lambda y, x: float(((y.double() - x.double()) ** 2).mean()), +1),
}


def test_the_monotonicity_table_covers_every_perturbation():
    """A new perturbation must come with its own monotonicity check."""
    assert set(MONOTONE) == set(rm.PERTURBATIONS)


@pytest.mark.parametrize("name", list(MONOTONE))
def test_a_larger_amplitude_degrades_the_image_more(name):
    """The curves read as 'stronger to the right' only if each amplitude step changes the image statistic
    the perturbation is named for in one direction (a fresh generator per amplitude: same random draws)."""
    clean, statistic, sense = MONOTONE[name]
    if name in ("dead-pixels", "occlusion"):
        assert not (clean == 0).any() and not (clean == 0.5).any()      # only the perturbation makes them
    values = [statistic(clean, clean)]
    for a in AMPLITUDES:
        values.append(statistic(rm.perturb(clean, name, a, np.random.default_rng(7)), clean))
    steps = sense * np.diff(values)
    assert (steps > 0).all(), (name, values)


# --- 3. curves: deterministic, complete, cached ------------------------------------------------------

def test_curves_are_the_same_for_a_seed_whatever_the_batch_size(base_case, loaded):
    """A figure in a report must be reproducible: the same seed gives the same table, batch size 1 or 64."""
    model, meta = loaded
    split = clean_split(base_case)
    run = lambda batch: rm.robustness_curves(model, meta, base_case / "DataSets", split, levels=2, seed=3,
                                             batch_size=batch, progress=False)
    first = run(64)
    pd.testing.assert_frame_equal(first, run(64))
    pd.testing.assert_frame_equal(first, run(1))
    assert list(first.columns) == rm.CURVE_COLUMNS
    assert (first["images"] == len(split.images)).all()


def test_noise_images_depend_on_the_seed_and_only_on_it(base_case):
    """Another seed draws other noise; the same seed gives the same image whatever was read before it."""
    from common.data import ImageSet, ImageSpec

    split = clean_split(base_case)
    spec = ImageSpec(3, 16, 16, (0.5,) * 3, (0.5,) * 3)
    base = ImageSet(base_case / "DataSets", split.images, spec)
    n = len(base)
    noisy = lambda seed: rm.PerturbedSet(base, ["noise"] * n, [0.5] * n, seed, "curves", [1] * n)
    a, again, other = noisy(0), noisy(0), noisy(1)
    clean = noisy(0)
    clean.amplitudes = [0.0] * n
    for i in reversed(range(3)):                 # another order than `a`'s
        assert torch.equal(again.image01(i)[0], a.image01(i)[0])
    for i in range(3):
        assert not torch.equal(other.image01(i)[0], a.image01(i)[0])
        assert not torch.equal(a.image01(i)[0], clean.image01(i)[0])
    # two images of one pass do not share their noise (clipping aside, the same draws would correlate)
    noise = [(a.image01(i)[0] - clean.image01(i)[0]).flatten().numpy() for i in (0, 1)]
    assert abs(np.corrcoef(*noise)[0, 1]) < 0.3


def test_curves_csv_has_a_row_per_perturbation_and_level_and_the_clean_accuracy(perturbed, loaded):
    """curves.csv: the documented columns, levels 0..L for every perturbation, level 0 shared and equal to
    the model's accuracy on the clean test set (computed here without robustnessModule)."""
    from common.data import ImageSpec, read_image

    curves = pd.read_csv(perturbed.case / "T" / rm.ROBUSTNESS / rm.CURVES_FILE)
    assert list(curves.columns) == rm.CURVE_COLUMNS
    pairs = sorted(zip(curves["perturbation"], curves["level"]))
    assert pairs == sorted((name, level) for name in rm.PERTURBATIONS for level in range(3))
    assert np.allclose(curves["accuracy"], 1 - curves["errors"] / curves["images"])
    assert (curves["images"] == TEST_IMAGES).all()
    clean = curves[curves["level"] == 0]
    assert (clean["amplitude"] == 0).all() and (clean["setting"] == "clean").all()
    assert clean[["images", "errors", "accuracy"]].nunique().max() == 1
    assert np.allclose(curves["drop"], clean["accuracy"].iloc[0] - curves["accuracy"])

    model, meta = loaded
    spec = ImageSpec.from_meta(meta)
    split = clean_split(perturbed.case)
    with torch.no_grad():
        batch = torch.stack([read_image(perturbed.datasets / i, spec) for i in split.images])
        predicted = model(batch).argmax(1).numpy()
    expected = np.array([TINY_CLASSES.index(label) for label in split.labels])
    assert clean["accuracy"].iloc[0] == pytest.approx(float((predicted == expected).mean()))


def test_robustness_folder_has_one_plot_per_perturbation_and_the_examples(perturbed):
    """T/Robustness/: a readable PNG per perturbation, examples.png, curves.csv, and nothing else."""
    out = perturbed.case / "T" / rm.ROBUSTNESS
    expected = {f"{name}.png" for name in rm.PERTURBATIONS} | {rm.EXAMPLES_FILE, rm.CURVES_FILE}
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 50


def test_an_identical_rerun_says_up_to_date_and_rewrites_no_curve_or_image(rerun):
    """A rerun with the same settings is free: the curves come from the cache, the written images stay."""
    assert "up to date" in rerun.result.stdout
    assert "already there; kept" in rerun.result.stdout
    assert mtimes(rerun.case / "T" / rm.ROBUSTNESS) == rerun.before.robustness
    after = mtimes(rerun.datasets)
    images = [k for k in rerun.before.datasets if k.endswith(".png")]
    assert len(images) >= TEST_IMAGES + 30
    assert {k: after.get(k) for k in images} == {k: rerun.before.datasets[k] for k in images}
    assert set(after) == set(rerun.before.datasets)
    assert hashes(rerun.datasets)["params.csv"] == rerun.before.params


# --- 4. the written images and params.csv ------------------------------------------------------------

def test_improvement_set_has_the_perturbed_images_labelled_by_their_source(perturbed):
    """Each of the N images sits in its source training image's class folder: a perturbed circle is a circle."""
    target = perturbed.datasets / "ImprovementSet"
    images = pngs(target)
    assert len(images) == 30
    assert {p.parent.name for p in images} <= set(TINY_CLASSES)
    assert {p.name for p in target.iterdir() if p.is_dir()} == set(TINY_CLASSES)
    sources = pd.read_csv(target / rm.SOURCES_FILE)
    assert sorted(sources["image"]) == sorted(str(p.relative_to(perturbed.datasets)) for p in images)
    assert sources["source"].str.startswith("TrainingSet/").all()       # never the test set: no leak into RQ2
    assert sources["source"].is_unique                                   # 30 of 36 training images
    for image, source in zip(sources["image"], sources["source"]):
        assert Path(image).parent.name == Path(source).parent.name, (image, source)
        assert (perturbed.datasets / source).is_file()


def test_strongly_perturbed_images_differ_from_their_source(perturbed):
    """The written images really are perturbed copies, not the clean source written again."""
    frames = [pd.read_csv(perturbed.datasets / "ImprovementSet" / rm.SOURCES_FILE),
              pd.read_csv(perturbed.datasets / "TestSet" / rm.SOURCES_FILE)]
    strong = pd.concat(frames)
    strong = strong[strong["amplitude"] >= 0.5]
    assert len(strong) >= 5
    for image, source in zip(strong["image"], strong["source"]):
        written = np.asarray(Image.open(perturbed.datasets / image).convert("RGB"), dtype=np.int16)
        original = np.asarray(Image.open(perturbed.datasets / source).convert("RGB"), dtype=np.int16)
        assert written.shape == original.shape
        assert np.abs(written - original).max() > 0, image


def test_the_improvement_set_it_replaces_is_kept_byte_for_byte(perturbed):
    """The user's own improvement set is moved aside, never deleted or changed."""
    aside = perturbed.datasets / rm.MOVED_ASIDE
    assert len(perturbed.improvement_before) == IMPROVEMENT_IMAGES
    assert hashes(aside) == perturbed.improvement_before
    assert "kept in" in perturbed.result.stdout


def test_perturbed_test_copies_sit_in_their_source_class_folder(perturbed):
    """TestSet/<class>/perturbed/ holds the N copies, each of a clean test image of that class."""
    copies = [p for p in pngs(perturbed.datasets / "TestSet") if p.parent.name == rm.PERTURBED_FOLDER]
    assert len(copies) == 24
    sources = pd.read_csv(perturbed.datasets / "TestSet" / rm.SOURCES_FILE)
    assert sorted(sources["image"]) == sorted(str(p.relative_to(perturbed.datasets)) for p in copies)
    for image, source in zip(sources["image"], sources["source"]):
        assert Path(image).parts[1] == Path(source).parts[1], (image, source)
        assert f"/{rm.PERTURBED_FOLDER}/" not in source


def test_params_csv_names_the_perturbation_and_amplitude_of_every_image(perturbed):
    """params.csv: a row per perturbed image and per clean test image, and one numeric column per
    perturbation (its amplitude on that perturbation's rows, 0 elsewhere) for RQ1 and the rules."""
    params = pd.read_csv(perturbed.datasets / "params.csv")
    assert list(params.columns) == ["image", "perturbation", "amplitude",
                                    *(f"perturb_{name}" for name in rm.PERTURBATIONS)]
    on_disk = {str(p.relative_to(perturbed.datasets)) for p in pngs(perturbed.datasets / "ImprovementSet")}
    on_disk |= {str(p.relative_to(perturbed.datasets)) for p in pngs(perturbed.datasets / "TestSet")}
    assert params["image"].is_unique
    assert set(params["image"]) == on_disk
    assert len(params) == 30 + 24 + TEST_IMAGES
    perturbed_rows = params["image"].str.startswith("ImprovementSet/") | params["image"].str.contains("/perturbed/")
    clean = params[~perturbed_rows]
    assert (clean["perturbation"] == "none").all() and (clean["amplitude"] == 0).all()
    amps = params.loc[perturbed_rows, "amplitude"]
    assert ((amps > 0) & (amps <= 1)).all()
    assert set(params.loc[perturbed_rows, "perturbation"]) <= set(rm.PERTURBATIONS)
    for name in rm.PERTURBATIONS:
        column = params[f"perturb_{name}"].to_numpy()
        mine = (params["perturbation"] == name).to_numpy()
        assert np.array_equal(column[mine], params["amplitude"].to_numpy()[mine])
        assert (column[~mine] == 0).all()
    # the amplitudes are those of the written images' record
    record = pd.concat([pd.read_csv(perturbed.datasets / "ImprovementSet" / rm.SOURCES_FILE),
                        pd.read_csv(perturbed.datasets / "TestSet" / rm.SOURCES_FILE)])
    merged = params[perturbed_rows].merge(record, on="image", suffixes=("", "_record"), validate="one_to_one")
    assert len(merged) == perturbed_rows.sum()
    assert (merged["perturbation"] == merged["perturbation_record"]).all()
    assert np.allclose(merged["amplitude"], merged["amplitude_record"])


def test_rq1_on_params_csv_explains_a_cluster_of_strongly_perturbed_test_images(perturbed):
    """The round trip params.csv -> RQ1: a cluster made of the most strongly X-perturbed test copies has a
    small variance ratio for perturb_X (expected value computed here with numpy, n-1 estimator)."""
    import clusterModule

    path = perturbed.datasets / "params.csv"
    raw = pd.read_csv(path)
    copies = raw[raw["image"].str.contains(f"/{rm.PERTURBED_FOLDER}/")]
    x = copies["perturbation"].value_counts().index[0]            # the perturbation with most test copies
    column = f"perturb_{x}"
    strongest = copies[copies["perturbation"] == x].nlargest(3, "amplitude")["image"].tolist()
    clean = raw[raw["perturbation"] == "none"]["image"].head(6).tolist()
    clusters = pd.DataFrame({"image": strongest + clean, "cluster": [0] * 3 + [1] * 6})
    notes = []
    table = clusterModule.rq1(clusterModule.read_params(path), clusters, notes)

    assert {f"perturb_{name}" for name in rm.PERTURBATIONS} <= set(table["parameter"])
    assert "perturbation" not in set(table["parameter"])            # text: left out, with a note
    assert any("perturbation" in note for note in notes)
    values = raw.set_index("image")[column]
    overall = np.var(values[strongest + clean].to_numpy(), ddof=1)
    expected = np.var(values[strongest].to_numpy(), ddof=1) / overall
    ratio = table[(table["cluster"] == 0) & (table["parameter"] == column)]["ratio"]
    assert len(ratio) == 1
    assert ratio.iloc[0] == pytest.approx(expected)
    assert ratio.iloc[0] < 0.5
    clean_ratio = table[(table["cluster"] == 1) & (table["parameter"] == column)]["ratio"].iloc[0]
    assert clean_ratio == pytest.approx(0.0)


def test_perturbed_images_inherit_the_simulator_parameters_of_their_source(base_case, tmp_path):
    """A case with a simulator's params.csv (a real-valued and a 0/1 column, as the case studies write):
    after both --perturb-improvement and --perturb-test, every clean test image keeps its parameters and
    every perturbed image has its source's, so RQ1 can still use the simulator's parameters."""
    case = copy_case(base_case, tmp_path / "case")
    datasets = case / "DataSets"
    images = sorted(str(p.relative_to(datasets)) for p in pngs(datasets))
    simulator = pd.DataFrame({"image": images, "light": np.arange(len(images)) + 0.5,
                              "glasses": np.arange(len(images)) % 2})
    simulator.to_csv(datasets / "params.csv", index=False)
    ok(hudd_main(case, *PERTURB_ARGS))
    params = pd.read_csv(datasets / "params.csv").set_index("image")
    truth = simulator.set_index("image")
    assert {"light", "glasses", "perturbation", "amplitude"} <= set(params.columns)
    clean_test = [i for i in images if i.startswith("TestSet/")]
    for column in ("light", "glasses"):
        assert params.loc[clean_test, column].tolist() == truth.loc[clean_test, column].tolist(), column
    sources = pd.concat([pd.read_csv(datasets / "ImprovementSet" / rm.SOURCES_FILE),
                         pd.read_csv(datasets / "TestSet" / rm.SOURCES_FILE)])
    for column in ("light", "glasses"):
        assert params.loc[sources["image"], column].tolist() == truth.loc[sources["source"], column].tolist(), \
            column


def test_the_pipeline_with_rq1_names_the_perturbations(perturbed, tmp_path):
    """The whole round trip: HUDD's clusters of the perturbed test set, RQ1.csv with a variance ratio per
    perturb_ parameter, and the clusters in words read from the same params.csv."""
    case = copy_case(perturbed.case, tmp_path / "case")
    result = ok(hudd_main(case, "-rq", "True", "--epochs", "1", "--xlsx", "False", "-step", "assign"))
    rq1 = pd.read_csv(case / "RQ1.csv")
    assert len(rq1) >= 1
    ratios = {c for c in rq1.columns if c.startswith("ratio_perturb_")}
    assert ratios == {f"ratio_perturb_{name}" for name in rm.PERTURBATIONS}
    assert np.isfinite(rq1[sorted(ratios)].to_numpy()).all() and (rq1[sorted(ratios)] >= 0).all().all()
    assert "RQ1 (" in result.stdout and "not numeric" in result.stdout     # the text column 'perturbation'
    rules = [line for line in result.stdout.splitlines() if line.startswith("[explain] cluster")]
    assert any(word in line for line in rules for word in ("perturb", "amplitude")), rules


# --- 5. reruns ------------------------------------------------------------------------------------

def test_another_size_replaces_the_improvement_set_and_keeps_the_set_aside(replaced):
    """--perturb-improvement 12 after 30: the set holds the 12 new images (params.csv with it), the
    user's original set aside is untouched, and the unchanged test copies stay."""
    target = replaced.datasets / "ImprovementSet"
    images = pngs(target)
    assert len(images) == 12
    assert len(pd.read_csv(target / rm.SOURCES_FILE)) == 12
    aside = replaced.datasets / rm.MOVED_ASIDE
    assert hashes(aside) == replaced.before.aside_hashes
    assert mtimes(aside) == replaced.before.aside_mtimes
    assert not (replaced.datasets / "ImprovementSet.before-perturb.before-perturb").exists()
    params = pd.read_csv(replaced.datasets / "params.csv")
    rows = set(params.loc[params["image"].str.startswith("ImprovementSet/"), "image"])
    assert rows == {str(p.relative_to(replaced.datasets)) for p in images}
    assert mtimes(replaced.datasets / "TestSet") == replaced.before.test_mtimes


# --- 6. bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, named", [(("--perturbations", "foo"), "foo"),
                                         (("--levels", "0"), "--levels")])
def test_bad_robustness_options_are_refused_by_the_command_line(tmp_path, args, named):
    """A typo in a perturbation name or zero levels: status 2 and one line naming it, before any work."""
    line = one_error_line(hudd_main(tmp_path / "case", "-step", "robustness", *args), named)
    assert "HUDD.py: error:" in line
    assert not (tmp_path / "case").exists()


def test_a_perturbation_named_twice_is_refused_before_any_work(base_case, tmp_path):
    """`--perturbations blur,blur` would plot and weigh blur twice: one error line, no curves written."""
    case = copy_case(base_case, tmp_path / "case")
    one_error_line(hudd_main(case, "-step", "robustness", "--perturbations", "blur,blur"), "named twice")
    assert not (case / "T" / rm.ROBUSTNESS).exists()


@pytest.mark.parametrize("amplitude", [-0.1, 1.5])
def test_an_amplitude_outside_0_1_is_refused(amplitude):
    from common.errors import HUDDError

    with pytest.raises(HUDDError, match="must lie in"):
        rm.perturb(random_image(), "blur", amplitude, np.random.default_rng(0))


@pytest.mark.parametrize("args, named", [(("--perturb-test", "5"), "labels.csv"),
                                         (("--perturbations", "rotation"), "keypoints")])
def test_keypoint_case_refuses_what_would_break_its_ground_truth(landmarks, args, named):
    """Perturbed test copies would have no keypoints in labels.csv; a rotation moves the keypoints:
    one `error:` line that says why, and DataSets/ is left as it was."""
    before = mtimes(landmarks / "DataSets")
    line = one_error_line(hudd_main(landmarks, "-step", "robustness", *args), named)
    assert line.startswith("error:")
    assert mtimes(landmarks / "DataSets") == before


def test_keypoint_curves_report_the_share_within_threshold_and_the_mean_error(landmarks):
    """For a keypoint DNN the curves give the share of images within the threshold and a finite mean error."""
    ok(hudd_main(landmarks, "-step", "robustness", "--levels", "1", "--perturbations", "blur,noise"))
    curves = pd.read_csv(landmarks / "T" / rm.ROBUSTNESS / rm.CURVES_FILE)
    assert list(curves.columns) == rm.CURVE_COLUMNS
    assert sorted(zip(curves["perturbation"], curves["level"])) == [("blur", 0), ("blur", 1), ("noise", 0),
                                                                   ("noise", 1)]
    assert np.isfinite(curves["mean_error"]).all() and (curves["mean_error"] > 0).all()
    assert curves["accuracy"].between(0, 1).all()
    assert np.allclose(curves["accuracy"], 1 - curves["errors"] / curves["images"])
    assert (curves["images"] > 0).all()
    assert {p.name for p in (landmarks / "T" / rm.ROBUSTNESS).glob("*.png")} == {"blur.png", "noise.png",
                                                                               rm.EXAMPLES_FILE}


def test_keypoint_improvement_set_carries_the_keypoints_of_its_sources(landmarks):
    """A perturbed keypoint image keeps its source's keypoints (blur and noise move no pixel), in a
    labels.csv that HUDD reads back; the case's own improvement set is moved aside."""
    import models
    from testModule import list_keypoint_case

    ok(hudd_main(landmarks, "-step", "robustness", "--levels", "1", "--perturbations", "blur,noise",
                 "--perturb-improvement", "8"))
    target = landmarks / "DataSets" / "ImprovementSet"
    assert len(pngs(target)) == 8 and all(p.parent == target for p in pngs(target))
    assert len(pngs(landmarks / "DataSets" / rm.MOVED_ASIDE)) > 8
    _, meta = models.load_model(landmarks / "DNNModels" / "OriginalModel.pth", "cpu")
    splits = list_keypoint_case(landmarks, meta["classes"])
    truth = dict(zip(splits["TrainingSet"].images, splits["TrainingSet"].labels))
    written = dict(zip(splits["ImprovementSet"].images, splits["ImprovementSet"].labels))
    sources = pd.read_csv(target / rm.SOURCES_FILE)
    assert sorted(written) == sorted(sources["image"])
    for image, source in zip(sources["image"], sources["source"]):
        np.testing.assert_allclose(written[image], truth[source], atol=1e-3, err_msg=image)


# --- 7. where the improvement images are drawn ------------------------------------------------------

def test_falling_ranges_start_one_level_before_the_first_drop():
    """Amplitudes are drawn from the level before accuracy first falls by MIN_DROP up to the strongest."""
    curves = curves_frame({"blur": [0.0, rm.MIN_DROP / 2, rm.MIN_DROP, 0.1, 0.2],
                           "noise": [0.3, 0.3, 0.3, 0.3, 0.3],
                           "contrast": [0.0, 0.0, 0.0, 0.0, rm.MIN_DROP / 2]})
    ranges = rm.falling_ranges(curves)
    assert set(ranges) == {"blur", "noise"}
    assert ranges["blur"] == pytest.approx((0.4, 1.0))
    assert ranges["noise"] == pytest.approx((0.0, 1.0))


def test_falling_ranges_when_nothing_falls_cover_every_perturbation_whole():
    curves = curves_frame({"blur": [0.0] * 5, "noise": [0.01] * 5, "rotation": [-0.05] * 5})
    assert rm.falling_ranges(curves) == {"blur": (0.0, 1.0), "noise": (0.0, 1.0), "rotation": (0.0, 1.0)}


def test_plan_images_draws_inside_the_ranges_never_clean_and_reproducibly():
    """Every planned image is perturbed (amplitude > 0) within its perturbation's range; sources are
    distinct while there are enough; the plan is a function of the seed."""
    ranges = {"blur": (0.4, 1.0), "noise": (0.0, 0.2), "occlusion": (0.6, 0.8)}
    plan = rm.plan_images(200, 500, ranges, seed=4, purpose="improvement")
    assert len(plan) == 200
    assert set(plan["perturbation"]) == set(ranges)
    low = plan["perturbation"].map(lambda n: ranges[n][0])
    high = plan["perturbation"].map(lambda n: ranges[n][1])
    assert (plan["amplitude"] > 0).all()
    assert ((plan["amplitude"] > low) & (plan["amplitude"] <= high)).all()
    assert plan["source"].is_unique and plan["source"].between(0, 499).all()
    pd.testing.assert_frame_equal(plan, rm.plan_images(200, 500, ranges, seed=4, purpose="improvement"))
    assert not plan.equals(rm.plan_images(200, 500, ranges, seed=5, purpose="improvement"))
    exact = rm.plan_images(30, 30, ranges, seed=0, purpose="test")
    assert sorted(exact["source"]) == list(range(30))
    more = rm.plan_images(50, 10, ranges, seed=0, purpose="test")
    assert more["source"].between(0, 9).all() and more["source"].nunique() > 1


def test_plan_images_refuses_an_empty_request():
    from common.errors import HUDDError

    with pytest.raises(HUDDError, match="ask for 1 or more"):
        rm.plan_images(0, 10, {"blur": (0.0, 1.0)}, seed=0, purpose="improvement")
    with pytest.raises(HUDDError, match="no images"):
        rm.plan_images(5, 0, {"blur": (0.0, 1.0)}, seed=0, purpose="improvement")
