"""What `tunl lab demo` prints of captured ipip, gre and sit packets; the capture filter; the
ping plan. No root. Packets are built by scapy, as an independent encoder, where it can."""
from __future__ import annotations

import io
import shutil
import subprocess
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from scapy.all import GRE, ICMP, IP, UDP, ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_RS, \
    IPv6, raw

from tunl.lab import demo, pcap, topology
from tunl.lab.dissect import dissect, show_address

A, B = "172.16.232.172", "172.16.232.194"


def gre4(key=None, seq=None, csum=False, inner=None, **kw) -> bytes:
    g = GRE(key_present=key is not None, key=key, seqnum_present=seq is not None,
            sequence_number=seq, chksum_present=csum, **kw)
    if inner is None:
        inner = IP(src="10.50.1.1", dst="10.50.1.2") / ICMP(type=8, id=7, seq=1) / (b"x" * 56)
    return raw(IP(src=A, dst=B) / g / inner)


def sit(inner) -> bytes:
    return raw(IP(src="172.16.165.33", dst="172.16.165.244", proto=41) / inner)


ECHO6 = IPv6(src="fd00:50:1::1", dst="fd00:50:1::2") / ICMPv6EchoRequest(id=9, seq=2,
                                                                         data=b"y" * 56)


# -- one line per packet -----------------------------------------------------------------------

def test_gre_with_key_and_ipv4_inside():
    assert dissect(gre4(key=1)).line == (
        f"{A} > {B} proto 47 (gre, key 1): 10.50.1.1 > 10.50.1.2 ICMP echo request, id 7, seq 1")
    assert dissect(gre4(key=1)).tunnel == "gre"


def test_gre_with_key_seq_csum_and_ipv6_inside():
    d = dissect(gre4(key=2, seq=5, csum=True, inner=ECHO6))
    assert d.line == (f"{A} > {B} proto 47 (gre, key 2, seq 5, csum ok): fd00:50:1::1 >"
                      " fd00:50:1::2 ICMPv6 echo request, id 9, seq 2")
    # no options at all: just "gre"; key 0 is a key
    assert f"{B} proto 47 (gre): 10.50.1.1" in dissect(gre4()).line
    assert "(gre, key 0)" in dissect(gre4(key=0)).line
    reply = IPv6(src="fd00:50:1::2", dst="fd00:50:1::1") / ICMPv6EchoReply(id=9, seq=2)
    assert dissect(gre4(seq=4294967295, inner=reply)).line.endswith(
        "(gre, seq 4294967295): fd00:50:1::2 > fd00:50:1::1 ICMPv6 echo reply, id 9, seq 2")


def test_gre_bad_checksum_and_odd_headers():
    p = bytearray(gre4(key=2, seq=5, csum=True))
    p[-1] ^= 0xFF              # the payload changed after both checksums were made
    d = dissect(bytes(p))
    assert "(gre, key 2, seq 5, csum BAD)" in d.line
    assert "ICMP (not a valid ICMP message: bad checksum)" in d.line
    # routing bit (RFC 1701): the kernel refuses it, and so does the codec
    assert dissect(gre4(routing_present=1)).line == f"{A} > {B} proto 47 (gre): bad header" \
                                                    " (gre_flags)"
    # a header cut short
    short = raw(IP(src=A, dst=B, proto=47) / b"\x20\x00\x08\x00\x00")
    assert dissect(short).line == f"{A} > {B} proto 47 (gre): bad header (malformed)"
    # transparent Ethernet bridging: not IP inside
    teb = gre4(key=3, proto=0x6558, inner=b"\x02" * 30)
    assert dissect(teb).line == f"{A} > {B} proto 47 (gre, key 3): protocol type 0x6558, 30 bytes"


