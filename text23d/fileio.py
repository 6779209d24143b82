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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return str(path)
