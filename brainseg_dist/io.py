"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``.

    Args:
        path: final destination.
        write: writes the complete file to the path it is given.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; use normal permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf become ``null``)."""
    return atomic_write_text(path, dumps_strict(obj, indent=2) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


# ----------------------------------------------------------------------------- strict JSON
def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars and arrays -> Python, paths -> str."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN/inf and never a bare ``NaN``.

    Args:
        obj: any mix of dicts, lists, numbers, strings, numpy values and paths.
        kwargs: passed to :func:`json.dumps` (e.g. ``indent``).

    Returns:
        Strict JSON text (readable by any JSON parser).
    """
    return json.dumps(json_safe(obj), allow_nan=False, default=str, **kwargs)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file, with one clear error line for a missing or damaged file.

    Args:
        path: the file.
        what: what the file is, for the message (e.g. ``"split file"``).

    Returns:
        The parsed value.

    Raises:
        BrainsegError: the file is missing, unreadable or not valid JSON (named).
    """
    from brainseg_dist.errors import BrainsegError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BrainsegError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BrainsegError(f"{path}: damaged {what} ({exc})") from None


def read_jsonl(path: str | Path, what: str = "JSON-lines file") -> list[Any]:
    """Parse one JSON value per non-blank line (e.g. ``metrics.jsonl``).

    Raises:
        BrainsegError: the file is missing or unreadable, or a line is not valid JSON (the
            file and line number are named).
    """
    from brainseg_dist.errors import BrainsegError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise BrainsegError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrainsegError(f"{path}: unreadable {what} ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise BrainsegError(f"{path}: damaged {what}: line {number} is not valid JSON "
                                f"({exc.msg})") from None
    return rows


# ----------------------------------------------------------------------------- folders
def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any work.

    Args:
        folder: the folder outputs will go to.
        what: what the folder is, for the message (e.g. ``"--out"``).

    Returns:
        The folder.

    Raises:
        BrainsegError: the folder is a file, cannot be created, or is not writable.
    """
    from brainseg_dist.errors import BrainsegError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BrainsegError(f"{folder}: {what} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BrainsegError(f"{folder}: {what} cannot be written ({exc.strerror or exc})"
                            ) from None
    return folder


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover of :func:`atomic_write` (``.NAME.XXXX.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_temporaries(folder: str | Path, older_than: float = 0.0) -> list[Path]:
    """Delete the temporary files and staging folders that a killed process left behind.

    Only names made by :func:`atomic_write` (``.NAME.XXXX.tmp``) and by staged outputs
    (``.NAME.XXXX.tmp`` folders) are touched, anywhere below ``folder``.

    Args:
        folder: e.g. a run directory.
        older_than: only those last modified at least this many seconds ago (for folders
            that another live process may be writing to, such as a shared cache).

    Returns:
        The paths removed.
    """
    import shutil
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for p in sorted(folder.rglob(".*.tmp")):
        try:
            if not is_temporary(p) or now - p.lstat().st_mtime < older_than:
                continue
        except OSError:  # removed meanwhile
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
