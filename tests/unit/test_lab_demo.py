"""The lab's pure parts: pcap reading, packet description, ping output. No root."""
from __future__ import annotations

import io
import struct

import pytest

from tunl.lab import demo, pcap
from tunl.wire import icmp, ipv4

REQ = ipv4.build("10.42.1.1", "10.42.2.1", ipv4.PROTO_ICMP,
                 icmp.echo(icmp.ECHO_REQUEST, 3460, 1, b"x" * 56).build())
REP = ipv4.build("10.42.2.1", "10.42.1.1", ipv4.PROTO_ICMP,
                 icmp.echo(icmp.ECHO_REPLY, 3460, 1, b"x" * 56).build())
OUTER_REQ = ipv4.build("172.16.232.172", "172.16.232.194", ipv4.PROTO_IPIP, REQ)
OUTER_REP = ipv4.build("172.16.232.194", "172.16.232.172", ipv4.PROTO_IPIP, REP)


def capture(frames, linktype=pcap.LINKTYPE_ETHERNET) -> bytes:
    f = io.BytesIO()
    pcap.write(f, linktype, [pcap.Record(1000.0 + i * 0.25, fr, len(fr))
                             for i, fr in enumerate(frames)])
    return f.getvalue()


# -- pcap ------------------------------------------------------------------------------------

def test_pcap_round_trip():
    frames = [pcap.ethernet(OUTER_REQ), pcap.ethernet(OUTER_REP)]
    r = pcap.PcapReader(io.BytesIO(capture(frames)))
    assert r.linktype == pcap.LINKTYPE_ETHERNET
    recs = list(r)
    assert [x.data for x in recs] == frames
    assert [x.ts for x in recs] == [1000.0, 1000.25]
    assert bytes(pcap.ip_packet(r.linktype, recs[0].data)) == OUTER_REQ


def test_pcap_big_endian_nanoseconds():
    frame = pcap.ethernet(OUTER_REQ)
    data = struct.pack(">IHHiIII", pcap.MAGIC_NSEC, 2, 4, 0, 0, 65535, 1)
    data += struct.pack(">IIII", 7, 500_000_000, len(frame), len(frame)) + frame
    (rec,) = pcap.PcapReader(io.BytesIO(data))
    assert rec.ts == 7.5 and rec.data == frame


def test_pcap_truncated_record_ends_iteration():
    data = capture([pcap.ethernet(OUTER_REQ), pcap.ethernet(OUTER_REP)])
    assert len(list(pcap.PcapReader(io.BytesIO(data[:-10])))) == 1


@pytest.mark.parametrize("head, why", [
    (b"\x00" * 10, "shorter than its 24-byte header"),
    (struct.pack("<I", 0x0A0D0D0A) + b"\0" * 20, "pcapng"),
    (b"\x12\x34\x56\x78" + b"\0" * 20, "magic"),
])
def test_pcap_rejects(head, why):
    with pytest.raises(ValueError, match=why):
        pcap.PcapReader(io.BytesIO(head))


def test_ip_packet_by_link_type():
    assert pcap.ip_packet(pcap.LINKTYPE_ETHERNET, pcap.ethernet(b"arp", 0x0806)) is None
    assert pcap.ip_packet(pcap.LINKTYPE_ETHERNET, b"short") is None
    vlan = pcap.ethernet(b"\x00\x05\x08\x00" + OUTER_REQ, pcap.ETHERTYPE_VLAN)
    assert bytes(pcap.ip_packet(pcap.LINKTYPE_ETHERNET, vlan)) == OUTER_REQ
    assert bytes(pcap.ip_packet(pcap.LINKTYPE_RAW, OUTER_REQ)) == OUTER_REQ
    assert pcap.ip_packet(113, OUTER_REQ) is None


# -- describing packets ------------------------------------------------------------------------

def test_describe_ipip():
    assert demo.describe(OUTER_REQ) == ("172.16.232.172 > 172.16.232.194 proto 4 (ipip): "
                                        "10.42.1.1 > 10.42.2.1 ICMP echo request, id 3460, seq 1")
    assert demo.describe(OUTER_REP).endswith(
        "10.42.2.1 > 10.42.1.1 ICMP echo reply, id 3460, seq 1")


