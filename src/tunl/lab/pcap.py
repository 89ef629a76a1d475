"""A minimal reader (and writer, for tests) of classic pcap files, as `tcpdump -w` writes them.

File: a 24-byte global header (magic, version 2.4, thiszone, sigfigs, snaplen, link type), then
records of a 16-byte header (ts_sec, ts_usec or ts_nsec, incl_len, orig_len) and incl_len bytes.
The magic says the byte order and whether the fraction counts micro- or nanoseconds.
pcapng (what Wireshark writes by default) is not read.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

MAGIC_USEC = 0xA1B2C3D4
MAGIC_NSEC = 0xA1B23C4D
MAGIC_PCAPNG = 0x0A0D0D0A

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101          # raw IPv4/IPv6, e.g. tcpdump -i tunl0 of a kernel tunnel

ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = 0x8100     # 802.1Q: a 4-byte tag before the real ethertype

GLOBAL_HDR_LEN = 24
RECORD_HDR_LEN = 16


@dataclass(frozen=True)
class Record:
    ts: float               # seconds since the epoch
    data: bytes             # the captured bytes (at most snaplen)
    orig_len: int           # the length of the packet on the wire


class PcapReader:
    """Iterate the records of a classic pcap stream.

    A record cut short at the end of the file (a capture stopped mid-write) ends the iteration.
    """

    def __init__(self, stream: BinaryIO):
        self._f = stream
        head = stream.read(GLOBAL_HDR_LEN)
        if len(head) < GLOBAL_HDR_LEN:
            raise ValueError("not a pcap file: shorter than its 24-byte header")
        (magic,) = struct.unpack_from("<I", head)
        if magic in (MAGIC_USEC, MAGIC_NSEC):
            self._order = "<"
        else:
            (magic,) = struct.unpack_from(">I", head)
            if magic not in (MAGIC_USEC, MAGIC_NSEC):
                if magic == MAGIC_PCAPNG:
                    raise ValueError("a pcapng file: only classic pcap is read"
                                     " (tcpdump -w writes classic pcap)")
                raise ValueError(f"not a pcap file: magic {magic:#010x}")
            self._order = ">"
        self._div = 1e9 if magic == MAGIC_NSEC else 1e6
        (self.version_major, self.version_minor, _zone, _sigfigs, self.snaplen,
         linktype) = struct.unpack_from(self._order + "HHiIII", head, 4)
        # the upper bits of the link type field carry FCS information (pcap-linktype(7))
        self.linktype = linktype & 0x0FFFFFFF
        self._rec = struct.Struct(self._order + "IIII")

    def __iter__(self) -> Iterator[Record]:
        while True:
            head = self._f.read(RECORD_HDR_LEN)
            if len(head) < RECORD_HDR_LEN:
                return
            sec, frac, incl, orig = self._rec.unpack(head)
            data = self._f.read(incl)
            if len(data) < incl:
                return
            yield Record(sec + frac / self._div, data, orig)


def read(path) -> tuple[int, list[Record]]:
    """(link type, records) of a pcap file."""
    with open(path, "rb") as f:
        r = PcapReader(f)
        return r.linktype, list(r)


def ip_packet(linktype: int, frame: bytes) -> memoryview | None:
    """The IPv4 packet in a captured frame, or None if it holds something else."""
    v = memoryview(frame)
    if linktype == LINKTYPE_RAW:
        return v if len(v) and v[0] >> 4 == 4 else None
    if linktype != LINKTYPE_ETHERNET or len(v) < ETH_HLEN:
        return None
    off, ethertype = ETH_HLEN, (v[12] << 8) | v[13]
    if ethertype == ETHERTYPE_VLAN and len(v) >= ETH_HLEN + 4:
        off, ethertype = ETH_HLEN + 4, (v[16] << 8) | v[17]
    return v[off:] if ethertype == ETHERTYPE_IPV4 else None


def write(stream: BinaryIO, linktype: int, records: Iterable[Record],
          snaplen: int = 262144) -> None:
    """Write a classic pcap (microsecond, little-endian)."""
    stream.write(struct.pack("<IHHiIII", MAGIC_USEC, 2, 4, 0, 0, snaplen, linktype))
    for r in records:
        sec = int(r.ts)
        usec = min(999999, int(round((r.ts - sec) * 1e6)))
        stream.write(struct.pack("<IIII", sec, usec, len(r.data), r.orig_len))
        stream.write(r.data)


def ethernet(payload: bytes, ethertype: int = ETHERTYPE_IPV4,
             dst: bytes = b"\x02\0\0\0\0\x02", src: bytes = b"\x02\0\0\0\0\x01") -> bytes:
    """An Ethernet II frame around payload (for tests and synthetic captures)."""
    return dst + src + ethertype.to_bytes(2, "big") + payload
