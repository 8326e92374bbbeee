"""Atomic writes and cheap fingerprints, so that a killed run never leaves half a file."""
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path, frame, **kwargs):
    """Write a DataFrame as CSV atomically, with '\\n' line ends and no index unless asked."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, lineterminator="\n", **kwargs)


def write_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def save_torch(path, obj):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_fingerprint(path):
    """Size and modification time: enough to notice a replaced file without reading it."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def content_hash(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def json_digest(obj):
    """sha256 of a JSON-able object (keys sorted): the identity of a step's or a repetition's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_fingerprint(root, exclude=(), exclude_names=()):
    """One hash over the relative path, size and mtime of every file below `root` but those in `exclude`
    (relative paths) and those named in `exclude_names` (at any depth)."""
    root = Path(root)
    digest = hashlib.sha256()
    if root.exists():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if rel in exclude or name in exclude_names:
                    continue
                digest.update(f"{rel}\0{file_fingerprint(full)}\n".encode())
    return digest.hexdigest()