def test_sit():
    d = dissect(sit(ECHO6))
    assert d.line == ("172.16.165.33 > 172.16.165.244 proto 41 (sit): fd00:50:1::1 >"
                      " fd00:50:1::2 ICMPv6 echo request, id 9, seq 2")
    assert d.tunnel == "sit"
    # ISATAP addresses end in their IPv4 address, as the topology files write them
    rs = IPv6(src="fe80::5efe:172.16.1.2", dst="ff02::2") / ICMPv6ND_RS()
    assert dissect(sit(rs)).line.endswith(
        "(sit): fe80::5efe:172.16.1.2 > ff02::2 ICMPv6 router solicitation")
    udp = IPv6(src="2001:db8:a521::1", dst="2001:db8:a5f4::1") / UDP() / b"abc"
    assert dissect(sit(udp)).line.endswith(
        "2001:db8:a521::1 > 2001:db8:a5f4::1 next header 17 (udp), 11 bytes")
    bad = bytearray(sit(ECHO6))
    bad[-1] ^= 0xFF
    assert dissect(bytes(bad)).line.endswith("ICMPv6 (not a valid ICMPv6 message: bad checksum)")
    assert "(sit): inner (not a valid IPv6 packet" in dissect(sit(b"\x45" + b"\0" * 39)).line


def test_flows_tell_keys_and_directions_apart():
    flows = {dissect(gre4(key=1)).flow, dissect(gre4(key=2)).flow,
             dissect(gre4(key=1, inner=ECHO6)).flow, dissect(sit(ECHO6)).flow}
    assert len(flows) == 4
    # the same ping's next request is the same flow, whatever its seq numbers
    assert dissect(gre4(key=2, seq=0, csum=True)).flow == dissect(gre4(key=2, seq=9,
                                                                         csum=True)).flow


@pytest.mark.parametrize("text, shown", [
    ("2001:db8:5::5efe:172.16.1.2", "2001:db8:5::5efe:172.16.1.2"),
    ("fe80::5efe:ac10:101", "fe80::5efe:172.16.1.1"),
    ("2001:db8:5:0:200:5efe:192.0.2.1", "2001:db8:5:0:200:5efe:192.0.2.1"),
    ("::5efe:10.0.0.1", "::5efe:10.0.0.1"),
    ("fe80::5efe:10.0.0.1%isatap0", "fe80::5efe:10.0.0.1%isatap0"),
    ("0:0:1::5efe:1.2.3.4", "::1:0:0:5efe:1.2.3.4"),       # RFC 5952: the first of two runs
    ("2001:db8:a521::1", "2001:db8:a521::1"),
    ("::172.16.168.113", "::ac10:a871"),                    # v4-compatible: as Python says
    ("10.50.1.1", "10.50.1.1"),
])
def test_show_address(text, shown):
    assert show_address(ip_address(text)) == shown
    assert ip_address(shown) == ip_address(text)


# -- a capture of every kind -------------------------------------------------------------------

def _pcap(packets, tmp_path, name="c.pcap"):
    f = io.BytesIO()
    pcap.write(f, pcap.LINKTYPE_ETHERNET,
               [pcap.Record(100.0 + i * 0.25, pcap.ethernet(p), len(p) + 14)
                for i, p in enumerate(packets)])
    path = tmp_path / name
    path.write_bytes(f.getvalue())
    return path


def test_decode_capture_counts_every_tunnel_protocol(tmp_path):
    ipip = raw(IP(src=A, dst=B, proto=4) / IP(src="10.42.1.1", dst="10.42.2.1") / ICMP())
    plain = raw(IP(src=A, dst=B) / ICMP())
    packets = [gre4(key=1), gre4(key=2, seq=0, csum=True), sit(ECHO6), ipip, plain,
               gre4(key=1), gre4(key=2, seq=1, csum=True), sit(ECHO6)]
    lines = demo.decode_capture(str(_pcap(packets, tmp_path)))
    assert lines[0] == ("captured 8 IPv4 packets on br0, 7 of them tunnelled (ipip 1, gre 4,"
                        " sit 2); the first of each direction of each ping, decoded with"
                        " tunl.wire:")
    assert len(lines) == 1 + 5
    assert "(gre, key 2, seq 0, csum ok)" in lines[2] and lines[2].lstrip().startswith("0.2500")
    assert demo.decode_capture(str(_pcap(packets, tmp_path)), show=2)[-1] == "  ..."


