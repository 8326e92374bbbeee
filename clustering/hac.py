"""Faithful HUDD clustering of one layer: Ward, the WICD curve for every number of clusters k, and k at
the knee of its 4th-order gradient.

The WICD of every k comes from one pass over the distance matrix plus the dendrogram's merges, not
from one pass per k, so every k up to 500 stays affordable for tens of thousands of error images.
"""
import warnings

import numpy as np

from clustering.blocks import BLOCK_ROWS, progress_bar, spans
from clustering.ward import condensed_rows, cut, cut_roots, row_maxima, ward_condensed
from common.errors import HUDDError

MAX_CLUSTERS_CAP = 500              # the original's upper bound on k
MIN_MAX_CLUSTERS = 2                # ... and its lower bound
GRADIENT_STEP = 4                   # the original's gradientO4(wicd, 4); a scale, so it never moves the knee
MIN_POINTS_FOR_GRADIENT = 5         # the 4th-order stencil needs 5 samples
FLAT_TOLERANCE = 1e-9               # a curve varying less than this share of its size has no knee


def _check_distances(distances, name):
    D = distances if isinstance(distances, np.ndarray) else np.asarray(distances)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 1:
        raise HUDDError(f"{name}: expected a square (N, N) distance matrix with N >= 1, got shape {D.shape}; "
                        f"rerun -step distances")
    if not np.issubdtype(D.dtype, np.floating):
        raise HUDDError(f"{name}: expected float distances, got {D.dtype}; rerun -step distances")
    return D


