"""Atomic file output: readers (a viewer, a sweep summary, a resumed run) never see half a file,
and a crash mid-write leaves the previous file in place."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


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
        from text23d.faults import disk_full

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
    from text23d.errors import ConfigError

    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"text23d")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}={folder} cannot be written ({e.strerror or e}). Fix: pass a folder you can "
                          "write to, e.g. output_root=$HOME/text23d-outputs") from None
