"""lake.sort_indices: the row order of every lake row group (flows by (src_addr, ts_start)), issue 17's faster
sort included: grouped by a radix sort of the first key's rank, then timsort; stable, as the reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tracepipe.lake import sort_indices


def _reference(table: pa.Table, keys: tuple[str, ...]) -> list[int]:
    """Python's stable sort: nulls last per key, text in code-point order (Arrow's and Parquet's)."""
    columns = [table.column(k).to_pylist() for k in keys]

    def key(i: int) -> tuple:
        return tuple((c[i] is None, c[i] if c[i] is not None else 0) for c in columns)

    return sorted(range(table.num_rows), key=key)


@pytest.mark.parametrize("distinct", [1, 300, 70_000])  # one group; < 2**16 ranks; > 2**16 ranks (two passes)
def test_flow_rows_sort_by_address_text_then_start_and_ties_keep_input_order(distinct: int) -> None:
    rng = np.random.default_rng(distinct)
    n = 120_000
    addresses = rng.integers(0, 2**32, distinct, dtype=np.uint64)
    text = [f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}" for a in addresses.tolist()]
    src = pa.array([text[i] for i in rng.integers(0, distinct, n).tolist()], pa.string())
    src = pa.compute.dictionary_encode(src)
    # few distinct times: many rows with equal (src_addr, ts_start), whose input order must stay
    start = pa.array(rng.integers(0, 50, n) * 1_000_000, pa.timestamp("us", tz="UTC"))
    table = pa.table({"src_addr": src, "ts_start": start, "row": np.arange(n)})
    order = sort_indices(table, ("src_addr", "ts_start")).to_pylist()
    assert order == _reference(table, ("src_addr", "ts_start"))
    # text order, not numeric: "10.x" sorts before "9.x"
    ordered = table.take(pa.array(order)).column("src_addr").to_pylist()
    assert ordered == sorted(ordered)


def test_nulls_sort_last_and_a_null_address_group_is_ordered_by_time() -> None:
    src = pa.array(["9.0.0.1", None, "10.0.0.1", None, "9.0.0.1"], pa.string())
    start = pa.array([5, 2, 7, 1, 3], pa.timestamp("us", tz="UTC"))
    table = pa.table({"src_addr": src, "ts_start": start})
    assert sort_indices(table, ("src_addr", "ts_start")).to_pylist() == [2, 4, 0, 3, 1]
