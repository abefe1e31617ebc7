"""Which senders of NetFlow/IPFIX export datagrams are taken: `--allow` of `tracepipe collect` (checked on each
received batch) and of `tracepipe ingest netflow` (each capture's datagrams, by their source address). Whoever can
reach an exporter's port, or write into a capture, can plant datagrams under any sender address on the wire;
the routers' prefixes are what a site trusts."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import numpy as np

from tracepipe.errors import UsageError
from tracepipe.units import parse_network

OTHERS_TEXT = "(other senders)"  # where the senders past the first `limits.exporters` named are summed


class AllowList:
    """Sender CIDRs (IPv4 and IPv6) checked on whole batches: addresses as two big-endian uint64 halves of the
    16-byte form (IPv4 mapped into ::ffff:0:0/96), one mask-and-compare per network."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.cidrs = list(cidrs)
        self._nets: list[tuple[int, int, int, int]] = []  # (net_hi, net_lo, mask_hi, mask_lo)
        for cidr in cidrs:
            try:
                net = parse_network(cidr)
            except UsageError as exc:
                raise UsageError(f"--allow: {exc}") from None
            if net.version == 4:
                value = (0xFFFF << 32) | int(net.network_address)
                prefix = 96 + net.prefixlen
            else:
                value, prefix = int(net.network_address), net.prefixlen
            mask = ((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1)
            self._nets.append((value >> 64, value & (2**64 - 1), mask >> 64, mask & (2**64 - 1)))

    @property
    def accepts_all(self) -> bool:
        return not self._nets

    def allowed(self, addr16: np.ndarray) -> np.ndarray:
        """Boolean mask over an (n, 16) uint8 array of sender addresses."""
        if not self._nets:
            return np.ones(len(addr16), dtype=bool)
        halves = np.ascontiguousarray(addr16).view(">u8").reshape(-1, 2)
        hi, lo = halves[:, 0], halves[:, 1]
        mask = np.zeros(len(addr16), dtype=bool)
        for net_hi, net_lo, mask_hi, mask_lo in self._nets:
            mask |= ((hi & np.uint64(mask_hi)) == np.uint64(net_hi)) & (
                (lo & np.uint64(mask_lo)) == np.uint64(net_lo)
            )
        return mask

    def allows_text(self, senders: Sequence[str]) -> np.ndarray:
        """Boolean mask over sender addresses as text (a capture's exporters; few distinct per batch)."""
        if not self._nets:
            return np.ones(len(senders), dtype=bool)
        packed = np.zeros((len(senders), 16), np.uint8)
        for i, text in enumerate(senders):  # (per distinct sender, not per datagram: the caller's job)
            address = ipaddress.ip_address(text)
            if address.version == 4:
                address = ipaddress.IPv6Address((0xFFFF << 32) | int(address))
            packed[i] = np.frombuffer(address.packed, np.uint8)
        return self.allowed(packed)
