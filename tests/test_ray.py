"""The Ray engine (`--engine ray`): the same results as the local engine, a lost worker costs no result,
and a wrong cluster address is one clear line. Each run starts its own local Ray (2 CPUs here)."""
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, make_tiny_case

pytest.importorskip("ray")

OPTIONS = ("--no-progress", "--xlsx", "False", "--batch-size", "8")
RESULTS = ("trainResult.csv", "testResult.csv", "improveResult.csv")


def hudd(case, *args, env=None):
    cmd = [sys.executable, "HUDD.py", "-o", str(case), *OPTIONS, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny case through the assign step three times: local, ray, and ray with a worker killed mid-run."""
    import os

    root = tmp_path_factory.mktemp("ray")
    local = make_tiny_case(root / "local")
    ray_case, killed = root / "ray", root / "killed"
    shutil.copytree(local, ray_case)
    shutil.copytree(local, killed)
    ok(hudd(local, "-step", "assign"))
    ok(hudd(ray_case, "-step", "assign", "--engine", "ray", "--workers", "2"))
    marker = root / "killed.marker"
    env = {**os.environ, "HUDD_RAY_KILL_ONCE": str(marker)}
    ok(hudd(killed, "-step", "assign", "--engine", "ray", "--workers", "2", env=env))
    return local, ray_case, killed, marker


def _same_results(a, b):
    _same_test_results(a, b)
    left, right = pd.read_csv(a / "T/UnsafeSet/unsafe.csv"), pd.read_csv(b / "T/UnsafeSet/unsafe.csv")
    pd.testing.assert_frame_equal(left[["image", "cluster", "rank"]], right[["image", "cluster", "rank"]],
                                  obj="unsafe.csv")
    np.testing.assert_allclose(left["distance"], right["distance"], rtol=1e-5)


def _same_test_results(a, b):
    for name in RESULTS:
        left, right = pd.read_csv(a / name), pd.read_csv(b / name)
        assert list(left.columns) == list(right.columns), name
        text = ["image", "result", "expected", "predicted"]
        pd.testing.assert_frame_equal(left[text], right[text], check_dtype=False, obj=name)
        logits = [c for c in left.columns if c not in text]
        np.testing.assert_allclose(left[logits].to_numpy(float), right[logits].to_numpy(float), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_ray_gives_the_local_results(runs):
    local, ray_case, _, _ = runs
    _same_results(local, ray_case)


def test_a_worker_killed_mid_run_costs_no_result(runs):
    local, _, killed, marker = runs
    assert marker.is_file(), "the fault hook never fired: no worker was killed"
    _same_results(local, killed)


def test_a_cached_step_is_not_redone_by_another_engine(runs):
    """The engine changes how, not what: a step done locally is up to date for the Ray engine."""
    local, _, _, _ = runs
    before = (local / "testResult.csv").stat().st_mtime_ns
    result = ok(hudd(local, "-step", "assign", "--engine", "ray"))
    assert (local / "testResult.csv").stat().st_mtime_ns == before
    assert "[test] up to date" in result.stdout


def _error_line(result):
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-2500:])
    assert "Traceback" not in result.stderr, result.stderr[-2500:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_wrong_cluster_address_is_one_line_in_seconds(tiny_case):
    started = time.time()
    line = _error_line(hudd(tiny_case, "-step", "test", "--engine", "ray", "--ray-address", "127.0.0.1:1"))
    assert "--ray-address 127.0.0.1:1" in line and "cannot connect" in line and "ray start --head" in line
    assert time.time() - started < 60
    line = _error_line(hudd(tiny_case, "-step", "test", "--ray-address", "auto"))
    assert "--engine ray" in line
    assert not (tiny_case / "testResult.csv").exists()


def test_keypoint_outputs_and_distances_match_the_local_engine(tmp_path):
    """The engine's other two operations, in this process: keypoint decoding and single-linkage distances
    (an untrained KPNet on random images, so nothing but the engine can make them agree)."""
    import torch
    from PIL import Image

    from common.data import ImageSet, ImageSpec
    from engines import LocalEngine
    from engines.rayengine import RayEngine
    from models.kpnet import KPNet

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    (tmp_path / "TestSet").mkdir()
    images = []
    for i in range(11):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "TestSet" / f"{i}.png")
        images.append(f"TestSet/{i}.png")
    (tmp_path / "TestSet" / "broken.png").write_bytes(b"not a png")
    images.insert(4, "TestSet/broken.png")
    model = KPNet(num_keypoints=5, in_channels=1, input_size=32, width=0.25).eval()
    dataset = ImageSet(tmp_path, images, ImageSpec(1, 32, 32, (0.5,), (0.5,)))
    local, ray_engine = LocalEngine(), RayEngine(None, 2)
    try:
        coords, peaks, skipped = ray_engine.keypoints(model, dataset, "cpu", batch_size=4, progress=False)
        want = local.keypoints(model, dataset, "cpu", batch_size=4, progress=False)
        assert set(skipped) == set(want[2]) == {4}
        np.testing.assert_allclose(coords, want[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(peaks, want[1], rtol=1e-5, atol=1e-6)
        from heatmapModule import layer_relevance
        from testModule import least_peaked_start

        layer = "Layer2"
        members = layer_relevance(model, torch.from_numpy(rng.normal(size=(6, 1, 32, 32)).astype(np.float32)),
                                  start=least_peaked_start, layers=[layer])[layer]
        members = np.asarray(members.detach() if torch.is_tensor(members) else members, np.float32)
        labels = np.array([0, 0, 1, 1, 1, 2])
        got = ray_engine.distances(model, dataset, layer, members, labels, 4, "cpu", start=least_peaked_start,
                                   progress=False)
        want = local.distances(model, dataset, layer, members, labels, 4, "cpu", start=least_peaked_start,
                               progress=False)
        assert got[0] == want[0] and "TestSet/broken.png" not in got[0]
        assert list(got[1]) == list(want[1]) == [0, 1]
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    finally:
        ray_engine.close()
