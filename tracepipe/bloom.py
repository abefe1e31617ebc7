"""Parquet split-block Bloom filters, read: whether a row group's filter on a text column rules a value out.
In: the file, its footer, a row group, a column, a value. Out: False only when the filter excludes the value (no
filter, or one of another layout: it may hold it). pyarrow writes these filters and reads none; the format is
the Parquet spec's BloomFilter.md (SBBF of 32-byte blocks, xxHash64 with seed 0 of the value's plain bytes)."""

from __future__ import annotations

from typing import BinaryIO

import pyarrow.parquet as pq

_MASK = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)
# the eight odd constants of the split-block filter: one bit of each 32-bit word of a block per value
_SALT = (0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D, 0x705495C7, 0x2DF1424B, 0x9EFC4947, 0x5C6BFB31)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    return _rotl((acc + lane * _P2) & _MASK, 31) * _P1 & _MASK


def xxhash64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` (once per value looked up: a pure-Python loop is fine for a path of ~100 bytes)."""
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed, (seed - _P1) & _MASK]
        while i + 32 <= n:
            for lane in range(4):
                v[lane] = _round(v[lane], int.from_bytes(data[i + 8 * lane : i + 8 * lane + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _MASK
        for lane in v:
            h = ((h ^ _round(0, lane)) * _P1 + _P4) & _MASK
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, int.from_bytes(data[i : i + 8], "little")), 27) * _P1 + _P4) & _MASK
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (int.from_bytes(data[i : i + 4], "little") * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        i += 4
    while i < n:
        h = _rotl(h ^ (data[i] * _P5 & _MASK), 11) * _P1 & _MASK
        i += 1
    h ^= h >> 33
    h = h * _P2 & _MASK
    h ^= h >> 29
    h = h * _P3 & _MASK
    return h ^ (h >> 32)


def _bitset(block: bytes) -> bytes | None:
    """The filter's bits after its Thrift header (BloomFilterHeader, compact protocol: field 1 numBytes, an i32
    as a zigzag varint, comes first); None for a header of another shape."""
    if len(block) < 2 or block[0] != 0x15:
        return None
    value, shift, at = 0, 0, 1
    while at < len(block):
        byte = block[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            break
        shift += 7
    size = (value >> 1) ^ -(value & 1)
    if size < 32 or size % 32 or size > len(block) - at:
        return None
    return block[len(block) - size :]  # (the header's other fields, then the bits: they end the block)


def excludes(handle: BinaryIO, footer: pq.FileMetaData, group: int, column: str, value: str) -> bool:
    """Whether row group `group`'s Bloom filter on `column` says it holds no `value` (`handle`: the file)."""
    leaves = [footer.schema.column(i).path for i in range(len(footer.schema))]
    if column not in leaves:
        return False
    chunk = footer.row_group(group).column(leaves.index(column))
    offset, length = chunk.bloom_filter_offset, chunk.bloom_filter_length
    if not offset or not length or offset < 0 or length <= 0 or length > 1 << 27:
        return False
    handle.seek(offset)
    bits = _bitset(handle.read(length))
    if bits is None:
        return False
    digest = xxhash64(value.encode())
    block = ((digest >> 32) * (len(bits) // 32)) >> 32
    key = digest & 0xFFFFFFFF
    for word, salt in enumerate(_SALT):
        at = block * 32 + word * 4
        if not int.from_bytes(bits[at : at + 4], "little") >> ((key * salt & 0xFFFFFFFF) >> 27) & 1:
            return True
    return False
