"""Root-cause clusters of the error images (HUDD steps 1 and 2).

Distances between heatmaps, Ward clustering on the rows of the row-max-normalised distance
matrix, the WICD curve for every number of clusters, its knee, the best layer, the folders an
engineer inspects (member images, GIFs, curves), and the RQ1 variance-reduction measure.
Everything scales to tens of thousands of error images: distances and the Ward input are
matrix products in blocks, and the WICD of every k comes from one pass over the distance
matrix plus the dendrogram's merges.
"""
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import HUDDError
from common.files import atomic_path, write_csv
from common.tables import read_table

MAX_CLUSTERS_CAP = 500              # the original's upper bound on k
MIN_MAX_CLUSTERS = 2                # ... and its lower bound
INPUT_LAYER = "Layer0"              # excluded from the best-layer choice
XLSX_MAX_COLUMNS = 16384            # Excel's column limit
GRADIENT_STEP = 4                   # the original's gradientO4(wicd, 4); a scale, so it never moves the knee
MIN_POINTS_FOR_GRADIENT = 5         # the 4th-order stencil needs 5 samples
FLAT_TOLERANCE = 1e-9               # a curve varying less than this share of its size has no knee
EXACT_RECOMPUTE_RATIO = 1e-6        # d^2 below this share of |a|^2+|b|^2 is recomputed from the rows
WARD_FLOAT64_MAX_N = 8192           # above this the N^3 Ward input product runs in float32
BLOCK_ROWS = 1024
FEATURE_CHUNK_BYTES = 1 << 30       # float64 working set for one feature chunk of all rows
GIF_SECONDS_PER_FRAME = 0.6         # 100 images per minute, the paper's setting
GIF_MAX_FRAMES = 100                # longer clusters show their 100 images closest to the medoid
GIF_MAX_SIDE = 256
RQ1_EXPLAINED_RATIO = 0.5           # a cluster is explained when some parameter's variance ratio is below this
IMAGES_INSPECTED_PER_CLUSTER = 5    # the tool paper's Table 1 measure
CLUSTER_ANALYSIS = "ClusterAnalysis"


# ----------------------------------------------------------------------------------------------
# distances

def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _as_rows(heatmaps, name="heatmaps"):
    array = heatmaps if isinstance(heatmaps, np.ndarray) else np.asarray(heatmaps)
    if array.ndim < 2 or array.shape[0] < 1:
        raise HUDDError(f"{name}: expected an array of shape (N, ...) with one heatmap per row, got shape "
                        f"{array.shape}; recompute the heatmaps (-step heatmaps)")
    if not np.issubdtype(array.dtype, np.floating):
        raise HUDDError(f"{name}: expected float16/float32/float64 heatmaps, got {array.dtype}; "
                        f"recompute the heatmaps (-step heatmaps)")
    return array.reshape(array.shape[0], -1)


