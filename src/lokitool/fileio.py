"""Atomic writes: an interrupted run never leaves a half file where a good one stood."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed and check that files can be created in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create directory {path}: {err.strerror}; choose another location") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"directory {path} is not writable; choose another location")
    return path


def check_output_file(path: Path) -> Path:
    """Fail early (before hours of work) if `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name such as {path / 'calibration.safetensors'}")
    ensure_writable_dir(path.parent if str(path.parent) else Path("."))
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a result file should read like any other
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Append rows to a CSV with these columns (header first if new), rewriting it atomically.
    Refuses a file whose header names other columns, rather than mixing layouts."""
    import csv
    import io

    path = Path(path)
    old = path.read_text() if path.exists() else ""
    header = old.splitlines()[0] if old else ""
    if header and header.split(",") != list(columns):
        raise UserError(f"{path} has other columns than this version writes; move it away or choose another --output-path")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, old + buf.getvalue())