def test_describe_plain_and_broken():
    assert demo.describe(REQ) == "10.42.1.1 > 10.42.2.1 proto 1: ICMP echo request, id 3460, seq 1"
    udp = ipv4.build("10.0.0.1", "10.0.0.2", 17, b"u" * 12)
    assert demo.describe(udp) == "10.0.0.1 > 10.0.0.2 proto 17 (udp), 12 bytes"
    assert "not a valid IPv4 packet" in demo.describe(b"\x45" + b"\0" * 10)
    broken_inner = ipv4.build("1.1.1.1", "2.2.2.2", ipv4.PROTO_IPIP, b"\x45" + b"\0" * 19)
    assert demo.describe(broken_inner).startswith("1.1.1.1 > 2.2.2.2 proto 4 (ipip): inner (")
    bad_icmp = bytearray(REQ)
    bad_icmp[-1] ^= 0xFF
    assert "ICMP (not a valid ICMP message: bad checksum)" in demo.describe(bytes(bad_icmp))
    frag = ipv4.build("1.1.1.1", "2.2.2.2", ipv4.PROTO_IPIP, REQ, flags_frag=ipv4.MF)
    assert demo.describe(frag) == "1.1.1.1 > 2.2.2.2 proto 4 fragment, offset 0"


def test_decode_capture_shows_one_packet_per_flow(tmp_path):
    frames = [pcap.ethernet(p) for p in (OUTER_REQ, OUTER_REP) * 3]
    frames.insert(1, pcap.ethernet(b"arp", 0x0806))
    path = tmp_path / "c.pcap"
    path.write_bytes(capture(frames))
    lines = demo.decode_capture(str(path))
    assert lines[0].startswith("captured 6 IPv4 packets on br0, 6 of them tunnelled (ipip 6);")
    assert len(lines) == 3
    assert "echo request" in lines[1] and "echo reply" in lines[2]
    assert demo.decode_capture(str(path), show=1)[-1] == "  ..."
    empty = tmp_path / "e.pcap"
    empty.write_bytes(capture([]))
    assert demo.decode_capture(str(empty)) == [
        "captured 0 IPv4 packets on br0, 0 of them tunnelled"]
    assert demo.decode_capture(str(tmp_path / "none.pcap"))[0].startswith("cannot read")


# -- ping --------------------------------------------------------------------------------------

PING_OK = """PING 10.42.2.1 (10.42.2.1) 56(84) bytes of data.
64 bytes from 10.42.2.1: icmp_seq=1 ttl=64 time=0.269 ms
64 bytes from 10.42.2.1: icmp_seq=2 ttl=64 time=0.303 ms

--- 10.42.2.1 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 1013ms
rtt min/avg/max/mdev = 0.269/0.286/0.303/0.017 ms
"""

PING_LOST = """PING 10.42.9.1 (10.42.9.1) 56(84) bytes of data.

--- 10.42.9.1 ping statistics ---
3 packets transmitted, 0 received, 100% packet loss, time 420ms
"""


def test_parse_ping():
    r = demo.parse_ping(PING_OK, 0)
    assert (r.ok, r.sent, r.received, r.rtt) == (True, 2, 2, (0.269, 0.286, 0.303))
    r = demo.parse_ping(PING_LOST, 1)
    assert (r.ok, r.sent, r.received, r.rtt, r.error) == (False, 3, 0, None, "no reply")
    r = demo.parse_ping("", 2, "ping: connect: Network is unreachable\n")
    assert r.error == "ping: connect: Network is unreachable"
    busybox = "3 packets transmitted, 3 packets received, 0% packet loss\n" \
              "round-trip min/avg/max = 0.1/0.2/0.3 ms\n"
    assert demo.parse_ping(busybox, 0).rtt == (0.1, 0.2, 0.3)


def test_ping_table():
    rows = [("A", "B", "10.42.2.1", demo.parse_ping(PING_OK, 0)),
            ("B", "A", "10.42.1.1", demo.parse_ping(PING_LOST, 1))]
    lines = demo.ping_table(rows)
    assert lines[0].split() == ["from", "to", "target", "recv", "rtt", "min/avg/max", "ms"]
    assert lines[1].split() == ["A", "B", "10.42.2.1", "2/2", "0.269/0.286/0.303"]
    assert lines[2].split()[:5] == ["B", "A", "10.42.1.1", "0/3", "FAILED:"]


# -- why NoRoute: the kernel's own multicast into a tunnel without remote -----------------------

# what sit2 of examples/sit.toml's host A showed (it forwards, so it joined ff02::2), trimmed
SNMP6_A_SIT2 = """\
Ip6InReceives                   \t0
Ip6OutRequests                  \t2
Ip6OutMcastPkts                 \t2
Ip6OutMcastOctets               \t152
Icmp6OutMsgs                    \t2
Icmp6OutRouterSolicits          \t0
Icmp6OutNeighborSolicits        \t0
Icmp6OutMLDv2Reports            \t2
Icmp6OutType143                 \t2
"""
IGMP6_A = """\
1    lo              ff020000000000000000000000000001     1 0000000C 0
2    eth0            ff0200000000000000000001ff000000     1 00000004 0
3    sit1            ff020000000000000000000000000002     1 00000004 0
3    sit1            ff020000000000000000000000000001     1 0000000C 0
4    sit2            ff020000000000000000000000000002     1 00000004 0
4    sit2            ff020000000000000000000000000001     1 0000000C 0
4    sit2            ff010000000000000000000000000001     1 00000008 0
"""
SIT2 = {"ifname": "sit2", "mode": "sit", "remote": "any", "local": "172.16.165.33",
        "stats": {"tx_errors": 2, "tx_carrier_errors": 2, "tx_drop": {"no_route": 2}}}


