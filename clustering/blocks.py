"""Row blocks and progress bars shared by the passes over (N, N) matrices: working a block of rows at a
time bounds each pass's temporary arrays, whatever the number of error images."""

BLOCK_ROWS = 1024                   # rows of an (N, N) matrix held in float64 at a time


def progress_bar(iterable, total, desc, enabled):
    """`iterable` under a tqdm bar when `enabled` (tqdm is imported only then)."""
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False)


def spans(n, size):
    """[(start, end), ...] covering 0..n in steps of `size`."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]
