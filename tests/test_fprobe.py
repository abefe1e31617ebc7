"""The real fprobe (NetFlow v1, v5, v7; live capture only): it captures on the loopback interface traffic this
test sends over 127.0.0.1 (UDP request/response, TCP connections to a local listener, an ICMP port-unreachable)
and exports to 127.0.0.1, where tcpdump and a real nfcapd receive. The lake must hold exactly nfdump's records.
The three probes run side by side on the same traffic (one capture and one nfcapd each), so the slow part —
fprobe's timers and its flush on SIGTERM — is paid once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import ingest_in_process, multiset_diff, with_ms_columns
from support import probes

VERSIONS = (1, 5, 7)
UDP_SIZES = (10, 200, 31, 1000, 64, 512)  # payload bytes of the client's datagrams; the server echoes each
TCP_CONNECTIONS = 3
TCP_REQUEST, TCP_RESPONSE = 300, 1500


@dataclass
class FprobeExport:
    version: int
    export_port: int
    export_pcap: Path
    nfcapd: probes.NfcapdRun


@dataclass
class Traffic:
    udp_port: int
    tcp_port: int
    closed_port: int
    udp_clients: list[int]


def send_loopback_traffic(udp_server: socket.socket, listener: socket.socket, closed_port: int) -> Traffic:
    """UDP request/response from two client sockets, TCP connections with data both ways, and one datagram to a
    closed port (the kernel answers ICMP port unreachable). All on 127.0.0.1."""
    udp_port, tcp_port = udp_server.getsockname()[1], listener.getsockname()[1]

    def serve_tcp() -> None:
        for _ in range(TCP_CONNECTIONS):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                received = 0
                while received < TCP_REQUEST:
                    received += len(conn.recv(65536))
                conn.sendall(b"r" * TCP_RESPONSE)

    server = threading.Thread(target=serve_tcp, daemon=True)
    server.start()
    clients = []
    for _ in range(2):
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind((probes.LOOPBACK_V4, 0))
        client.settimeout(5)
        clients.append(client)
    with contextlib.ExitStack() as stack:
        for client in clients:
            stack.enter_context(client)
        for size in UDP_SIZES:
            for client in clients:
                client.sendto(b"q" * size, (probes.LOOPBACK_V4, udp_port))
                data, peer = udp_server.recvfrom(65536)
                udp_server.sendto(data, peer)
                assert client.recv(65536) == data
        ports = [client.getsockname()[1] for client in clients]
        for _ in range(TCP_CONNECTIONS):
            with socket.create_connection((probes.LOOPBACK_V4, tcp_port), timeout=5) as conn:
                conn.sendall(b"s" * TCP_REQUEST)
                received = 0
                while received < TCP_RESPONSE:
                    received += len(conn.recv(65536))
        clients[0].sendto(b"nobody listens", (probes.LOOPBACK_V4, closed_port))
    server.join(timeout=5)
    return Traffic(udp_port, tcp_port, closed_port, ports)


@pytest.fixture(scope="module")
def fprobe_run(tmp_path_factory) -> tuple[dict[int, FprobeExport], Traffic]:
    base = tmp_path_factory.mktemp("fprobe")
    with contextlib.ExitStack() as sockets:
        udp_server = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp_server.bind((probes.LOOPBACK_V4, 0))
        listener = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind((probes.LOOPBACK_V4, 0))
        listener.listen(8)
        listener.settimeout(10)
        closed_port = probes.free_udp_port()
        udp_port, tcp_port = udp_server.getsockname()[1], listener.getsockname()[1]
        # the probes see only the test's own traffic, never the export datagrams (other ports) nor other tests'
        bpf = (
            f"(udp port {udp_port}) or (tcp port {tcp_port}) or (udp port {closed_port}) "
            f"or (icmp and icmp[30:2] = {closed_port})"
        )
        exports: dict[int, FprobeExport] = {}
        with contextlib.ExitStack() as stack:
            for version in VERSIONS:
                port = probes.free_udp_port()
                nfcapd = stack.enter_context(probes.nfcapd_receiving(port, base / f"nfcapd-v{version}"))
                capture = stack.enter_context(probes.capture_udp(port, base / f"fprobe-v{version}.pcap"))
                exports[version] = FprobeExport(version, port, capture.path, nfcapd)
            # long timers: no flow is cut in two by a slow machine; SIGTERM below exports them all
            runs = [
                stack.enter_context(
                    probes.fprobe_export(v, exports[v].export_port, bpf, idle_timeout=30, active_timeout=60)
                )
                for v in VERSIONS
            ]
            traffic = send_loopback_traffic(udp_server, listener, closed_port)
            # libpcap hands packets over in blocks (1 s timeout); after that, SIGTERM makes fprobe export its
            # whole flow cache and exit. All at once: each takes a few seconds to flush.
            time.sleep(1.5)
            for run in runs:
                run.request_stop()
    for export in exports.values():
        assert export.nfcapd.files, f"nfcapd wrote nothing for v{export.version}: {export.nfcapd.log_text}"
    return exports, traffic


def flows_between(table: pa.Table, proto: int, port: int) -> pa.Table:
    mask = pc.and_(
        pc.equal(table.column("proto"), proto),
        pc.or_(pc.equal(table.column("src_port"), port), pc.equal(table.column("dst_port"), port)),
    )
    return table.filter(mask)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_nfdump_sees_the_traffic_the_test_sent(version, fprobe_run):
    """The oracle: nfdump's records are the traffic the test made (so the comparison below is not vacuous)."""
    exports, traffic = fprobe_run
    records = probes.nfdump_records(exports[version].nfcapd.out_dir)
    udp = flows_between(records, 17, traffic.udp_port)
    requests = udp.filter(pc.equal(udp.column("dst_port"), traffic.udp_port))
    assert sorted(requests.column("src_port").to_pylist()) == sorted(traffic.udp_clients)
    assert requests.column("packets").to_pylist() == [len(UDP_SIZES)] * 2
    # IPv4 + UDP headers are counted, the link layer is not
    assert requests.column("bytes").to_pylist() == [sum(UDP_SIZES) + 28 * len(UDP_SIZES)] * 2
    assert udp.num_rows == 4  # two clients, both directions
    tcp = flows_between(records, 6, traffic.tcp_port)
    assert tcp.num_rows == 2 * TCP_CONNECTIONS
    for flags in tcp.column("tcp_flags").to_pylist():
        assert flags & 0x13 == 0x13, f"TCP flow without SYN+ACK+FIN: {flags:#x}"  # PSH is the kernel's choice
    icmp = records.filter(pc.equal(records.column("proto"), 1))
    # the kernel's port unreachable is type 3 code 3; nfdump keeps only the type (erratum E3, conftest.py)
    assert icmp.column("dst_port").to_pylist() == [3 * 256], "nfdump now keeps fprobe's ICMP code: drop E3"
    assert icmp.column("src_port").to_pylist() == [0]
    exported = set(records.column("src_port").to_pylist()) | set(records.column("dst_port").to_pylist())
    assert not exported & {e.export_port for e in exports.values()}, "the probe captured its own export"
    assert set(records.column("exporter").to_pylist()) == {probes.LOOPBACK_V4}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v}")
