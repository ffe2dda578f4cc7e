"""Atomic writes: an interrupted run never leaves a half file where a good one stood.

Temporaries live in folders named `.NAME.<host>-<pid>.<random>.tmp` beside their target. A run
killed between the write and the rename (SIGKILL, power loss) leaves one behind; the next write
into the same folder from the same host removes every such leftover whose process is gone, so
they never pile up (the host keeps a run on another machine of a shared file system safe).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
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


_TEMP = re.compile(r"^\..+\.(?P<host>\w+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def _host() -> str:
    import socket

    return re.sub(r"\W", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files and folders (ours: `.NAME.<host>-<pid>.<random>.tmp`) left in `folder`
    by processes of this host that no longer run."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or match["host"] != _host() or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def temp_prefix(path: Path) -> str:
    """Prefix of our temporary names for `path` (see the module docstring)."""
    return f".{Path(path).name}.{_host()}-{os.getpid()}."


def normal_mode() -> int:
    """The mode a new file gets under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def disk_error(path: Path, err: OSError) -> UserError:
    """One line for a write that failed (a full disk, a quota, a permission)."""
    full = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno)
    fix = "free some space or choose another output location" if full else "choose another output location"
    return UserError(f"cannot write {path}: {full or err.strerror or err}; {fix} (the old file, if any, is intact)")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path for `path`; on success rename it over `path`, on failure delete it.

    The temporary path lies in a private folder `.NAME.<host>-<pid>.<random>.tmp` beside `path`, so that
    writers with temporaries of their own (safetensors writes `.tmpXXXXXX`, then renames) leave
    nothing loose in the target's folder if killed. The file ends with the umask's normal mode,
    whatever wrote it (safetensors makes its files 0600)."""
    path = Path(path)
    remove_stale_temps(path.parent)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp_path = folder / path.name
    try:
        yield tmp_path
        os.chmod(tmp_path, normal_mode())
        os.replace(tmp_path, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """Create and return a new empty file `folder/stem_<local time to the microsecond><suffix>`
    exclusively: two runs in the same second (or microsecond) never get the same name."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    for n in range(1000):
        path = Path(folder) / f"{stem}_{stamp}{'' if n == 0 else f'-{n}'}{suffix}"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, normal_mode())
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise UserError(f"cannot find a free name for {stem}_{stamp}{suffix} in {folder}; clean the folder")


def write_text_atomic(path: Path, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as err:
        raise disk_error(path, err) from err


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
