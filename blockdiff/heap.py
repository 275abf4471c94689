"""glibc heap settings for CPU processes (no-ops where the C library has no ``mallopt``, e.g. musl, macOS).

glibc serves allocations below an adaptive threshold from its heap and raises that threshold after the first large
buffer is freed. Two effects on this engine, measured on the mid checkpoint at one thread (docs/benchmarks.md):

- while loading, temporaries and the tensors kept interleave in the heap and the freed holes stay resident
  (int8: 0.32x of fp32 instead of 0.28x), so loads run with a 128 KiB threshold: every large tensor gets its own
  mapping and goes back to the OS when freed;
- while denoising, the threshold left at 128 KiB maps and faults in every per-step buffer afresh (2x slower), and
  the adaptive default trims and re-faults the heap top now and then; fixed 32 MiB / 64 MiB thresholds (the
  adaptive rule's ceiling) made a step 7-20% faster than the default.
"""

from __future__ import annotations

import contextlib

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
LOAD_MMAP_THRESHOLD = 128 * 1024
RUN_MMAP_THRESHOLD, RUN_TRIM_THRESHOLD = 32 * 1024 * 1024, 64 * 1024 * 1024


def _libc():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    fn = getattr(_libc(), "mallopt", None)
    return bool(fn is not None and fn(param, value))


@contextlib.contextmanager
def lean_heap(device):
    """Around loading a model onto the CPU: large allocations mapped on their own while inside, the steady-state
    thresholds for the denoising loop afterwards (also when loading fails)."""
    cpu = torch.device(device).type == "cpu"
    if cpu:
        _mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if cpu:
            _mallopt(_M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
            _mallopt(_M_TRIM_THRESHOLD, RUN_TRIM_THRESHOLD)
            malloc_trim()


def malloc_trim() -> None:
    """Give the heap pages freed so far back to the OS (glibc keeps them otherwise)."""
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is not None:
        fn(0)
