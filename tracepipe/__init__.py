"""tracepipe: NetFlow and cloud VM lifecycle records in a Parquet lake, for incident response."""

__version__ = "0.1.0"
DEFAULT_LAKE = "./lake"  # the lake when neither --lake nor TRACEPIPE_LAKE names one (here: the CLI imports it
# without loading the lake module and its pyarrow, numpy and deltalake)
