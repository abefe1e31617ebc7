"""Addresses held as integers (IPv4 uint32 in host order, IPv6 16 bytes in network order) -> the canonical
text the lake stores ("10.1.2.3", "2001:db8::1"), built once per distinct value and dictionary-encoded. The
NetFlow decoders format a batch's addresses with it, or hand them to the lake writer as integers, which keeps
a row group's addresses so until it writes them, then formats each distinct address once and orders IPv4
ones as text without comparing any text (issue 17)."""

from __future__ import annotations

import ipaddress
import socket

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_HALF_QUADS: list[pa.Array] = []  # "a.b" for every 16-bit value, built on first use

# Dotted quads compare as text octet by octet: "." and the end of the text sort before every digit, so of two
# octets whose texts differ, the one whose text comes first as a string decides ("1." < "10" < "100" < "2.").
# An address whose octets are replaced by their text rank among "0".."255" therefore orders as an integer as
# its text orders as a string.
_OCTET_RANK = np.argsort(np.argsort(np.array([str(octet) for octet in range(256)]))).astype(np.uint32)


def _quads(addresses: np.ndarray) -> pa.Array:
    """Text of each address: two 16-bit halves looked up in a table of the 65 536 "a.b" texts and joined (4x
    cheaper than formatting four octets)."""
    if not _HALF_QUADS:
        half = np.arange(1 << 16, dtype=np.uint32)
        _HALF_QUADS.append(
            pc.binary_join_element_wise(
                pc.cast(pa.array(half >> 8), pa.string()), pc.cast(pa.array(half & 0xFF), pa.string()), "."
            )
        )
    halves = _HALF_QUADS[0]
    return pc.binary_join_element_wise(
        halves.take(pa.array(addresses >> 16)), halves.take(pa.array(addresses & 0xFFFF)), "."
    )


def ipv4_text(values: np.ndarray) -> pa.DictionaryArray:
    """Dotted quads, dictionary-encoded: each distinct address formatted once, in order of first appearance."""
    encoded = pc.dictionary_encode(pa.array(values.astype(np.uint32, copy=False)))
    uniq = encoded.dictionary.to_numpy(zero_copy_only=False).astype(np.uint32)
    return pa.DictionaryArray.from_arrays(encoded.indices, _quads(uniq))


def _text_order_key(addresses: np.ndarray) -> np.ndarray:
    """Per address, a uint32 whose integer order is the order of the address texts as strings (a bijection)."""
    a = addresses.astype(np.uint32, copy=False)
    return (
        (_OCTET_RANK[a >> 24] << 24)
        | (_OCTET_RANK[(a >> 16) & 0xFF] << 16)
        | (_OCTET_RANK[(a >> 8) & 0xFF] << 8)
        | _OCTET_RANK[a & 0xFF]
    )


def ipv4_text_sorted(values: np.ndarray) -> pa.DictionaryArray:
    """As ipv4_text, its dictionary in text order (ascending as strings compare, each address once): the dense
    rank of a row's address text is then its dictionary index, which the writer's sort uses instead of ranking
    text (issue 17: Arrow's rank of a row group's ~64 k address texts cost 11 ms; this, ~3 ms)."""
    encoded = pc.dictionary_encode(pa.array(values.astype(np.uint32, copy=False)))
    distinct = encoded.dictionary.to_numpy(zero_copy_only=False).astype(np.uint32, copy=False)
    order = np.argsort(_text_order_key(distinct))  # the key on the distinct addresses only
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    indices = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return pa.DictionaryArray.from_arrays(pa.array(indices), _quads(distinct[order]))


# Addresses of both families held as integers: IPv4 in `v4` (uint32) where `v6` is null, IPv6 in `v6` (16
# bytes, network order). A decoder hands a lake writer uint32 (IPv4 only) or this, never text to format twice.
ADDRESSES = pa.struct([pa.field("v4", pa.uint32()), pa.field("v6", pa.binary(16))])


def is_integers(type_: pa.DataType) -> bool:
    """Whether a text column's values are addresses held as integers (uint32 or ADDRESSES), not yet text."""
    return pa.types.is_uint32(type_) or type_ == ADDRESSES


_HEXTETS: list[pa.Array] = []  # the hex text of every 16-bit value, built on first use


def ipv6_texts(raw: np.ndarray) -> pa.Array:
    """IPv6 addresses as an (n, 16) uint8 array (network order) -> their text as Python 3.11's `ipaddress`
    prints it (RFC 5952: lower-case hex without leading zeros, the first longest run of two or more zero
    hextets as "::"; IPv4-mapped and -compatible ones in hex too, "::ffff:102:304"), vectorised: each hextet's
    text taken from a table of the 65 536, the run found with numpy, the pieces joined by Arrow. `ipaddress`
    per distinct address cost ~4.6 us each: 77% of an IPv6 capture's ingest (performance review, session 38)."""
    n = len(raw)
    if n == 0:
        return pa.array([], pa.string())
    if not _HEXTETS:
        _HEXTETS.append(pa.array([format(i, "x") for i in range(1 << 16)], pa.string()))
    table = _HEXTETS[0]
    hextets = (raw[:, 0::2].astype(np.uint32) << 8) | raw[:, 1::2]
    zero = hextets == 0
    run = np.zeros((n, 8), np.int8)  # length of the run of zero hextets ending at each hextet
    current = np.zeros(n, np.int8)
    for i in range(8):
        current = np.where(zero[:, i], current + 1, 0).astype(np.int8)
        run[:, i] = current
    longest = run.max(axis=1)
    end = run.argmax(axis=1)  # (the first longest run's last hextet)
    start = end - longest + 1
    compressed = longest >= 2  # (a lone zero hextet stays "0")
    # the run's first hextet becomes the "::" (joined with ":" around it), the others in the run are left out
    mark = np.where(start == 0, np.where(end == 7, "::", ":"), np.where(end == 7, ":", ""))
    nothing = pa.scalar(None, pa.string())
    pieces = []
    for i in range(8):
        text = table.take(pa.array(hextets[:, i]))
        first = compressed & (start == i)
        inside = compressed & (start < i) & (i <= end)
        if first.any():
            text = pc.if_else(pa.array(first), pa.array(mark), text)
        if inside.any():
            text = pc.if_else(pa.array(inside), nothing, text)
        pieces.append(text)
    return pc.binary_join_element_wise(*pieces, ":", null_handling="skip")


