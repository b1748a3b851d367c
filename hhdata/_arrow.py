"""The floor every stage stands on: the Arrow memory pool and the hashing of numpy buffers.

Nothing here imports from hhdata, so any module may import it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def arrow_pool() -> pa.MemoryPool:
    """jemalloc, else the system allocator: the pool for hhdata's large Arrow buffers.

    pyarrow's default mimalloc pool spends seconds of kernel time zeroing transparent huge
    pages on Linux; jemalloc and malloc do not (measured: bench/read_validate_parse.md).
    """
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # pragma: no cover - a pyarrow built without jemalloc
        return pa.system_memory_pool()


ARROW_POOL = arrow_pool()


def splitmix64(values: np.ndarray, in_place: bool = False) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic); ``in_place``
    overwrites ``values`` (a uint64 array) instead of copying it."""
    z = values if in_place else values.astype(np.uint64, copy=True)
    shifted = np.empty_like(z)
    with np.errstate(over="ignore"):
        for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
            np.right_shift(z, np.uint64(shift), out=shifted)
            np.bitwise_xor(z, shifted, out=z)
            if multiplier is not None:
                np.multiply(z, np.uint64(multiplier), out=z)
    return z