def test_tunnelled_summary():
    assert demo.tunnelled_summary({}) == "0 of them tunnelled"
    assert demo.tunnelled_summary({"sit": 3, "ipip": 1}) == "4 of them tunnelled (ipip 1, sit 3)"


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_capture_filter_keeps_pings_and_leaves_out_multicast(tmp_path):
    """The filter, compiled by tcpdump and run over a file (no root needed)."""
    mld = IPv6(src="fe80::1", dst="ff02::16") / ICMPv6ND_RS()
    igmp = IP(src="10.50.1.1", dst="224.0.0.22", proto=2) / (b"\x22" + b"\0" * 7)
    keep = [gre4(key=1), gre4(key=2, seq=7, csum=True, inner=ECHO6), sit(ECHO6),
            raw(IP(src=A, dst=B, proto=4) / IP(src="10.42.1.1", dst="10.42.2.1") / ICMP()),
            raw(IP(src=A, dst=B) / UDP())]
    drop = [gre4(key=2, seq=7, csum=True, inner=mld), gre4(key=1, inner=igmp), gre4(inner=mld),
            sit(mld), raw(IP(src=A, dst=B, proto=4) / igmp),
            raw(IP(src=A, dst="224.0.0.1") / ICMP()), raw(IP(src=A, dst="255.255.255.255") / UDP())]
    packets = keep[:2] + drop[:4] + keep[2:] + drop[4:]
    src = _pcap(packets, tmp_path, "all.pcap")
    out = tmp_path / "kept.pcap"
    r = subprocess.run(["tcpdump", "-r", str(src), "-w", str(out), demo.CAPTURE_FILTER],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _, records = pcap.read(out)
    assert [bytes(pcap.ip_packet(pcap.LINKTYPE_ETHERNET, x.data)) for x in records] == keep


# -- what the demo pings -----------------------------------------------------------------------

def test_plan_pings_every_target_of_every_other_host():
    topo = topology.loads('''
name = "p"
[underlay]
cidr = "172.16.0.0/16"
[[host]]
name = "R"
address = "172.16.1.1/16"
ping_target = ["2001:db8:5::5efe:172.16.1.1", "2001:db8:99::1"]
[[host]]
name = "H"
address = "172.16.1.2/16"
ping_target = "2001:db8:5::5efe:ac10:102"
[[host]]
name = "X"
address = "172.16.1.3/16"
''')
    plan = [(a.name, b.name, target) for a, b, target in demo.plan(topo)]
    assert plan == [
        ("R", "H", "2001:db8:5::5efe:172.16.1.2"), ("R", "X", "172.16.1.3"),
        ("H", "R", "2001:db8:5::5efe:172.16.1.1"), ("H", "R", "2001:db8:99::1"),
        ("H", "X", "172.16.1.3"),
        ("X", "R", "2001:db8:5::5efe:172.16.1.1"), ("X", "R", "2001:db8:99::1"),
        ("X", "H", "2001:db8:5::5efe:172.16.1.2"),
    ]
    assert all(isinstance(ip_address(t), (IPv4Address, IPv6Address)) for _, _, t in plan)


# -- how an ICMP message crossed the wire (the cross-subnet demo) -------------------------------

def test_carried_plain_ipip_and_gre():
    from tunl.lab.dissect import Carried, carried
    echo = IP(src="10.42.1.1", dst="10.42.2.1") / ICMP(type=8, id=7, seq=1) / (b"x" * 56)
    gw1, gw2 = IPv4Address("10.42.1.1"), IPv4Address("10.42.2.1")
    assert carried(raw(echo)) == Carried(None, gw1, gw2, gw1, gw2, 8)
    ipip = raw(IP(src="172.16.1.2", dst="172.16.2.2") / echo)
    assert carried(ipip) == Carried("ipip", IPv4Address("172.16.1.2"), IPv4Address("172.16.2.2"),
                                    gw1, gw2, 8)
    assert carried(gre4(key=3, inner=echo)) == Carried("gre", IPv4Address(A), IPv4Address(B),
                                                       gw1, gw2, 8)
    # no ICMP over IPv4 inside: not carried
    assert carried(gre4(inner=ECHO6)) is None
    assert carried(sit(ECHO6)) is None
    assert carried(raw(IP(src=A, dst=B) / UDP(dport=53) / b"q")) is None
    assert carried(raw(IP(src=A, dst=B) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP())) is None
    assert carried(b"\x45\x00") is None
    frag = raw(IP(src=A, dst=B, flags="MF") / ICMP())
    assert carried(frag) is None
