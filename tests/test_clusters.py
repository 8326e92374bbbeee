"""clusterModule: distances, faithful Ward + WICD + knee, best layer, inspection files, RQ1."""
import statistics

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

import clustering.distances
import clusterModule as cm
from common.errors import HUDDError


def planted(n=60, dims=30, clusters=4, spread=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims)) * spread
    truth = rng.integers(0, clusters, n)
    return (centres[truth] + rng.normal(size=(n, dims))).astype(np.float32), truth


def brute_wicd(matrix, labels):
    """WICD by its definition: explicit member pairs i < j, K = number of labels."""
    n, k = len(labels), int(max(labels))
    total = 0.0
    for c in range(1, k + 1):
        members = [i for i in range(n) if labels[i] == c]
        if len(members) > 1:
            pairs = [matrix[i][j] for a, i in enumerate(members) for j in members[a + 1:]]
            total += (sum(pairs) / len(pairs)) * len(members) / n
    return total / k


# ---------------------------------------------------------------------------- distances

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_distances_match_scipy_pdist_even_with_large_offsets_and_chunks(tmp_path, dtype):
    x, _ = planted(70, dims=40)
    x = x + 500.0                       # a large common offset: the |a|^2 + |b|^2 - 2ab trap
    x[5] = x[6]                         # an exact duplicate
    x[7] = x[8] + 1e-2                  # a near duplicate
    x = x.astype(dtype).reshape(70, 2, 4, 5)
    np.save(tmp_path / "h.npy", x)
    heatmaps = np.load(tmp_path / "h.npy", mmap_mode="r")
    expected = squareform(pdist(x.reshape(70, -1).astype(np.float64)))
    for options in ({}, {"block_rows": 16, "chunk_bytes": 70 * 8 * 7}):   # one chunk; 6 chunks of 7 features
        got = cm.pairwise_distances(heatmaps, progress=False, **options)
        assert got.shape == (70, 70) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert got[5, 6] == 0 and np.all(np.diag(got) == 0)


def test_write_distances_writes_npy_and_xlsx_with_image_keys(tmp_path):
    from openpyxl import load_workbook

    x, _ = planted(12, dims=6)
    np.save(tmp_path / "Layer3.npy", x)
    keys = [f"TestSet/c/{i}_a.b.png" for i in range(12)]
    out = cm.write_distances(tmp_path / "Layer3.npy", tmp_path / "Layer3HMDistance.npy",
                             xlsx=tmp_path / "Layer3HMDistance.xlsx", keys=keys, progress=False)
    saved = np.load(out)
    np.testing.assert_allclose(saved, squareform(pdist(x.astype(np.float64))), rtol=1e-5)
    rows = list(load_workbook(tmp_path / "Layer3HMDistance.xlsx", read_only=True).active.values)
    assert list(rows[0]) == keys and len(rows) == 13
    np.testing.assert_allclose(np.array(rows[1:], dtype=float), saved, rtol=1e-6)


def test_xlsx_beyond_excel_columns_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clustering.distances, "XLSX_MAX_COLUMNS", 5)
    np.save(tmp_path / "Layer1.npy", planted(8, dims=4)[0])
    cm.write_distances(tmp_path / "Layer1.npy", tmp_path / "D.npy", xlsx=tmp_path / "D.xlsx", progress=False)
    assert (tmp_path / "D.npy").is_file() and not (tmp_path / "D.xlsx").exists()
    assert "exceed Excel" in capsys.readouterr().out


