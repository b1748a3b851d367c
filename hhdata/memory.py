"""Process-wide memory settings for hhdata's large runs, applied for their duration only.

A release build allocates and frees hundreds of arrays of 100-500 MB (columns of text,
shingle hashes). With pyarrow's default mimalloc pool and numpy asking the kernel for
transparent huge pages, the kernel spends seconds faulting in and zeroing fresh pages
(measured in bench/release_build.md). Inside ``large_run()`` Arrow's default pool is
hhdata._arrow.ARROW_POOL (jemalloc, which reuses freed pages) and numpy does not advise huge
pages. Both are performance hints only: no result depends on them. The previous settings
come back when the last concurrent large run ends. Entry points enter it once: ``hhdata
build``, ``hhdata dedup`` and hhdata.pipeline.build_release; the stages below do not.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def large_run():
    """Use allocator settings that suit hhdata's large arrays while the block runs."""
    global _depth, _saved

    with _lock:
        if _depth == 0:
            _saved = (pa.default_memory_pool(), _set_hugepage(False))
            pa.set_memory_pool(ARROW_POOL)
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