def ipv6_text(values: np.ndarray | pa.Array) -> pa.DictionaryArray:
    """IPv6 addresses (numpy V16 or Arrow binary(16), network order) -> canonical text (ipv6_texts),
    dictionary-encoded: each distinct address formatted once."""
    if isinstance(values, np.ndarray):
        raw = np.frombuffer(values.tobytes(), dtype=np.uint8).reshape(-1, 16).view("S16").ravel()
        values = pa.array(raw, pa.binary(16))
    encoded = pc.dictionary_encode(values)
    distinct = encoded.dictionary
    data = np.frombuffer(
        distinct.buffers()[1], np.uint8, count=16 * len(distinct), offset=16 * distinct.offset
    )
    return pa.DictionaryArray.from_arrays(encoded.indices, ipv6_texts(data.reshape(-1, 16)))


def canonical_texts(values: list[str]) -> tuple[list[str | None], list[int | None]]:
    """Address texts (any form `ipaddress` reads) -> (canonical text as the lake stores it, null where a
    value is no address; version). IPv6 ones are read by the C library (inet_pton) and formatted by
    ipv6_texts; `ipaddress` reads only the rest (IPv4, scoped or odd forms): ~10x cheaper per value."""
    texts: list[str | None] = [None] * len(values)
    versions: list[int | None] = [None] * len(values)
    packed = bytearray()
    six: list[int] = []
    for i, value in enumerate(values):
        if ":" in value:
            try:
                packed += socket.inet_pton(socket.AF_INET6, value)
                six.append(i)
                continue
            except (OSError, ValueError):
                pass
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            continue
        texts[i], versions[i] = str(address), address.version
    if six:
        formatted = ipv6_texts(np.frombuffer(bytes(packed), np.uint8).reshape(-1, 16)).to_pylist()
        for i, text in zip(six, formatted, strict=True):
            texts[i], versions[i] = text, 6
    return texts, versions


def addresses(v4: np.ndarray, v6: np.ndarray, is6: np.ndarray) -> pa.StructArray:
    """Per row an IPv4 address (uint32, `v4`) or, where `is6`, an IPv6 one (numpy V16, network order) as
    ADDRESSES."""
    n = len(is6)
    valid = None if is6.all() else pa.array(is6).buffers()[1]
    six = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16),
        n,
        [valid, pa.py_buffer(np.ascontiguousarray(v6).tobytes())],
        null_count=n - int(is6.sum()),
    )
    four = pa.array(np.where(is6, 0, v4).astype(np.uint32)) if len(v4) else pa.array(np.zeros(n, np.uint32))
    return pa.StructArray.from_arrays([four, six], fields=list(ADDRESSES))


def _as_addresses(column: pa.Array) -> pa.Array:
    """uint32 (IPv4) -> ADDRESSES; ADDRESSES as they are."""
    if column.type == ADDRESSES:
        return column
    v6 = pa.nulls(len(column), pa.binary(16))
    return pa.StructArray.from_arrays([column, v6], fields=list(ADDRESSES))


def address_text(column: pa.Array | pa.ChunkedArray, in_text_order: bool = False) -> tuple[pa.Array, bool]:
    """Addresses held as integers (is_integers) -> (their text, dictionary-encoded, each distinct address
    formatted once; whether the dictionary is in text order, as asked: IPv4 only, ipv4_text_sorted)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_uint32(column.type):
        values = column.to_numpy()
        return (ipv4_text_sorted(values), True) if in_text_order else (ipv4_text(values), False)
    v4 = column.field("v4").to_numpy(zero_copy_only=False)
    v6 = column.field("v6")
    is6 = v6.is_valid().to_numpy(zero_copy_only=False)
    if not is6.any():
        return address_text(pa.array(v4), in_text_order)
    four = ipv4_text(v4[~is6])
    six = ipv6_text(v6.filter(pa.array(is6)))
    indices = np.empty(len(column), dtype=np.int32)
    indices[~is6] = four.indices.to_numpy(zero_copy_only=False)
    indices[is6] = six.indices.to_numpy(zero_copy_only=False) + len(four.dictionary)
    dictionary = pa.concat_arrays([four.dictionary, six.dictionary])  # never equal: IPv6 text has colons
    return pa.DictionaryArray.from_arrays(pa.array(indices), dictionary), False


def one_type(chunks: list[pa.ChunkedArray]) -> list[pa.ChunkedArray]:
    """Chunks of one text column made one type: addresses held as integers of both kinds as ADDRESSES, and
    any mixed with text formatted (address_text)."""
    types = {c.type for c in chunks}
    if len(types) < 2:
        return chunks
    if all(is_integers(t) for t in types):
        return [pa.chunked_array([_as_addresses(a) for a in c.chunks], ADDRESSES) for c in chunks]
    return [pa.chunked_array([address_text(c)[0]]) if is_integers(c.type) else c for c in chunks]