def test_lake_holds_exactly_what_nfdump_prints(version, fprobe_run, tmp_path):
    exports, _ = fprobe_run
    export = exports[version]
    expected = with_ms_columns(probes.nfdump_records(export.nfcapd.out_dir))
    assert probes.count_pcap_packets(export.export_pcap) > 0
    got = ingest_in_process([export.export_pcap], tmp_path / "lake")
    diff = multiset_diff(icmp_type_only(expected), icmp_type_only(got))
    assert not diff, f"fprobe v{version}: lake differs from nfdump\n{diff}"
    # what E3 hides from the comparison, checked against the packet itself: type 3 code 3, no source port
    icmp = got.filter(pc.equal(got.column("proto"), 1))
    assert icmp.select(["src_port", "dst_port"]).to_pylist() == [{"src_port": 0, "dst_port": 3 * 256 + 3}], (
        "fprobe sends the ICMP type in the source port and the code in the destination port; the lake must hold "
        "type*256+code in dst_port and 0 in src_port"
    )


def icmp_type_only(table: pa.Table) -> pa.Table:
    """ICMP dst_port reduced to type*256 (erratum E3: nfdump drops fprobe's ICMP code)."""
    is_icmp = pc.equal(table.column("proto"), 1)
    port = pc.cast(table.column("dst_port"), pa.int32())
    typed = pc.multiply(pc.divide(port, 256), 256)
    index = table.schema.get_field_index("dst_port")
    return table.set_column(
        index, pa.field("dst_port", pa.int32()), pc.cast(pc.if_else(is_icmp, typed, port), pa.int32())
    )
