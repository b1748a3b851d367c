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


def string_buffers(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's bytes as numpy, without copying them: (offsets, data), int64 offsets
    and uint8 data, text i being ``data[offsets[i]:offsets[i + 1]]``.

    >>> offsets, data = string_buffers(pa.array(["ab", "", "c"]).slice(1))
    >>> offsets.tolist(), bytes(data[offsets[0] : offsets[-1]])
    ([2, 2, 3], b'c')
    """
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise TypeError(f"string_buffers needs a string array, not {texts.type}")
    width = np.int64 if pa.types.is_large_string(texts.type) else np.int32
    _, offsets_buffer, data_buffer = texts.buffers()
    if offsets_buffer is None:  # an empty array may have no buffers at all
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(offsets_buffer, dtype=width)[
        texts.offset : texts.offset + len(texts) + 1
    ]
    data = (
        np.frombuffer(data_buffer, dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, dtype=np.uint8)
    )
    return offsets.astype(np.int64), data


def utf8_chars_at(data: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """The characters whose UTF-8 encodings start at the byte positions ``lead`` of ``data``
    (valid UTF-8, as Arrow's strings are), each as its bytes read as one big-endian integer
    (int64): equal characters, equal integers; hhdata._arrow.code_points decodes them.

    >>> data = np.frombuffer("aé€😀".encode(), dtype=np.uint8)
    >>> [hex(c) for c in utf8_chars_at(data, np.array([0, 1, 3, 6]))]
    ['0x61', '0xc3a9', '0xe282ac', '0xf09f9880']
    """
    # four bytes from each lead by one gather from a strided view with a window at every
    # byte (the last three bytes' windows from a copy padded with zeros), then cut to the
    # character's length, which its first byte gives
    tail_start = max(len(data) - 3, 0)
    tail = np.concatenate([data[tail_start:], np.zeros(3, dtype=np.uint8)])
    packed = np.empty(len(lead), dtype=np.int64)
    inside = lead < tail_start
    packed[inside] = _windows(data)[lead[inside]]
    packed[~inside] = _windows(tail)[lead[~inside] - tail_start]
    first = packed >> 24
    return packed >> np.where(
        first < 0x80, 24, np.where(first < 0xE0, 16, np.where(first < 0xF0, 8, 0))
    )


def code_points(chars: np.ndarray) -> np.ndarray:
    """The code points of characters given as utf8_chars_at gives them.

    >>> code_points(np.array([0x61, 0xC3A9, 0xE282AC, 0xF09F9880])).tolist()
    [97, 233, 8364, 128512]
    """
    b0, b1, b2, b3 = (chars >> shift & 0xFF for shift in (24, 16, 8, 0))
    return np.where(
        chars < 0x80,
        chars,
        np.where(
            chars < 0x10000,
            ((chars >> 8 & 0x1F) << 6) | (chars & 0x3F),
            np.where(
                chars < 0x1000000,
                ((chars >> 16 & 0x0F) << 12) | ((chars >> 8 & 0x3F) << 6) | (chars & 0x3F),
                ((b0 & 0x07) << 18) | ((b1 & 0x3F) << 12) | ((b2 & 0x3F) << 6) | (b3 & 0x3F),
            ),
        ),
    )


def _windows(data: np.ndarray) -> np.ndarray:
    """Big-endian uint32 windows of four bytes starting at each byte of ``data`` but the last
    three (a view: nothing is copied)."""
    return np.ndarray((max(len(data) - 3, 0),), ">u4", np.ascontiguousarray(data), 0, (1,))


# seeds of the two hashes text_hashes makes (any two distinct values)
_HASH_SEEDS = (0x5EED_0001, 0x5EED_0002)


def text_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each text's bytes (uint64 arrays): equal texts have
    equal hashes in any array; two different texts have both equal with probability 2**-128.

    XXH3 with two seeds, by polars (``Series.hash``: its values may change between polars
    versions, so they identify texts within one process only). A null has a hash of its own.
    ``texts``: an Arrow string array, or a polars String Series made from one.
    """
    import polars as pl  # a dependency of hhdata, imported only by the stages that hash texts

    series = texts if isinstance(texts, pl.Series) else pl.Series(texts)
    first, second = (series.hash(seed).to_numpy() for seed in _HASH_SEEDS)
    return np.array(first, dtype=np.uint64), np.array(second, dtype=np.uint64)
