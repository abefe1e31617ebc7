"""schema.null_column (issue 17: null columns of the decode workers' tables without fresh zeroed memory)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tracepipe.schema import null_column


@pytest.mark.parametrize(
    "type_", [pa.dictionary(pa.int32(), pa.string()), pa.string(), pa.int64(), pa.timestamp("us", tz="UTC")]
)
def test_null_columns_of_any_length_are_all_null_and_share_one_buffer(type_: pa.DataType) -> None:
    small, large, small_again = null_column(3, type_), null_column(700_000, type_), null_column(5, type_)
    for column, length in ((small, 3), (large, 700_000), (small_again, 5)):
        assert column.type == type_ and len(column) == length and column.null_count == length
    assert small_again.buffers()[0].address == large.buffers()[0].address  # sliced, not allocated again
    table = pa.Table.from_arrays([small_again, pa.array(range(5))], names=["n", "i"])
    assert table.column("n").to_pylist() == [None] * 5
    assert null_column(0, type_).to_pylist() == []


def test_a_null_column_longer_than_the_kept_ones_is_made_for_the_call() -> None:
    column = null_column((1 << 21) + 1, pa.int16())
    assert len(column) == (1 << 21) + 1 and column.null_count == len(column)
