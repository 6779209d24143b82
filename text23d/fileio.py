"""Atomic file output: readers (a viewer, a sweep summary, a resumed run) never see half a file,
and a crash mid-write leaves the previous file in place."""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from text23d.errors import ConfigError, DiskFull


@contextlib.contextmanager
def atomic_output(path) -> Iterator[str]:
    """Yield a temp path beside `path` (same suffix, so writers pick the right format); it is
    renamed onto `path` on success and removed on failure."""
    stem, ext = os.path.splitext(os.path.abspath(path))
    tmp = f"{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 (writers wrap OSError: torch, imageio's ffmpeg)
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        full = disk_full(path, e, written or None)
        if full is None:
            raise
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return str(path)


def check_writable(folder, key: str) -> None:
    """Fail now, before any model is loaded, when `folder` cannot be made or written to (a path
    through a file, a read-only or pseudo file system, no permission, no space)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"text23d")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}={folder} cannot be written ({e.strerror or e}). Fix: pass a folder you can "
                          "write to, e.g. output_root=$HOME/text23d-outputs") from None


DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full(path, error: BaseException, needed: int | None) -> DiskFull | None:
    """A DiskFull error for a write to `path` that failed for lack of space (ENOSPC, a quota, a
    file-size limit), saying how much it needs and how much is free; None for other errors."""
    import shutil

    code = getattr(error, "errno", None)
    text = str(error)
    words = ("PytorchStreamWriter failed writing", "No space left", "File too large", "Disk quota exceeded")
    if code not in DISK_ERRNOS and not any(w in text for w in words):
        return None
    if code not in DISK_ERRNOS:  # a wrapped error (torch, ffmpeg): the errno it stands for
        code = errno.EFBIG if "File too large" in text else errno.EDQUOT if "quota" in text else errno.ENOSPC
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    need = f"about {_size(needed)}" if needed else "more space"
    return DiskFull(f"cannot write {path}: {os.strerror(code) if code else 'the disk is full'} (it needs {need}; "
                    f"{_size(free)} free in {folder}). Nothing already written was lost: the previous "
                    "file is intact and no temporary file is left. Fix: free space there (or move the run with "
                    "output_root=<a roomier disk>), then resume with text23d resume=<the run folder>")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"
