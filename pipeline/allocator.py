"""The host allocator: glibc keeps what torch's CPU tensors free in its heap, and the process's RSS
with it. No library controls this (torch's CPU allocator has no cache to empty), so these call glibc."""

from __future__ import annotations

import ctypes


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation above `threshold` with its own mmap, returned to the system when
    freed. Its default threshold grows up to 32 MiB as large blocks are freed, after which each onloaded
    layer lands in the heap and stays in the process's RSS when released: measured on a 342 MiB model,
    sequential's peak anonymous RSS grew by ~270 MiB over one probe forward, and by ~5 MiB with this.
    No-op (False) off glibc."""
    libc = _glibc()
    M_MMAP_THRESHOLD = -3
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_heap() -> bool:
    """Give the freed pages in glibc's heap back to the system (`malloc_trim`): after each AutoRound block
    the anonymous RSS stayed 420 MiB above what it was before it on the 270M, 50 MiB with this
    (benchmarks/RESULTS.md, the memory plan against measured peaks). No-op (False) off glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
