"""What produced a result, and where results go: one provenance stamp and one results writer,
used by every command that writes results (eval, passkey, rank-report, bench, bench-e2e; a
calibration file stores the same versions in its header)."""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import Any

from . import __version__
from .fileio import disk_error, ensure_writable_dir, unique_path, write_json_atomic


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"lokitool": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def git_hash(short: bool = False) -> str | None:
    """The commit of the checkout lokitool runs from, or None outside a git checkout."""
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        done = subprocess.run(args, cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance() -> dict[str, Any]:
    """The stamp beside every number: {"versions": {...}, "git_hash": ..., "date": ...}."""
    return {"versions": versions(), "git_hash": git_hash(), "date": utc_now()}


def write_results(out_dir: Path, stem: str, document: dict[str, Any], *, keep_dated: bool = True) -> Path:
    """Write `document`, stamped with `provenance()`, atomically to OUT_DIR/STEM.json (the newest)
    and, with `keep_dated`, to OUT_DIR/STEM_<date>.json as well (kept; the name is created
    exclusively, so concurrent runs never share it). Returns the path that keeps this run: the dated
    one, or STEM.json without it. A failed write (a full disk) is one line; old files stay intact."""
    out_dir = ensure_writable_dir(out_dir)
    stamped = {**document, **provenance()}
    path = out_dir / f"{stem}.json"
    dated = unique_path(out_dir, stem, ".json") if keep_dated else None
    try:
        if dated is not None:
            write_json_atomic(dated, stamped)
        write_json_atomic(path, stamped)
    except BaseException as err:  # a full disk, Ctrl-C, SIGTERM: give back the reserved name
        if dated is not None and dated.exists() and dated.stat().st_size == 0:
            dated.unlink()
        if isinstance(err, OSError):
            raise disk_error(out_dir, err) from err
        raise
    return dated or path
