"""Process-wide memory settings for hhdata's large runs, applied for their duration only.

A release build allocates and frees hundreds of arrays of 100-500 MB (columns of text,
shingle hashes). With pyarrow's default mimalloc pool and numpy asking the kernel for
transparent huge pages, the kernel spends seconds faulting in and zeroing fresh pages
(measured in bench/release_build.md). Inside ``large_run()`` Arrow's default pool is
hhdata._arrow.ARROW_POOL (jemalloc, which reuses freed pages), numpy does not advise huge
pages, and, where the C library is glibc, its malloc serves every block from its heap
(none mapped on its own, which glibc does from 32 MiB at most) and keeps up to 256 MiB of
freed memory at the top of the heap for reuse instead of handing it back at once (glibc's
defaults made a near stage's temporary arrays, hundreds of MB each, be faulted in and
zeroed again and again: bench/scale.md, "Where the system time went").
All are performance hints only: no result depends on them. The previous settings come
back when the last concurrent large run ends, and what malloc kept is handed back then
(and by ``give_back``, which the near stage and hhdata.pipeline call where their working
set shrinks). Entry points enter it once: ``hhdata build``, ``hhdata dedup`` and
hhdata.pipeline.build_release; the stages below do not.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np
import pyarrow as pa

from hhdata._arrow import ARROW_POOL

_lock = threading.Lock()
_depth = 0
_saved: tuple = ()


def _set_hugepage(enabled: bool) -> bool | None:
    """numpy's huge-page advice (a private switch, absent in some versions): the old value."""
    switch = getattr(
        getattr(getattr(np, "_core", None), "multiarray", None), "_set_madvise_hugepage", None
    )
    return switch(enabled) if switch is not None else None


# glibc's mallopt parameters, and their defaults (mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_SETTINGS = (128 * 1024, 128 * 1024, 65536)
# inside a large run (mmap threshold, trim threshold, most mapped blocks): no block is
# mapped on its own, so a freed array's memory stays in the heap for the next one instead
# of being unmapped, mapped and zeroed again (at most 32 MiB could be set as a threshold,
# and the near stage's arrays are hundreds of MB); the heap's free top is handed back past
# 256 MiB. Measured at 850k dense pairs (bench/scale.md): 13% less wall time, a third less
# system time, 4.5% more peak memory than mapping blocks from 32 MiB up
_LARGE_SETTINGS = (32 << 20, 256 << 20, 0)
# map_large_blocks: blocks from 32 MiB up mapped on their own again (glibc's largest
# automatic threshold); at 10x HH size the heap's free memory raised the peak by 0.6 GB
_BOUNDED_SETTINGS = (32 << 20, 256 << 20, _DEFAULT_SETTINGS[2])


@functools.cache
def _glibc():
    """The process's glibc (the symbols the running program sees), or None elsewhere."""
    import ctypes  # here: `hhdata --help` need not load it

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def _set_malloc(mmap: int, trim: int, mapped: int) -> bool:
    """Set glibc malloc's mmap and trim thresholds and its most mapped blocks (mallopt);
    False where not glibc or refused."""
    libc = _glibc()
    if libc is None:
        return False
    return all(
        libc.mallopt(parameter, value)
        for parameter, value in (
            (_M_MMAP_THRESHOLD, mmap),
            (_M_TRIM_THRESHOLD, trim),
            (_M_MMAP_MAX, mapped),
        )
    )


def map_large_blocks() -> None:
    """For the rest of the current large run, let malloc map blocks of 32 MiB or more on
    their own and unmap them when freed, as before large_run: slower (each is faulted in
    afresh) but what is freed leaves at once. For runs whose peak memory matters more
    than their speed (hhdata.dedup.NearStream.bounded_rows); large_run's end resets it."""
    with _lock:
        if _depth:
            _set_malloc(*_BOUNDED_SETTINGS)


def give_back() -> None:
    """Hand the free memory malloc keeps back to the system (glibc's malloc_trim): called
    where a large run's working set shrinks, so what one stage freed does not sit under
    the next one's peak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def large_run():
    """Use allocator settings that suit hhdata's large arrays while the block runs."""
    global _depth, _saved

    with _lock:
        if _depth == 0:
            _saved = (pa.default_memory_pool(), _set_hugepage(False))
            pa.set_memory_pool(ARROW_POOL)
            _set_malloc(*_LARGE_SETTINGS)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                pool, hugepage = _saved
                pa.set_memory_pool(pool)
                if hugepage is not None:
                    _set_hugepage(hugepage)
                # glibc's own thresholds move with use; once set they stay put, so the
                # defaults are set back as fixed values
                _set_malloc(*_DEFAULT_SETTINGS)
                give_back()
