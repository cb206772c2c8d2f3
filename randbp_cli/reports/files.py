"""Writing reports: never a half-written file, the umask honoured, a bad path refused before a long run."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import OutputError, ReportWriteError


def check_writable(path: str | Path) -> Path:
    """Fail early (before a long run) if the report cannot be written at `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output path {str(path)!r} is a directory: give a file name such as {path / 'report.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {str(path)!r}: permission denied; choose another -o/--output path")
    return path


def _final_mode(path: Path) -> int:
    """The permissions `path` gets: those of the file it replaces, else 0666 less the umask (what
    open() would give it; mkstemp's 0600 would hide a CI artifact from every other user)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temp path beside `path`; renames it onto `path` only if the block succeeds."""
    path = check_writable(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise ReportWriteError(f"cannot write {str(path)!r}: {err.strerror}") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _final_mode(path))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ReportWriteError(f"could not write {str(path)!r}: {err.strerror}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temp file beside `path`, then rename: never a half-written report."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_fallback(data: dict, kind: str) -> Path:
    """Save a report that could not be written where asked: `randbp-KIND-YYYYmmdd-HHMMSS.json` in the
    working directory (a free name: `-2`, `-3` … appended), so a finished run is never lost."""
    stem = f"randbp-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 100):
        path = Path(f"{stem}{'' if attempt == 1 else f'-{attempt}'}.json")
        if not path.exists():
            return write_json_atomic(path, data)
    raise ReportWriteError(f"no free file name {stem}-N.json in the working directory")


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2, default=_json_default)
