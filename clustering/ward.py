"""The Ward dendrogram's input and its cuts.

Ward runs on the rows of the row-max-normalised distance matrix, as the original did; their
pairwise distances are one blocked matrix product here rather than the original's O(N^3) loop.
A cut at k clusters is numbered exactly as scipy's fcluster numbers it, so the cluster ids of
every k agree with the original's.
"""
import numpy as np

from clustering.blocks import BLOCK_ROWS, progress_bar, spans

WARD_FLOAT64_MAX_N = 8192           # above this the N^3 Ward input product runs in float32


def row_maxima(D, block_rows):
    """Each row's largest |distance|: the divisor of the row-max normalisation Ward and WICD work on."""
    peak = np.empty(D.shape[0])
    for r0, r1 in spans(D.shape[0], block_rows):
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
    row_max = row_maxima(D, block_rows) if row_max is None else row_max
    work = np.dtype(np.float64 if (dtype == "auto" and n <= WARD_FLOAT64_MAX_N) else
                    (np.float32 if dtype == "auto" else dtype))
    panels = spans(n, block_rows)
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
    for r0, r1 in progress_bar(panels, len(panels), "Ward input", progress):
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


def condensed_rows(cond, n, r0, r1, column_base=None):
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


def cut_roots(Z, n, k):
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
    return _number_like_fcluster(Z, cut_roots(Z, n, k))
