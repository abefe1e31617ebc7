"""What a flow's TCP state means, defined once for every sensor: NetFlow flags, Zeek conn_state/history, argus.

Flow rows are one direction each (schema.FLOWS). Every reader turns its sensor's own state vocabulary into that
row's cumulative TCP flags, so that one rule, `failed_attempt`, tells a connection attempt that never completed
whatever the sensor was: SYN or RST seen from this side, ACK never. The sensor's own words stay in the row
(`conn_state`, `history`) for an investigator; detectors use the flags rule, so that NetFlow, Zeek and argus
inputs of the same traffic give the same verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # polars only when a detector asks for the rule: the flow readers import this module, and
    import polars as pl  # `ingest netflow` should not pay polars' ~0.15-0.3 s import (issue 17)

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
TCP = 6

# Zeek conn.log conn_state values (base/protocols/conn/main.zeek) that mean: the connection was never
# established. Their originator row gets flags for which failed_attempt() is true (see ZEEK_STATE_FLAGS);
# RSTRH and SHR (the originator's SYN was never seen) are judged by the flags the originator did send.
ZEEK_FAILED_STATES = ("S0", "REJ", "RSTOS0", "SH")

# Zeek history letters -> TCP flags of the packets they stand for. Upper case: the originator's packets, lower
# case: the responder's. Zeek only says "a packet with payload" (d), "a FIN" (f), "a RST" (r): every packet
# of the responder answers the originator and carries ACK (RFC 9293 3.10.7.1: a RST that answers a SYN
# acknowledges it), while the originator's own FIN or RST say nothing of an ACK (SH: SYN then FIN, never
# answered). Letters without a flag (c checksum, g gap, ^ direction flipped, ...) add none.
ZEEK_HISTORY_FLAGS = {
    "S": SYN,
    "H": SYN | ACK,
    "A": ACK,
    "D": ACK | PSH,
    "T": ACK | PSH,
    "W": ACK,
    "F": FIN,
    "R": RST,
    "I": FIN | RST,  # inconsistent packet (Zeek: "e.g. FIN+RST bits set")
    "Q": SYN,  # multi-flag packet: SYN+FIN or SYN+RST
    "s": SYN,  # a SYN without the ACK bit (Zeek's history: s/S alike; a responder's SYN is a simultaneous open)
    "h": SYN | ACK,
    "a": ACK,
    "d": ACK | PSH,
    "t": ACK | PSH,
    "w": ACK,
    "f": FIN | ACK,
    "r": RST | ACK,
    "i": FIN | RST | ACK,
    "q": SYN | ACK,
}

# When Zeek wrote no history (`-`): (originator flags, responder flags) that each conn_state implies.
ZEEK_STATE_FLAGS = {
    "S0": (SYN, 0),
    "S1": (SYN | ACK, SYN | ACK),
    "SF": (SYN | ACK | FIN, SYN | ACK | FIN),
    "REJ": (SYN, RST | ACK),
    "S2": (SYN | ACK | FIN, SYN | ACK),
    "S3": (SYN | ACK, SYN | ACK | FIN),
    "RSTO": (SYN | ACK | RST, SYN | ACK),
    "RSTR": (SYN | ACK, SYN | ACK | RST),
    "RSTOS0": (SYN | RST, 0),
    "RSTRH": (0, SYN | ACK | RST),
    "SH": (SYN | FIN, 0),
    "SHR": (0, SYN | ACK | FIN),
    "OTH": (0, 0),
}

# argus `ra` TCP flag letters (ra(1), `-Z b` state: "<source flags>_<destination flags>", e.g. S_RA, FSPA_FSPA,
# as the CTU-13 binetflow files carry them).
ARGUS_FLAG_LETTERS = {"F": FIN, "S": SYN, "R": RST, "P": PSH, "A": ACK, "U": URG, "E": ECE, "C": CWR}

# argus' own TCP states (ra(1) "State", without -Z): (source flags, destination flags) they imply.
# REQ: a connection request (SYN) went unanswered; ACC: it was answered (SYN-ACK) but not completed;
# CON/CLO/FIN: connected, closed, FIN seen; RST: reset after the handshake.
ARGUS_TCP_STATE_FLAGS = {
    "REQ": (SYN, 0),
    "ACC": (SYN, SYN | ACK),
    "CON": (SYN | ACK, SYN | ACK),
    "CLO": (SYN | ACK | FIN, SYN | ACK | FIN),
    "FIN": (SYN | ACK | FIN, SYN | ACK | FIN),
    "RST": (SYN | ACK | RST, SYN | ACK),
}


def failed_attempt(flags: pl.Expr | None = None, proto: pl.Expr | None = None) -> pl.Expr:
    """True for a TCP flow row whose side saw SYN or RST but never ACK: the handshake did not complete.
    The one definition detectors use (defaults: the FLOWS columns `tcp_flags` and `proto`)."""
    import polars as pl

    flags = (pl.col("tcp_flags") if flags is None else flags).fill_null(0).cast(pl.Int32)
    proto = pl.col("proto") if proto is None else proto
    return (proto == TCP) & ((flags & ACK) == 0) & ((flags & (SYN | RST)) != 0)


# The same rule for DuckDB SQL over `flows` (tcp_flags, proto as in schema.FLOWS).
FAILED_ATTEMPT_SQL = f"(proto = {TCP} AND (coalesce(tcp_flags, 0) & {ACK}) = 0 AND (coalesce(tcp_flags, 0) & {SYN | RST}) <> 0)"
