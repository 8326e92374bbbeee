"""Euclidean distances between the error images' heatmaps, the T/<Layer>HMDistance.npy that holds them,
and the original's XLSX view of it.

The matrix is built in blocks of |a|^2 + |b|^2 - 2ab so that it scales to tens of thousands of images;
pairs where that formula loses precision are recomputed from the rows.
"""
from pathlib import Path

import numpy as np

from clustering.blocks import BLOCK_ROWS, progress_bar, spans
from common.errors import HUDDError
from common.files import atomic_path

XLSX_MAX_COLUMNS = 16384            # Excel's column limit
EXACT_RECOMPUTE_RATIO = 1e-6        # d^2 below this share of |a|^2+|b|^2 is recomputed from the rows
FEATURE_CHUNK_BYTES = 1 << 30       # float64 working set for one feature chunk of all rows


def _as_rows(heatmaps, name="heatmaps"):
    array = heatmaps if isinstance(heatmaps, np.ndarray) else np.asarray(heatmaps)
    if array.ndim < 2 or array.shape[0] < 1:
        raise HUDDError(f"{name}: expected an array of shape (N, ...) with one heatmap per row, got shape "
                        f"{array.shape}; recompute the heatmaps (-step heatmaps)")
    if not np.issubdtype(array.dtype, np.floating):
        raise HUDDError(f"{name}: expected float16/float32/float64 heatmaps, got {array.dtype}; "
                        f"recompute the heatmaps (-step heatmaps)")
    return array.reshape(array.shape[0], -1)


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
    chunks = spans(f, chunk)
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
    panels = spans(n, block_rows)
    for r0, r1 in progress_bar(panels, len(panels), "distances", progress):
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
        for s0, s1 in spans(len(pick), 64):
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


def load_distances(path):
    path = Path(path)
    if not path.is_file():
        raise HUDDError(f"{path}: distance matrix not found; run the distances step first (-step distances)")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise HUDDError(f"{path}: not a readable .npy array ({exc}); rerun -step distances") from None


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
    blocks = spans(n, BLOCK_ROWS)
    declaration = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as book:
            for name, xml in _XLSX_PARTS.items():
                book.writestr(name, declaration + xml)
            with book.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as sheet:
                sheet.write(f'{declaration}<worksheet xmlns="{_XLSX_MAIN}"><sheetData><row r="1">{header}</row>'
                            .encode())
                for r0, r1 in progress_bar(blocks, len(blocks), Path(path).name, progress):
                    lines = []
                    for r, row in enumerate(np.asarray(distances[r0:r1], dtype=np.float64).tolist(), start=r0 + 2):
                        lines.append(f'<row r="{r}"><c><v>' + "</v></c><c><v>".join(map("{:.8g}".format, row))
                                     + "</v></c></row>")
                    sheet.write("".join(lines).encode())
                sheet.write(b"</sheetData></worksheet>")
    return Path(path)
