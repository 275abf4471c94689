"""Writing output files so that an interrupted write (Ctrl-C, SIGTERM, a full disk) never leaves a half-written
file under the real name: each file is written beside its target and renamed onto it (``os.replace`` is atomic
on one file system), so a reader sees the old file or the new one, never a mix. Used by checkpoint saving
(``loader.save_model``, the trainer) and by ``blockdiff quantize``."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress


@contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path``; write the file there. On success it replaces ``path``; on any
    error or interruption the temporary file is removed and ``path`` is left as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)