def _blocks(n, size):
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def pairwise_distances(heatmaps, out=None, block_rows=BLOCK_ROWS, chunk_bytes=FEATURE_CHUNK_BYTES,
                       progress=True, name="heatmaps"):
    """Euclidean distances between flattened heatmaps as an (N, N) float32 matrix.

    Blocks of |a|^2 + |b|^2 - 2ab on column-centred float64 data (translation does not change a
    distance but removes most of the cancellation); pairs closer than EXACT_RECOMPUTE_RATIO of
    their norms are recomputed from the rows. Only the upper block triangle is multiplied. Accepts
    memmaps: the features are read in chunks of about `chunk_bytes` of float64.
    """
    X = _as_rows(heatmaps, name)
    n, f = X.shape
    chunk = max(1, min(f, int(chunk_bytes // (8 * n))))
    chunks = _blocks(f, chunk)
    mean = np.empty(f)
    cached = {}
    for c0, c1 in chunks:
        part = np.asarray(X[:, c0:c1], dtype=np.float64)
        finite = np.isfinite(part).all(axis=1)
        if not finite.all():
            raise HUDDError(f"{name}: heatmap row {int(np.flatnonzero(~finite)[0])} holds NaN or infinite values; "
                            f"recompute the heatmaps (-step heatmaps)")
        mean[c0:c1] = part.mean(axis=0)
        if len(chunks) == 1:
            part -= mean
            cached["all"] = part
    del part

    def centred(r0, c0, c1):
        if cached:
            return cached["all"][r0:]
        return np.asarray(X[r0:, c0:c1], dtype=np.float64) - mean[c0:c1]

    norms = np.zeros(n)
    for c0, c1 in chunks:
        part = centred(0, c0, c1)
        norms += np.einsum("ij,ij->i", part, part)
    if out is None:
        out = np.empty((n, n), dtype=np.float32)
    elif out.shape != (n, n):
        raise HUDDError(f"output array has shape {out.shape}, expected {(n, n)}")
    panels = _blocks(n, block_rows)
    for r0, r1 in _progress(panels, len(panels), "distances", progress):
        gram = np.zeros((r1 - r0, n - r0))
        for c0, c1 in chunks:
            rows = centred(r0, c0, c1)
            gram += rows[: r1 - r0] @ rows.T
        total = norms[r0:r1, None] + norms[None, r0:]
        sq = total - 2.0 * gram
        del gram
        local = np.arange(r1 - r0)
        sq[local, local] = 0.0
        close = np.argwhere(sq < EXACT_RECOMPUTE_RATIO * total)
        close = close[close[:, 1] > close[:, 0]]
        if len(close):
            sq[close[:, 0], close[:, 1]] = _exact_squared(X, r0 + close[:, 0], r0 + close[:, 1])
        np.maximum(sq, 0.0, out=sq)
        dist = np.sqrt(sq, out=sq).astype(np.float32)
        out[r0:r1, r0:] = dist
        out[r0:, r0:r1] = dist.T
    return out


def _exact_squared(X, rows, cols):
    """Squared distances of the given pairs from the rows themselves, in float64."""
    result = np.empty(len(rows))
    for i in np.unique(rows):
        pick = np.flatnonzero(rows == i)
        a = np.asarray(X[i], dtype=np.float64)
        for s0, s1 in _blocks(len(pick), 64):
            diff = np.asarray(X[cols[pick[s0:s1]]], dtype=np.float64) - a
            result[pick[s0:s1]] = np.einsum("ij,ij->i", diff, diff)
    return result


def write_distances(heatmaps_npy, out_npy, xlsx=None, keys=None, progress=True, **options):
    """Write T/<Layer>HMDistance.npy (float32) and, for N <= 16,384 and an `xlsx` path, its XLSX export."""
    heatmaps_npy, out_npy = Path(heatmaps_npy), Path(out_npy)
    if not heatmaps_npy.is_file():
        raise HUDDError(f"{heatmaps_npy}: heatmaps not found; run the heatmaps step first (-step heatmaps)")
    try:
        heatmaps = np.load(heatmaps_npy, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise HUDDError(f"{heatmaps_npy}: not a readable .npy array ({exc}); recompute the heatmaps "
                        f"(-step heatmaps)") from None
    n = heatmaps.shape[0] if heatmaps.ndim else 0
    if keys is not None and len(keys) != n:
        raise HUDDError(f"{heatmaps_npy}: {n} heatmap rows but {len(keys)} image keys; recompute the "
                        f"heatmaps (-step heatmaps) so that index.csv and the arrays agree")
    with atomic_path(out_npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, n))
        pairwise_distances(heatmaps, out=out, progress=progress, name=str(heatmaps_npy), **options)
        out.flush()
        del out
    if xlsx is not None:
        if n > XLSX_MAX_COLUMNS:
            print(f"note: {xlsx} not written: {n} error images exceed Excel's {XLSX_MAX_COLUMNS} columns; "
                  f"the distances are in {out_npy} (numpy.load)")
        else:
            write_distances_xlsx(np.load(out_npy, mmap_mode="r"), xlsx, keys, progress)
    return out_npy


_XLSX_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_XLSX_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_XLSX_DOC = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_XLSX_PARTS = {
    "[Content_Types].xml":
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
    "_rels/.rels":
        f'<Relationships xmlns="{_XLSX_RELS}"><Relationship Id="rId1" '
        f'Type="{_XLSX_DOC}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
    "xl/workbook.xml":
        f'<workbook xmlns="{_XLSX_MAIN}" xmlns:r="{_XLSX_DOC}"><sheets>'
        f'<sheet name="distances" sheetId="1" r:id="rId1"/></sheets></workbook>',
    "xl/_rels/workbook.xml.rels":
        f'<Relationships xmlns="{_XLSX_RELS}"><Relationship Id="rId1" '
        f'Type="{_XLSX_DOC}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
}


def write_distances_xlsx(distances, path, keys=None, progress=True):
    """The original's XLSX view of a distance matrix: the image keys as header, one row per image.

    Streamed straight into the zip as SpreadsheetML (8 significant digits): about ten times
    faster than openpyxl's write-only mode, which needs minutes for a few thousand images.
    """
    import zipfile
    from xml.sax.saxutils import escape

    n = distances.shape[0]
    keys = [str(k) for k in keys] if keys is not None else [str(i) for i in range(n)]
    header = "".join(f'<c t="inlineStr"><is><t>{escape(k)}</t></is></c>' for k in keys)
    blocks = _blocks(n, BLOCK_ROWS)
    declaration = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as book:
            for name, xml in _XLSX_PARTS.items():
                book.writestr(name, declaration + xml)
            with book.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as sheet:
                sheet.write(f'{declaration}<worksheet xmlns="{_XLSX_MAIN}"><sheetData><row r="1">{header}</row>'
                            .encode())
                for r0, r1 in _progress(blocks, len(blocks), Path(path).name, progress):
                    lines = []
                    for r, row in enumerate(np.asarray(distances[r0:r1], dtype=np.float64).tolist(), start=r0 + 2):
                        lines.append(f'<row r="{r}"><c><v>' + "</v></c><c><v>".join(map("{:.8g}".format, row))
                                     + "</v></c></row>")
                    sheet.write("".join(lines).encode())
                sheet.write(b"</sheetData></worksheet>")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# clustering

def load_distances(path):
    path = Path(path)
    if not path.is_file():
        raise HUDDError(f"{path}: distance matrix not found; run the distances step first (-step distances)")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise HUDDError(f"{path}: not a readable .npy array ({exc}); rerun -step distances") from None


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


def _row_max(D, block_rows):
    peak = np.empty(D.shape[0])
    for r0, r1 in _blocks(D.shape[0], block_rows):
        peak[r0:r1] = np.abs(np.asarray(D[r0:r1], dtype=np.float64)).max(axis=1)
    peak[peak == 0] = 1.0       # like sklearn's normalize: an all-zero row stays zero
    return peak


def ward_condensed(D, row_max=None, dtype="auto", block_rows=BLOCK_ROWS, progress=True):
    """Condensed Euclidean distances between the rows of the row-max-normalised matrix D / max_j D_ij.

    This is what the original fed to Ward via pdist (an O(N^3) loop there); here it is one
    symmetric product of the column-centred rows, in float64 up to N = WARD_FLOAT64_MAX_N and in
    float32 above (relative error about 1e-6 of the row norms).
    """
    n = D.shape[0]
    row_max = _row_max(D, block_rows) if row_max is None else row_max
    work = np.dtype(np.float64 if (dtype == "auto" and n <= WARD_FLOAT64_MAX_N) else
                    (np.float32 if dtype == "auto" else dtype))
    panels = _blocks(n, block_rows)
    mean = np.zeros(n)
    for r0, r1 in panels:
        mean += (np.asarray(D[r0:r1], dtype=np.float64) / row_max[r0:r1, None]).sum(axis=0)
    mean /= n
    Y = np.empty((n, n), dtype=work)
    norms = np.empty(n)
    for r0, r1 in panels:
        rows = np.asarray(D[r0:r1], dtype=np.float64) / row_max[r0:r1, None] - mean
        norms[r0:r1] = np.einsum("ij,ij->i", rows, rows)
        Y[r0:r1] = rows
    del rows
    cond = np.empty(n * (n - 1) // 2)
    for r0, r1 in _progress(panels, len(panels), "Ward input", progress):
        sq = (Y[r0:r1] @ Y[r0:].T).astype(np.float64)
        sq *= -2.0
        sq += norms[r0:r1, None]
        sq += norms[None, r0:]
        np.maximum(sq, 0.0, out=sq)
        np.sqrt(sq, out=sq)
        for i in range(r0, r1):
            start = _condensed_start(n, i)
            cond[start:start + n - i - 1] = sq[i - r0, i - r0 + 1:]
    return cond


def _condensed_start(n, i):
    return n * i - i * (i + 1) // 2


def _condensed_rows(cond, n, r0, r1, column_base=None):
    """Rows r0..r1 of the square matrix stored in condensed form (diagonal 0)."""
    if column_base is None:
        j = np.arange(n, dtype=np.int64)
        column_base = n * j - j * (j + 1) // 2 - j - 1      # index of (j, i) is column_base[j] + i
    rows = np.zeros((r1 - r0, n))
    for i in range(r0, r1):
        start = _condensed_start(n, i)
        rows[i - r0, i + 1:] = cond[start:start + n - i - 1]
        if i:
            rows[i - r0, :i] = cond[column_base[:i] + i]
    return rows


def _cut_roots(Z, n, k):
    """For each leaf, the dendrogram node that holds it when the tree is cut into k clusters."""
    performed = n - k                 # merges 0..performed-1 are done at level k
    root = np.full(2 * n - 1, -1, dtype=np.int64)
    if performed >= n - 1:
        root[2 * n - 2] = 2 * n - 2
    children = Z[:, :2].astype(np.int64)
    for t in range(n - 2, -1, -1):
        r = root[n + t]
        for c in children[t]:
            if r != -1:
                root[c] = r
            elif c < n or c - n < performed:
                root[c] = c
    return root[:n]


def _number_like_fcluster(Z, roots):
    """Cluster ids 1..k in the order scipy's fcluster gives them.

    fcluster walks the tree from the root, left internal child, then right internal child, then
    the leaf children; a cluster is numbered when the walk enters its top node.
    """
    n = len(roots)
    children = Z[:, :2].astype(np.int64)
    is_top = np.zeros(2 * n - 1, dtype=bool)
    is_top[roots] = True
    ids = {}
    stack = []

    def enter(node):
        if is_top[node]:
            ids[node] = len(ids) + 1
        else:
            stack.append((node, 0))

    enter(2 * n - 2)
    while stack:
        node, state = stack.pop()
        left, right = children[node - n]
        if state == 0:
            stack.append((node, 1))
            if left >= n:
                enter(left)
        elif state == 1:
            stack.append((node, 2))
            if right >= n:
                enter(right)
        else:
            for child in (left, right):
                if child < n:
                    enter(child)
    return np.array([ids[r] for r in roots], dtype=np.int64)


def cut(Z, k):
    """Labels 1..k of the level-k partition (the first N-k merges), numbered like fcluster."""
    n = Z.shape[0] + 1
    return _number_like_fcluster(Z, _cut_roots(Z, n, k))


def _label_matrix(labels, k):
    from scipy.sparse import csr_matrix

    n = len(labels)
    return csr_matrix((np.ones(n), (np.arange(n), labels - 1)), shape=(n, k))


def _upper_sums_by_label(D, row_scale, labels, k, block_rows, progress, desc):
    """C[a, b] = sum over i < j with label(i)=a, label(j)=b of D[i, j] / row_scale[i] (labels 1..k)."""
    onehot = _label_matrix(labels, k)
    C = np.zeros((k, k))
    for r0, r1 in _progress(_blocks(D.shape[0], block_rows), None, desc, progress):
        block = np.triu(np.asarray(D[r0:r1], dtype=np.float64), k=r0 + 1)
        block /= row_scale[r0:r1, None]
        by_col = np.asarray((onehot.T @ block.T).T)
        C += np.asarray(onehot[r0:r1].T @ by_col)
    return C


def _row_sums_by_label(rows_of, n, labels, k, block_rows):
    """R[i, c] = sum over j with label(j)=c of M[i, j], for a matrix given by row blocks."""
    onehot = _label_matrix(labels, k)
    R = np.empty((n, k))
    for r0, r1 in _blocks(n, block_rows):
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
    roots = _cut_roots(Z, n, k_max)
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
    row_max = _row_max(D, block_rows)
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
    ward_rows = _row_sums_by_label(lambda r0, r1: _condensed_rows(cond, n, r0, r1, base), n, labels, k,
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


def layer_number(layer):
    match = re.fullmatch(r"Layer(\d+)", str(layer))
    return int(match.group(1)) if match else None


def _layer_sort_key(layer):
    number = layer_number(layer)
    return (number is None, number if number is not None else 0, str(layer))


def select_best_layer(results):
    """The layer with the lowest WICD on raw distances; the input layer (Layer0) never wins.

    `results`: {layer: cluster_layer result or any mapping with a 'wicd' entry}. Ties go to the
    lower layer index.
    """
    candidates = [(float(r["wicd"]), _layer_sort_key(layer), layer) for layer, r in results.items()
                  if layer != INPUT_LAYER and np.isfinite(float(r["wicd"]))]
    if not candidates:
        raise HUDDError(f"no layer to choose from: only {sorted(results) or 'no layers'} clustered; "
                        f"compute heatmaps of internal layers (-step heatmaps) and rerun -step clusters")
    return min(candidates)[2]


# ----------------------------------------------------------------------------------------------
# files for inspection

def member_file_name(image):
    """The file name of a member copy: its key relative to DataSets/ with '/' turned into '__'.

    Unique (keys are) and it keeps the class folder visible; nothing ever parses it back.
    """
    return str(image).replace("\\", "/").replace("/", "__")


def member_order(result, cluster, distances=None):
    """Rows of a cluster, medoid first, then by raw distance to the medoid (row order without D)."""
    rows = np.flatnonzero(np.asarray(result["labels"]) == cluster)
    medoid = int(result["medoids"][cluster - 1])
    others = rows[rows != medoid]
    if distances is not None and len(others):
        others = others[np.argsort(np.asarray(distances[medoid], dtype=np.float64)[others], kind="stable")]
    return np.concatenate([[medoid], others]).astype(np.int64)


def _fresh_dir(final):
    """A temporary folder beside `final`; `_swap_dir` puts it in place of `final` in two renames."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def _swap_dir(tmp, final):
    final = Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_frame(path, size=None):
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is None:
            scale = min(1.0, GIF_MAX_SIDE / max(img.size))
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return np.asarray(img), size


def write_gif(paths, out, seconds_per_frame=GIF_SECONDS_PER_FRAME):
    """An animated GIF of the images, all at the first image's size (capped at GIF_MAX_SIDE)."""
    import imageio.v3 as iio

    frames, size = [], None
    for path in paths:
        frame, size = _read_frame(path, size)
        frames.append(frame)
    with atomic_path(out) as tmp:
        iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(round(seconds_per_frame * 1000)),
                    loop=0)
    return Path(out)


def plot_wicd(result, out, layer=""):
    """The WICD curve and its 4th-order gradient, the chosen k marked on both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    ks, k = result["ks"], result["k"]
    top.plot(ks, result["curve"], color="tab:blue")
    bottom.plot(ks, result["gradient"], color="tab:orange")
    if k in set(np.asarray(ks).tolist()):
        i = int(k - ks[0])
        top.plot([k], [result["curve"][i]], "ro", ms=6)
        bottom.plot([k], [result["gradient"][i]], "ro", ms=6)
    for ax in (top, bottom):
        ax.axvline(k, color="red", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    top.set_ylabel("WICD (normalised)")
    bottom.set_ylabel("4th-order gradient")
    bottom.set_xlabel("number of clusters k")
    top.set_title(f"{layer}: k = {k} ({result['knee_method']})")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(out)


def write_cluster_analysis(t_dir, layer, result, images, datasets_dir, distances=None, copy_images=True,
                           gif_max_frames=GIF_MAX_FRAMES, seconds_per_frame=GIF_SECONDS_PER_FRAME,
                           progress=True):
    """T/ClusterAnalysis/<Layer>/: clusters.csv, <cluster>/ member copies, AllClusters/<cluster>.gif
    (clusters of 2+ members, 100 images per minute), WICD.png, wicd.csv and cluster_info.csv.

    `images`: the image keys (relative to DataSets/) in heatmap row order; `distances` (default
    T/<Layer>HMDistance.npy when present) orders members by distance to the medoid. The folder is built
    beside the old one and swapped in, so a killed run leaves the previous folder intact.
    """
    datasets_dir = Path(datasets_dir)
    labels = np.asarray(result["labels"])
    images = [str(i) for i in images]
    if len(images) != len(labels):
        raise HUDDError(f"{Path(t_dir) / 'Heatmaps' / 'index.csv'}: {len(images)} images but {len(labels)} "
                        f"clustered rows; rerun -step heatmaps and -step distances")
    final = Path(t_dir) / CLUSTER_ANALYSIS / layer
    if distances is None and (Path(t_dir) / f"{layer}HMDistance.npy").is_file():
        distances = np.load(Path(t_dir) / f"{layer}HMDistance.npy", mmap_mode="r")
    tmp = _fresh_dir(final)
    try:
        write_csv(tmp / "clusters.csv", pd.DataFrame({"image": images, "cluster": labels}))
        write_csv(tmp / "wicd.csv", pd.DataFrame({"k": result["ks"], "wicd": result["curve"],
                                                   "gradient": result["gradient"]}))
        info = []
        (tmp / "AllClusters").mkdir()
        for c in _progress(range(1, result["k"] + 1), result["k"], f"{layer} clusters", progress):
            order = member_order(result, c, distances)
            gif = ""
            if copy_images:
                folder = tmp / str(c)
                folder.mkdir()
                for row in order:
                    source = datasets_dir / images[row]
                    if not source.is_file():
                        raise HUDDError(f"{source}: error image missing; restore DataSets/ or rerun -step test")
                    shutil.copyfile(source, folder / member_file_name(images[row]))
            if len(order) > 1:
                gif = f"AllClusters/{c}.gif"
                write_gif([datasets_dir / images[r] for r in order[:gif_max_frames]], tmp / gif, seconds_per_frame)
            info.append({"cluster": c, "size": len(order), "medoid": images[int(result["medoids"][c - 1])],
                         "icd": float(result["icd"][c - 1]), "gif": gif})
        write_csv(tmp / "cluster_info.csv", pd.DataFrame(info))
        if len(result["ks"]):
            plot_wicd(result, tmp / "WICD.png", layer)
        _swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def summary_frame(results, best):
    rows = []
    for layer in sorted(results, key=_layer_sort_key):
        r = results[layer]
        sizes = np.asarray(r["sizes"])
        rows.append({"layer": layer, "k": int(r["k"]), "wicd": float(r["wicd"]),
                     "wicd_normalised": float(r["wicd_normalised"]), "silhouette": float(r["silhouette"]),
                     "n_clusters_nonsingleton": int(np.sum(sizes > 1)),
                     "sizes": ";".join(str(int(s)) for s in sizes), "selected": layer == best})
    return pd.DataFrame(rows, columns=["layer", "k", "wicd", "wicd_normalised", "silhouette",
                                       "n_clusters_nonsingleton", "sizes", "selected"])


def write_summary(t_dir, results, best, copy_best=True):
    """T/ClusterAnalysis/summary.csv and .xlsx (one row per layer), and the best layer's clusters
    copied to T/Layer<X>/ (what the README of the original promised)."""
    folder = Path(t_dir) / CLUSTER_ANALYSIS
    frame = summary_frame(results, best)
    write_csv(folder / "summary.csv", frame)
    with atomic_path(folder / "summary.xlsx") as tmp:
        frame.to_excel(tmp, index=False, engine="openpyxl", sheet_name="summary")
    if copy_best:
        copy_best_layer(t_dir, best)
    return folder / "summary.csv"


def copy_best_layer(t_dir, best):
    """T/<best>/ = a copy of T/ClusterAnalysis/<best>/; an older run's T/Layer<i>/ is removed."""
    source = Path(t_dir) / CLUSTER_ANALYSIS / best
    if not source.is_dir():
        raise HUDDError(f"{source}: missing; rerun -step clusters")
    final = Path(t_dir) / best
    tmp = _fresh_dir(final)
    try:
        os.rmdir(tmp)
        shutil.copytree(source, tmp)
        _swap_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in Path(t_dir).glob("Layer*"):
        if stale.is_dir() and layer_number(stale.name) is not None and stale.name != best:
            shutil.rmtree(stale)        # a previous run's best layer
    return final


def read_summary(t_dir):
    return read_table(Path(t_dir) / CLUSTER_ANALYSIS / "summary.csv", required=("layer", "selected"),
                      missing_hint="run the clustering step first (-step clusters)")


def read_clusters(t_dir, layer):
    """A layer's clusters.csv: image (text) and cluster (int), one row per error image."""
    return read_table(Path(t_dir) / CLUSTER_ANALYSIS / layer / "clusters.csv", required=("image", "cluster"),
                      missing_hint="run the clustering step first (-step clusters)")


def best_layer_from_summary(t_dir):
    frame = read_summary(t_dir)
    chosen = frame[frame["selected"].astype(str).str.lower() == "true"]
    if chosen.empty:
        raise HUDDError(f"{Path(t_dir) / CLUSTER_ANALYSIS / 'summary.csv'}: no layer marked selected; "
                        f"rerun -step clusters")
    return str(chosen["layer"].iloc[0])


# ----------------------------------------------------------------------------------------------
# RQ1

def _variance(values):
    return float(np.var(values, ddof=1)) if len(values) > 1 else float("nan")


def rq1(params, clusters, notes=None):
    """Variance ratios per non-singleton cluster and numeric parameter (the paper's RQ1).

    ratio = var(parameter in cluster) / var(parameter over all images of non-singleton clusters),
    with the n-1 estimator, 1 when the denominator is 0. `params`: DataFrame with column 'image'
    and one column per parameter; `clusters`: DataFrame image, cluster. Images without a params
    row and non-numeric columns are left out, with a line in `notes` (a list) for each.
    Returns one row per (cluster, parameter).
    """
    notes = [] if notes is None else notes
    for frame, what in ((params, "params"), (clusters, "clusters")):
        if "image" not in frame.columns:
            raise HUDDError(f"{what} table needs a column 'image' (path relative to DataSets/)")
    if "cluster" not in clusters.columns:
        raise HUDDError("clusters table needs a column 'cluster'")
    params = params.assign(image=params["image"].astype(str)).drop_duplicates("image").set_index("image")
    numeric = {}
    for column in params.columns:
        values = pd.to_numeric(params[column], errors="coerce")
        given = params[column].notna() & (params[column].astype(str).str.strip() != "")
        if (values.isna() & given).any() or values.notna().sum() == 0:
            notes.append(f"parameter {column!r} is not numeric; left out of RQ1")
            continue
        numeric[column] = values
    sizes = clusters.groupby("cluster")["image"].transform("size")
    members = clusters[sizes > 1].copy()
    members["image"] = members["image"].astype(str)
    missing = ~members["image"].isin(params.index)
    if missing.any():
        notes.append(f"params.csv has no row for {int(missing.sum())} of {len(members)} clustered error images "
                     f"(e.g. {members.loc[missing, 'image'].iloc[0]}); they are left out of RQ1")
    members = members[~missing]
    rows = []
    for column, values in numeric.items():
        per_image = values.reindex(members["image"]).to_numpy()
        known = ~np.isnan(per_image)
        overall = _variance(per_image[known])
        if not np.isfinite(overall):
            continue
        for cluster, group in members.assign(value=per_image)[known].groupby("cluster"):
            v = group["value"].to_numpy()
            if len(v) < 2:
                continue
            var = _variance(v)
            ratio = 1.0 if not overall else var / overall
            rows.append({"cluster": int(cluster), "size": int((clusters["cluster"] == cluster).sum()),
                         "parameter": column, "ratio": ratio, "reduction": 1.0 - ratio, "n": len(v),
                         "mean": v.mean(), "min": v.min(), "max": v.max(), "variance": var,
                         "median": float(np.median(v)), "std": float(np.std(v, ddof=1)),
                         "q1": float(np.percentile(v, 25)), "q3": float(np.percentile(v, 75))})
    return pd.DataFrame(rows, columns=["cluster", "size", "parameter", "ratio", "reduction", "n", "mean", "min",
                                       "max", "variance", "median", "std", "q1", "q3"])


def rq1_clusters(table, test_means=None):
    """One row per cluster: its smallest ratio, the parameter that gives it, explained or not, and that
    parameter's mean in the cluster against its mean over the whole test set (`test_means`: {parameter: mean})."""
    if table.empty:
        return pd.DataFrame(columns=["cluster", "size", "min_ratio", "best_parameter", "explained", "best_mean",
                                     "test_set_mean"])
    best = table.loc[table.groupby("cluster")["ratio"].idxmin()]
    wide = table.pivot(index="cluster", columns="parameter", values="ratio").add_prefix("ratio_")
    frame = pd.DataFrame({"cluster": best["cluster"].to_numpy(), "size": best["size"].to_numpy(),
                          "min_ratio": best["ratio"].to_numpy(), "best_parameter": best["parameter"].to_numpy(),
                          "explained": (best["ratio"] < RQ1_EXPLAINED_RATIO).to_numpy(),
                          "best_mean": best["mean"].to_numpy(),
                          "test_set_mean": [(test_means or {}).get(p, np.nan) for p in best["parameter"]]})
    return frame.merge(wide.reset_index(), on="cluster").sort_values("cluster").reset_index(drop=True)


def rq1_summary(table, clusters, per_cluster=IMAGES_INSPECTED_PER_CLUSTER):
    """The numbers the paper reports: clusters, % explained, and the share of error images inspected."""
    per = rq1_clusters(table)
    sizes = clusters.groupby("cluster").size()
    inspected = int(np.minimum(sizes, per_cluster).sum())
    n_errors = int(len(clusters))
    explained = int(per["explained"].sum())
    analysed = int(len(per))
    return {"clusters": int(len(sizes)), "clusters_nonsingleton": int((sizes > 1).sum()),
            "clusters_with_parameters": analysed, "explained": explained,
            "explained_percent": 100.0 * explained / analysed if analysed else float("nan"),
            "mean_min_reduction_pct": 100.0 * (1 - per["min_ratio"].mean()) if analysed else float("nan"),
            "mean_reduction_pct": 100.0 * (1 - table.groupby("parameter")["ratio"].mean().mean())
            if analysed else float("nan"),
            "error_images": n_errors, "inspected": inspected, "per_cluster": per_cluster,
            "inspected_percent": 100.0 * inspected / n_errors if n_errors else float("nan")}


def write_rq1(case_dir, images=None, labels=None, layer=None, per_cluster=IMAGES_INSPECTED_PER_CLUSTER,
              params=None):
    """CASE/RQ1.xlsx (sheets Clusters, Ratios, Summary) and CASE/RQ1.csv.

    The clusters are `images` with their `labels` when given, else T/ClusterAnalysis/<layer>/clusters.csv
    of `layer` (default: the selected layer of summary.csv). Returns the summary dict (see
    rq1_summary; format_rq1 makes it a console line), or None after printing why when
    DataSets/params.csv is absent. Notes on skipped rows or columns are printed and kept under 'notes'.
    """
    case_dir = Path(case_dir)
    params_path = case_dir / "DataSets" / "params.csv"
    if not params_path.is_file():
        print(f"RQ1 not available: {params_path} not found (it needs a column 'image', the path relative to "
              f"DataSets/, then one column per simulator parameter)")
        return None
    t_dir = case_dir / "T"
    if images is not None:
        if labels is None or len(labels) != len(images):
            raise HUDDError(f"RQ1: {len(images)} images but {None if labels is None else len(labels)} cluster labels")
        clusters = pd.DataFrame({"image": [str(i) for i in images], "cluster": np.asarray(labels).astype(int)})
        if layer is None and (t_dir / CLUSTER_ANALYSIS / "summary.csv").is_file():
            layer = best_layer_from_summary(t_dir)
    else:
        layer = layer or best_layer_from_summary(t_dir)
        clusters = read_clusters(t_dir, layer)
    params = read_params(params_path) if params is None else params
    notes = []
    table = rq1(params, clusters, notes)
    for note in notes:
        print(f"RQ1 note: {note}")
    test_rows = params[params["image"].astype(str).str.startswith("TestSet/")]
    per = rq1_clusters(table, {p: pd.to_numeric(test_rows[p], errors="coerce").mean() for p in set(table["parameter"])})
    summary = rq1_summary(table, clusters, per_cluster)
    summary.update({"layer": layer, "notes": notes})
    with atomic_path(case_dir / "RQ1.xlsx") as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            per.to_excel(writer, sheet_name="Clusters", index=False)
            table.to_excel(writer, sheet_name="Ratios", index=False)
            pd.DataFrame([{k: v for k, v in summary.items() if k != "notes"}]).to_excel(
                writer, sheet_name="Summary", index=False)
    write_csv(case_dir / "RQ1.csv", per)
    return summary


def read_params(params_path):
    """DataSets/params.csv as a DataFrame, or a HUDDError saying what is wrong with the file."""
    params = read_table(params_path, missing_hint="write one row per image (column 'image', then one column "
                                                  "per parameter) or remove it")
    if "image" not in params.columns:
        raise HUDDError(f"{params_path}: needs a column 'image' (path relative to DataSets/, e.g. "
                        f"TestSet/<class>/<file>)")
    return params


def format_rq1(summary):
    """The console lines for a write_rq1 summary."""
    if not summary:
        return "RQ1 not available (no DataSets/params.csv)"
    return (f"RQ1 ({summary['layer']}): {summary['clusters']} root-cause clusters "
            f"({summary['clusters_nonsingleton']} with 2+ images); {summary['explained']} of "
            f"{summary['clusters_with_parameters']} ({summary['explained_percent']:.1f}%) explained by a parameter "
            f"(variance ratio < {RQ1_EXPLAINED_RATIO}); inspecting {summary['per_cluster']} images per cluster "
            f"= {summary['inspected']} of {summary['error_images']} error images "
            f"({summary['inspected_percent']:.2f}%)")