def test_bad_heatmaps_and_distances_raise_huddError(tmp_path):
    with pytest.raises(HUDDError, match="heatmaps step"):
        cm.write_distances(tmp_path / "missing.npy", tmp_path / "D.npy")
    with pytest.raises(HUDDError):
        cm.pairwise_distances(np.zeros(5, dtype=np.float32))
    bad = np.ones((4, 3), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(HUDDError, match="row 2"):
        cm.pairwise_distances(bad, progress=False)
    with pytest.raises(HUDDError, match="square"):
        cm.cluster_layer(np.zeros((3, 4)), progress=False)


# ---------------------------------------------------------------------------- clustering

@pytest.fixture(scope="module")
def layer_case():
    x, truth = planted(60)
    distances = squareform(pdist(x.astype(np.float64))).astype(np.float32)
    return distances, truth, cm.cluster_layer(distances, progress=False, block_rows=16)


def test_linkage_is_ward_on_the_rows_of_the_row_max_normalised_matrix(layer_case):
    distances, _, result = layer_case
    normalised = distances.astype(np.float64) / distances.max(axis=1, keepdims=True)
    expected = linkage(pdist(normalised), method="ward")
    np.testing.assert_allclose(result["linkage"], expected, rtol=1e-9, atol=1e-12)


def test_wicd_of_every_k_matches_brute_force_on_the_normalised_matrix(layer_case):
    distances, _, result = layer_case
    normalised = distances.astype(np.float64) / distances.max(axis=1, keepdims=True)
    assert list(result["ks"]) == list(range(2, 31))           # k = 2 .. floor(60 / 2)
    for k, value in zip(result["ks"], result["curve"]):
        labels = fcluster(result["linkage"], k, criterion="maxclust")
        assert value == pytest.approx(brute_wicd(normalised, labels), rel=1e-9), k


def test_chosen_labels_raw_wicd_sizes_and_silhouette(layer_case):
    distances, _, result = layer_case
    k = result["k"]
    labels = result["labels"]
    np.testing.assert_array_equal(labels, fcluster(result["linkage"], k, criterion="maxclust"))
    assert result["wicd"] == pytest.approx(brute_wicd(distances.astype(np.float64), labels), rel=1e-9)
    assert list(result["sizes"]) == [int(np.sum(labels == c)) for c in range(1, k + 1)]
    rows = distances.astype(np.float64) / distances.max(axis=1, keepdims=True)
    feature = squareform(pdist(rows))
    scores = []
    for i, c in enumerate(labels):
        own = (labels == c) & (np.arange(len(labels)) != i)
        if not own.any():
            scores.append(0.0)
            continue
        a = feature[i, own].mean()
        b = min(feature[i, labels == other].mean() for other in set(labels) if other != c)
        scores.append((b - a) / max(a, b))
    assert result["silhouette"] == pytest.approx(np.mean(scores), rel=1e-9)
    for c in range(1, k + 1):
        members = np.flatnonzero(labels == c)
        sums = distances[np.ix_(members, members)].astype(np.float64).sum(axis=1)
        assert result["medoids"][c - 1] == members[np.argmin(sums)]


def test_knee_of_the_fourth_order_gradient_is_the_chosen_k(layer_case):
    from kneed import KneeLocator

    _, _, result = layer_case
    curve = result["curve"]
    stencil = np.zeros_like(curve)
    stencil[2:-2] = (curve[:-4] - 8 * curve[1:-3] + 8 * curve[3:-1] - curve[4:]) / 12
    stencil[:2] = curve[1:3] - curve[:2]
    stencil[-2:] = curve[-2:] - curve[-3:-1]
    knee = KneeLocator(result["ks"], stencil, curve="concave", direction="increasing").knee
    assert result["knee_method"] == "gradient-knee" and result["k"] == knee


def test_well_separated_planted_clusters_are_recovered():
    x, truth = planted(80, clusters=4, spread=8.0, seed=3)
    result = cm.cluster_layer(squareform(pdist(x.astype(np.float64))), progress=False)
    at_planted = cm.cut(result["linkage"], 4)
    assert len(set(zip(truth, at_planted))) == 4          # the level-4 partition is the planted one


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 11])
def test_tiny_n_never_crashes_and_k_stays_in_range(n):
    x, _ = planted(n, dims=5, seed=n)
    result = cm.cluster_layer(squareform(pdist(x.astype(np.float64))), progress=False)
    assert result["labels"].shape == (n,)
    if n == 1:
        assert result["k"] == 1
    else:
        assert 2 <= result["k"] <= max(2, n // 2)
        assert result["labels"].max() == result["k"] and result["knee_method"]


def test_choose_k_falls_back_when_kneed_finds_no_knee():
    ks = np.arange(2, 10)
    k, _, method = cm.choose_k(ks, np.full(len(ks), 0.3))    # flat curve: no knee anywhere
    assert (k, method) == (2, "smallest-k")
    k, _, method = cm.choose_k(np.arange(2, 6), np.array([1.0, 0.3, 0.2, 0.15]))   # too short for the stencil
    assert method == "raw-knee" and k == 3


def test_max_clusters_option_caps_the_curve(layer_case):
    distances, _, _ = layer_case
    result = cm.cluster_layer(distances, max_clusters=8, progress=False)
    assert result["ks"][-1] == 8 and result["k"] <= 8


def test_best_layer_is_lowest_raw_wicd_and_never_the_input_layer():
    results = {"Layer0": {"wicd": 0.01}, "Layer3": {"wicd": 0.5}, "Layer12": {"wicd": 0.4},
               "Layer7": {"wicd": 0.4}}
    assert cm.select_best_layer(results) == "Layer7"            # tie: the lower layer
    with pytest.raises(HUDDError, match="internal layers"):
        cm.select_best_layer({"Layer0": {"wicd": 0.1}})


# ---------------------------------------------------------------------------- files

def make_images(root, n, classes=("left", "right")):
    rng = np.random.default_rng(0)
    keys = []
    for i in range(n):
        key = f"TestSet/{classes[i % len(classes)]}/img {i}_v1.0.png"
        path = root / "DataSets" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (12, 10) if i % 3 else (16, 16)        # mixed sizes: the GIF must cope
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        keys.append(key)
    return keys


def test_cluster_analysis_files_gifs_curve_summary_and_best_layer_copy(tmp_path, layer_case):
    import imageio.v3 as iio

    distances, _, result = layer_case
    keys = make_images(tmp_path, len(result["labels"]))
    t_dir = tmp_path / "T"
    folder = cm.write_cluster_analysis(t_dir, "Layer4", result, keys, tmp_path / "DataSets", distances=distances,
                                       gif_max_frames=7, progress=False)
    table = pd.read_csv(folder / "clusters.csv")
    assert table["image"].tolist() == keys and table["cluster"].tolist() == result["labels"].tolist()
    for c, size in enumerate(result["sizes"], start=1):
        members = sorted(p.name for p in (folder / str(c)).iterdir())
        assert members == sorted(cm.member_file_name(keys[i]) for i in np.flatnonzero(result["labels"] == c))
        gif = folder / "AllClusters" / f"{c}.gif"
        assert gif.is_file() == (size > 1)
        if size > 1:
            with Image.open(gif) as img:
                assert img.n_frames == min(size, 7)
                assert img.info["duration"] == 600                  # 100 images per minute
    assert iio.imread(folder / "WICD.png").ndim == 3
    info = pd.read_csv(folder / "cluster_info.csv")
    assert info["size"].tolist() == result["sizes"].tolist()
    assert info["medoid"].tolist() == [keys[i] for i in result["medoids"]]
    other = dict(result, wicd=result["wicd"] * 2)
    cm.write_summary(t_dir, {"Layer4": result, "Layer0": dict(result, wicd=0.0), "Layer9": other}, "Layer4")
    summary = pd.read_csv(t_dir / "ClusterAnalysis" / "summary.csv")
    assert summary.columns.tolist() == ["layer", "k", "wicd", "wicd_normalised", "silhouette",
                                        "n_clusters_nonsingleton", "sizes", "selected"]
    assert summary["layer"].tolist() == ["Layer0", "Layer4", "Layer9"]
    assert summary["selected"].tolist() == [False, True, False]
    assert summary.loc[1, "sizes"] == ";".join(map(str, result["sizes"]))
    assert (t_dir / "ClusterAnalysis" / "summary.xlsx").is_file()
    (t_dir / "Layer9").mkdir()                                   # a previous run's best layer
    (t_dir / "Heatmaps").mkdir()
    (t_dir / "Layer9HMDistance.npy").write_bytes(b"")
    cm.copy_best_layer(t_dir, "Layer4")
    assert not (t_dir / "Layer9").exists()
    assert (t_dir / "Heatmaps").is_dir() and (t_dir / "Layer9HMDistance.npy").is_file()
    copied = t_dir / "Layer4"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert cm.best_layer_from_summary(t_dir) == "Layer4"


def test_missing_member_image_is_a_clear_error_and_keeps_the_old_folder(tmp_path, layer_case):
    _, _, result = layer_case
    keys = make_images(tmp_path, len(result["labels"]))
    t_dir = tmp_path / "T"
    cm.write_cluster_analysis(t_dir, "Layer2", result, keys, tmp_path / "DataSets", progress=False)
    (tmp_path / "DataSets" / keys[10]).unlink()
    with pytest.raises(HUDDError, match="error image missing"):
        cm.write_cluster_analysis(t_dir, "Layer2", result, keys, tmp_path / "DataSets", progress=False)
    assert (t_dir / "ClusterAnalysis" / "Layer2" / "clusters.csv").is_file()
    assert not [p for p in (t_dir / "ClusterAnalysis").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- RQ1

def rq1_case():
    """Cluster 1 is tight in `angle`, cluster 2 is spread in every parameter, cluster 3 is a singleton."""
    clusters = pd.DataFrame({"image": [f"TestSet/a/{i}.png" for i in range(9)],
                             "cluster": [1, 1, 1, 1, 2, 2, 2, 2, 3]})
    angle = [10.0, 10.5, 11.0, 10.2, -40.0, 35.0, 60.0, -20.0, 0.0]
    light = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.6, 0.4, 0.5]
    params = pd.DataFrame({"image": clusters["image"], "angle": angle, "light": light})
    return params, clusters, angle, light


def test_rq1_ratios_and_explained_clusters_by_hand():
    params, clusters, angle, light = rq1_case()
    table = cm.rq1(params, clusters)
    assert sorted(table["cluster"].unique()) == [1, 2]                 # the singleton is left out
    for c, rows in ((1, slice(0, 4)), (2, slice(4, 8))):
        for name, values in (("angle", angle), ("light", light)):
            expected = statistics.variance(values[rows]) / statistics.variance(values[:8])
            got = table[(table["cluster"] == c) & (table["parameter"] == name)]["ratio"].item()
            assert got == pytest.approx(expected)
    per = cm.rq1_clusters(table)
    assert per.set_index("cluster")["explained"].to_dict() == {1: True, 2: False}
    assert per.set_index("cluster").loc[1, "best_parameter"] == "angle"
    summary = cm.rq1_summary(table, clusters)
    assert summary["explained_percent"] == 50.0
    assert summary["inspected"] == 4 + 4 + 1 and summary["error_images"] == 9


def test_rq1_constant_parameter_has_ratio_one():
    params, clusters, _, _ = rq1_case()
    params["seed"] = 7
    table = cm.rq1(params, clusters)
    assert table[table["parameter"] == "seed"]["ratio"].tolist() == [1.0, 1.0]


def test_rq1_skips_missing_rows_and_non_numeric_columns_with_notes(tmp_path, capsys):
    params, clusters, _, _ = rq1_case()
    params["weather"] = ["sun", "rain"] * 4 + ["fog"]
    params = params.drop(index=[0, 5])
    case = tmp_path / "case"
    (case / "DataSets").mkdir(parents=True)
    params.to_csv(case / "DataSets" / "params.csv", index=False)
    summary = cm.write_rq1(case, clusters["image"].tolist(), clusters["cluster"].to_numpy())
    out = capsys.readouterr().out
    assert "'weather' is not numeric" in out and "no row for 2 of 8" in out
    assert summary["clusters_with_parameters"] == 2
    assert (case / "RQ1.xlsx").is_file() and (case / "RQ1.csv").is_file()
    sheets = pd.read_excel(case / "RQ1.xlsx", sheet_name=None)
    assert set(sheets) == {"Clusters", "Ratios", "Summary"}
    assert "weather" not in set(sheets["Ratios"]["parameter"])
    assert "%" in cm.format_rq1(summary)


def test_rq1_without_params_csv_says_not_available(tmp_path, capsys):
    (tmp_path / "DataSets").mkdir()
    assert cm.write_rq1(tmp_path, ["TestSet/a/1.png"], [1]) is None
    assert "RQ1 not available" in capsys.readouterr().out
