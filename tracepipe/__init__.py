"""tracepipe: NetFlow and cloud VM lifecycle records in a Parquet lake, for incident response."""

__version__ = "0.1.0"