def test_parse_snmp6_and_reported_groups():
    snmp6 = demo.parse_snmp6(SNMP6_A_SIT2)
    assert snmp6["Ip6OutMcastPkts"] == 2 and snmp6["Icmp6OutMLDv2Reports"] == 2
    # ff02::1 and ff01::1 carry MAF_NOREPORT (0x08): the kernel never reports them
    assert demo.reported_groups(IGMP6_A, "sit2") == ["ff02::2"]
    assert demo.reported_groups(IGMP6_A, "eth0") == ["ff02::1:ff00:0"]
    assert demo.reported_groups(IGMP6_A, "sit9") == []
    assert demo.reported_groups("garbage\n4 sit2 zz 1 04 0\n", "sit2") == []


def test_explain_noroute_of_mld_reports():
    line = demo.explain_noroute(SIT2, demo.parse_snmp6(SNMP6_A_SIT2),
                                demo.reported_groups(IGMP6_A, "sit2"))
    assert line == ("NoRoute 2 on sit2: IPv6 multicast the kernel sent into sit2, 2 MLDv2"
                    " reports to ff02::16 (for group ff02::2): a tunnel without remote has no"
                    " IPv4 destination for it")


def test_explain_noroute_of_solicitations_other_multicast_and_the_rest():
    t = dict(SIT2, ifname="isatap0", stats={"tx_carrier_errors": 5})
    snmp6 = {"Ip6OutMcastPkts": 4, "Icmp6OutMLDv2Reports": 1, "Icmp6OutRouterSolicits": 2}
    assert demo.explain_noroute(t, snmp6, ["ff02::2", "ff05::2"]) == (
        "NoRoute 5 on isatap0: IPv6 multicast the kernel sent into isatap0, 1 MLDv2 report to"
        " ff02::16 (for groups ff02::2, ff05::2); 2 router solicitations to ff02::2; 1 other"
        " multicast packet: a tunnel without remote has no IPv4 destination for it; the other 1"
        " had no IPv4 destination or no route to it")


def test_explain_noroute_without_multicast_or_with_a_remote():
    assert demo.explain_noroute(dict(SIT2, stats={"tx_carrier_errors": 0}), {}, []) is None
    assert demo.explain_noroute(dict(SIT2, stats={}), {}, []) is None
    assert demo.explain_noroute(SIT2, {"Ip6OutMcastPkts": 0}, []) == (
        "NoRoute 2 on sit2: packets with no IPv4 destination (their next hop is no ::a.b.c.d,"
        " ISATAP or 6rd address) or no route to it")
    # a point-to-point tunnel carries multicast to its remote: NoRoute is the underlay's
    p2p = dict(SIT2, ifname="sit1", remote="172.16.165.244")
    assert demo.explain_noroute(p2p, demo.parse_snmp6(SNMP6_A_SIT2), ["ff02::2"]) == (
        "NoRoute 2 on sit1: no route to 172.16.165.244 when they were sent")


def test_noroute_lines_reads_the_hosts_files(monkeypatch):
    import json
    from tunl.lab import netns
    ran = []

    def sh(ns, command, timeout=None):
        ran.append((ns, command))
        tunnels = [dict(SIT2, ifname="sit1", remote="172.16.165.244",
                        stats={"tx_carrier_errors": 0}), SIT2]
        return netns.Result(("sh",), 0, json.dumps(tunnels), "")

    def run(argv, timeout=None, env=None):
        ran.append(tuple(argv))
        text = {"/proc/net/dev_snmp6/sit2": SNMP6_A_SIT2, "/proc/net/igmp6": IGMP6_A}[argv[-1]]
        return netns.Result(tuple(argv), 0, text, "")

    monkeypatch.setattr(netns, "sh", sh)
    monkeypatch.setattr(netns, "run", run)
    assert demo.noroute_lines("tl-sit-A") == [demo.explain_noroute(
        SIT2, demo.parse_snmp6(SNMP6_A_SIT2), ["ff02::2"])]
    assert ran[0] == ("tl-sit-A", "tunl -j -s tunnel show")
    assert ran[1] == ("ip", "netns", "exec", "tl-sit-A", "cat", "/proc/net/dev_snmp6/sit2")


def test_host_count_wording():
    assert demo._n(1, "host") == "1 host" and demo._n(3, "host") == "3 hosts"
    assert demo._n(2, "MLDv2 report to ff02::16", "MLDv2 reports to ff02::16") == \
        "2 MLDv2 reports to ff02::16"
