"""Lake files replaced by someone with write access to the lake (test scaffolding: not in the package)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def plant_retyped(listed: Path, column: str, text: str | None) -> int:
    """Replace a listed flow file by one whose `column` holds text (`text` with each row's number in place of
    {i}), or lacks it (None), padded to the size the log recorded (zeros before the footer, which Parquet
    readers never look at): only its footer tells. Returns the rows it holds (as many of the file's as fit)."""
    import struct

    import pyarrow.parquet as pq

    whole = pq.read_table(listed, partitioning=None)
    size = listed.stat().st_size
    scratch = listed.with_name("scratch.bin")
    for rows in (whole.num_rows, 100, 50, 20, 5):
        table = whole.slice(0, rows)
        if text is None:
            table = table.drop_columns([column])
        else:
            values = pa.array([text.format(i=i) for i in range(rows)], pa.string())
            table = table.set_column(table.schema.get_field_index(column), column, values)
        pq.write_table(
            table,
            scratch,
            compression="zstd",
            store_schema=False,
            use_dictionary=False,
            write_statistics=False,
        )
        data = scratch.read_bytes()
        scratch.unlink()
        if len(data) <= size:
            footer_at = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
            listed.write_bytes(data[:footer_at] + b"\0" * (size - len(data)) + data[footer_at:])
            return rows
    raise AssertionError("no planted file fits the logged size")
