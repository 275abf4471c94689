"""Writing output files so that an interrupted write (Ctrl-C, SIGTERM, a full disk) never leaves a half-written
file under the real name: each file is written beside its target and renamed onto it (``os.replace`` is atomic
on one file system), so a reader sees the old file or the new one, never a mix. Used by checkpoint saving
(``loader.save_model``, the trainer), by ``blockdiff quantize``, and for the ``--out`` files of ``bench`` and
``sudoku`` (checked with ``check_writable`` before any work, written with ``write_output``)."""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager, suppress


_UMASK = os.umask(0o022)  # the process's umask, read once at import (os.umask can only read it by setting it)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside ``path``; write the file there. On success it replaces ``path``; on any
    error or interruption the temporary file is removed and ``path`` is left as it was. The new file gets the
    permissions of the file it replaces, else the umask's (``safetensors`` writes its files 0600: a checkpoint
    another account serves could not be read)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise


def _replace(tmp: str, path: str) -> None:
    if os.path.isfile(tmp):
        mode = os.stat(path).st_mode & 0o7777 if os.path.isfile(path) else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
    os.replace(tmp, path)


@contextmanager
def atomic_files():
    """Several files replaced together (a checkpoint's weights, config and trainer state): ``stage(path)`` gives
    the temporary name to write beside ``path``. When the block ends without error every file replaces its target,
    in the order staged, with SIGINT and SIGTERM held until the last is in place; on an error or an interruption
    while writing, the temporary files are removed and no target is touched. Replaced one by one, a Ctrl-C between
    two files left new weights beside an old config.json (or no config.json at all in a new folder)."""
    staged: list[tuple[str, str]] = []

    def stage(path: str) -> str:
        tmp = f"{path}.tmp{os.getpid()}"
        staged.append((tmp, path))
        return tmp

    try:
        yield stage
        with signals_held():
            for tmp, path in staged:
                _replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with suppress(OSError):
                os.remove(tmp)
        raise


@contextmanager
def signals_held(signals=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT and SIGTERM received inside the block are delivered when it ends, to the handlers in place before
    (main thread only: elsewhere, and for an ignored signal, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for s in signals:
        if signal.getsignal(s) not in (signal.SIG_IGN, None):
            previous[s] = signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def write_json(path: str, data, indent: int = 2) -> None:
    """``data`` as JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent)


def check_writable(path: str, flag: str = "--out") -> None:
    """Fail before any work (a model load, minutes of benchmark) when the output file ``path`` cannot be
    written; the ValueError names ``flag``. '-' (stdout) always passes."""
    if path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; name a file")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable (permission denied)")


def write_output(path: str, text: str, flag: str = "--out") -> None:
    """``text`` into the file ``path`` atomically; an I/O error (a full disk) is a ValueError naming ``flag``,
    and leaves no file behind. A path that exists and is not a regular file (/dev/stdout, a named pipe, a device)
    or a link (/dev/stdout is one) is written in place: renaming a file onto it would replace the device or
    the link itself."""
    try:
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it: {e.strerror or e}") from None
