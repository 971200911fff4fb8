"""Crash-safe file writes and the run directory's report.json."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

from rayworld.storage import committed


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        committed(path)  # a run in object storage: the file becomes one whole object
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path, default=None):
    path = Path(path)
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def update_report(run_dir, **figures):
    """Merge figures into run_dir/report.json. `wall_s` dicts are merged key by key; a None
    removes the figure."""
    path = Path(run_dir) / "report.json"
    report = read_json(path, {})
    for key, value in figures.items():
        if value is None:
            report.pop(key, None)
        elif isinstance(value, dict) and isinstance(report.get(key), dict):
            report[key].update(value)
        else:
            report[key] = value
    atomic_write_json(path, report)
    return report


def progress(total: int, desc: str, unit: str = "ep"):
    """A tqdm bar; in a log file (no terminal) it updates every few seconds, not every item."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=tty,
                mininterval=0.2 if tty else 5.0)


def file_id(path) -> str:
    """A file's content id (SHA-1, 16 hex digits), hashed once per size and mtime."""
    st = os.stat(path)
    return _file_id(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_id(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]