def max_clusters_for(n, max_clusters=None):
    """The original's k range end: floor(N/2) clamped to [2, 500], optionally lowered by the user."""
    top = min(max(n // 2, MIN_MAX_CLUSTERS), MAX_CLUSTERS_CAP)
    if max_clusters is not None:
        top = min(top, max(int(max_clusters), MIN_MAX_CLUSTERS))
    return top


def _label_matrix(labels, k):
    from scipy.sparse import csr_matrix

    n = len(labels)
    return csr_matrix((np.ones(n), (np.arange(n), labels - 1)), shape=(n, k))


def _upper_sums_by_label(D, row_scale, labels, k, block_rows, progress, desc):
    """C[a, b] = sum over i < j with label(i)=a, label(j)=b of D[i, j] / row_scale[i] (labels 1..k)."""
    onehot = _label_matrix(labels, k)
    C = np.zeros((k, k))
    for r0, r1 in progress_bar(spans(D.shape[0], block_rows), None, desc, progress):
        block = np.triu(np.asarray(D[r0:r1], dtype=np.float64), k=r0 + 1)
        block /= row_scale[r0:r1, None]
        by_col = np.asarray((onehot.T @ block.T).T)
        C += np.asarray(onehot[r0:r1].T @ by_col)
    return C


def _row_sums_by_label(rows_of, n, labels, k, block_rows):
    """R[i, c] = sum over j with label(j)=c of M[i, j], for a matrix given by row blocks."""
    onehot = _label_matrix(labels, k)
    R = np.empty((n, k))
    for r0, r1 in spans(n, block_rows):
        R[r0:r1] = np.asarray((onehot.T @ np.asarray(rows_of(r0, r1), dtype=np.float64).T).T)
    return R


def wicd_curve(Z, D, row_max, k_max, block_rows=BLOCK_ROWS, progress=True):
    """WICD on the normalised matrix for every k in 2..k_max, from one pass over D and the merges.

    WICD(k) = (1/k) * sum over clusters c with |c| > 1 of ICD(c) * |c| / N, ICD(c) = mean of
    D_hat[i, j] over member pairs i < j (heatmap row order; D_hat is not symmetric). Pair sums of
    the k_max clusters come from the pass over D; each earlier merge adds the two clusters' sums
    and their cross sum, which are kept per cluster (O(k_max^2) in all).
    """
    n = D.shape[0]
    roots = cut_roots(Z, n, k_max)
    nodes, slot_of_leaf = np.unique(roots, return_inverse=True)
    C = _upper_sums_by_label(D, row_max, slot_of_leaf + 1, k_max, block_rows, progress, "WICD")
    within = np.diag(C).copy()
    cross = C + C.T
    np.fill_diagonal(cross, 0.0)
    size = np.bincount(slot_of_leaf, minlength=k_max).astype(np.float64)
    slot = {int(node): s for s, node in enumerate(nodes)}

    def weighted(s):
        m = size[s]
        return 2.0 * within[s] / ((m - 1.0) * n) if m > 1 else 0.0

    total = sum(weighted(s) for s in range(k_max))
    curve = {k_max: total / k_max}
    for t in range(n - k_max, n - 2):
        a, b = slot.pop(int(Z[t, 0])), slot.pop(int(Z[t, 1]))
        total -= weighted(a) + weighted(b)
        within[a] += within[b] + cross[a, b]
        size[a] += size[b]
        cross[a, :] += cross[b, :]
        cross[:, a] += cross[:, b]
        cross[a, a] = 0.0
        cross[b, :] = 0.0
        cross[:, b] = 0.0
        size[b] = 0.0
        within[b] = 0.0
        total += weighted(a)
        slot[n + t] = a
        k = n - t - 1
        curve[k] = total / k
    ks = np.arange(2, k_max + 1)
    return ks, np.array([curve[k] for k in ks])


def gradient_o4(values, step=GRADIENT_STEP):
    """Fourth-order central differences inside, first differences at both ends (the original's gradientO4)."""
    f = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(f)
    if len(f) < MIN_POINTS_FOR_GRADIENT:
        return np.gradient(f) / step if len(f) > 1 else out
    out[2:-2] = (f[:-4] - 8.0 * f[1:-3] + 8.0 * f[3:-1] - f[4:]) / 12.0
    out[:2] = f[1:3] - f[:2]
    out[-2:] = f[-2:] - f[-3:-1]
    return out / step


def choose_k(ks, curve):
    """The knee of the WICD curve's 4th-order gradient (kneed, concave, increasing), as the original.

    Fallbacks (the original crashed in these cases): with fewer than 5 values of k, or when kneed
    finds no knee on the gradient (or it is flat), the knee of the raw curve (convex, decreasing: the original's
    unused "KR" mode); when that fails too, the smallest k (fewest clusters to inspect).
    Returns (k, gradient, method).
    """
    from kneed import KneeLocator

    ks = np.asarray(ks)
    gradient = gradient_o4(curve)
    scale = FLAT_TOLERANCE * max(float(np.abs(curve).max()), np.finfo(float).tiny)
    if len(ks) == 1:
        return int(ks[0]), gradient, "only-k"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(ks) >= MIN_POINTS_FOR_GRADIENT and np.ptp(gradient) > scale:
            knee = KneeLocator(ks, gradient, curve="concave", direction="increasing").knee
            if knee is not None:
                return int(knee), gradient, "gradient-knee"
        knee = KneeLocator(ks, curve, curve="convex", direction="decreasing").knee if np.ptp(curve) > scale else None
    if knee is not None:
        return int(knee), gradient, "raw-knee"
    return int(ks[0]), gradient, "smallest-k"


def cluster_layer(distances, max_clusters=None, optimal_ordering=False, ward_dtype="auto",
                  block_rows=BLOCK_ROWS, progress=True, name="distance matrix"):
    """Faithful HUDD clustering of one layer's (N, N) distance matrix.

    Ward on the rows of D / rowmax(D); WICD for k = 2..min(N/2, 500) on that normalised matrix;
    k = knee of the curve's 4th-order gradient (see choose_k for the fallbacks). Returns a dict:
    k, labels (1..k, heatmap row order, fcluster numbering), ks, curve, gradient, knee, knee_method,
    wicd (raw distances, chosen labels: the best-layer criterion), wicd_normalised, silhouette
    (Euclidean between normalised rows, as the original), sizes (index c-1), medoids (row of the
    member with the smallest summed raw distance to its cluster), icd (mean raw pair distance per
    cluster), linkage.
    """
    from scipy.cluster.hierarchy import linkage

    D = _check_distances(distances, name)
    n = D.shape[0]
    if n == 1:
        return {"n": 1, "k": 1, "labels": np.ones(1, dtype=np.int64), "ks": np.array([], dtype=np.int64),
                "curve": np.array([]), "gradient": np.array([]), "knee": 1, "knee_method": "single-image",
                "wicd": 0.0, "wicd_normalised": 0.0, "silhouette": float("nan"), "sizes": np.array([1]),
                "medoids": np.array([0]), "icd": np.array([0.0]), "linkage": np.zeros((0, 4))}
    clock = _Clock()
    row_max = row_maxima(D, block_rows)
    if not np.all(np.isfinite(row_max)):
        raise HUDDError(f"{name}: holds NaN or infinite distances; rerun -step distances")
    cond = ward_condensed(D, row_max, ward_dtype, block_rows, progress)
    clock.lap("ward_input")
    Z = linkage(cond, method="ward", optimal_ordering=optimal_ordering)
    clock.lap("linkage")
    k_max = min(max_clusters_for(n, max_clusters), n)
    ks, curve = wicd_curve(Z, D, row_max, k_max, block_rows, progress)
    k, gradient, method = choose_k(ks, curve)
    labels = cut(Z, k)
    clock.lap("wicd_all_k_and_knee")
    sizes = np.bincount(labels, minlength=k + 1)[1:]
    raw_rows = _row_sums_by_label(lambda r0, r1: D[r0:r1], n, labels, k, block_rows)
    own = raw_rows[np.arange(n), labels - 1]
    within = np.bincount(labels, weights=own, minlength=k + 1)[1:] / 2.0
    pairs = sizes * (sizes - 1) / 2.0
    icd = np.divide(within, pairs, out=np.zeros(k), where=pairs > 0)
    wicd = float(np.sum(icd * sizes / n) / k)
    medoids = np.array([np.flatnonzero(labels == c)[np.argmin(own[labels == c])] for c in range(1, k + 1)])
    clock.lap("raw_wicd_and_medoids")
    j = np.arange(n, dtype=np.int64)
    base = n * j - j * (j + 1) // 2 - j - 1
    ward_rows = _row_sums_by_label(lambda r0, r1: condensed_rows(cond, n, r0, r1, base), n, labels, k,
                                   block_rows)
    silhouette = _silhouette(ward_rows, labels, sizes)
    clock.lap("silhouette")
    return {"n": n, "k": k, "labels": labels, "ks": ks, "curve": curve, "gradient": gradient, "knee": k,
            "knee_method": method, "wicd": wicd, "wicd_normalised": float(curve[k - 2]) if len(curve) else 0.0,
            "silhouette": silhouette, "sizes": sizes, "medoids": medoids, "icd": icd, "linkage": Z,
            "timings": clock.laps}


class _Clock:
    """Wall time per phase, kept in the result for benchmarks."""

    def __init__(self):
        import time
        self._now = time.perf_counter
        self._last = self._now()
        self.laps = {}

    def lap(self, name):
        now = self._now()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _silhouette(row_sums, labels, sizes):
    """Mean silhouette (sklearn's definition: 0 for singletons) from per-cluster distance sums."""
    k = len(sizes)
    if k < 2 or k >= len(labels):
        return float("nan")
    n = len(labels)
    own = labels - 1
    a_sum = row_sums[np.arange(n), own]
    own_size = sizes[own]
    a = np.divide(a_sum, own_size - 1, out=np.zeros(n), where=own_size > 1)
    means = row_sums / sizes[None, :]
    means[np.arange(n), own] = np.inf
    b = means.min(axis=1)
    denom = np.maximum(a, b)
    s = np.divide(b - a, denom, out=np.zeros(n), where=denom > 0)
    s[own_size == 1] = 0.0
    return float(s.mean())


def wicd(distances, labels):
    """WICD of a labelling on a matrix, pairs i < j (reference implementation for small matrices)."""
    D = np.asarray(distances, dtype=np.float64)
    labels = np.asarray(labels)
    n, k = len(labels), int(labels.max())
    total = 0.0
    for c in range(1, k + 1):
        members = np.flatnonzero(labels == c)
        if len(members) > 1:
            block = D[np.ix_(members, members)]
            icd = block[np.triu_indices(len(members), 1)].mean()
            total += icd * len(members) / n
    return total / k
