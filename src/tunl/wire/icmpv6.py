"""ICMPv6 (RFC 4443): echo, and the errors a tunnel sends (packet too big, unreachable)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv6Address

from .ipv6 import IPV6_HLEN, MIN_MTU, NH_ICMPV6, IPv6Header, pseudo_checksum

DEST_UNREACH, PACKET_TOO_BIG, TIME_EXCEEDED = 1, 2, 3
ECHO_REQUEST, ECHO_REPLY = 128, 129
ICMPV6_HLEN = 8
HDR = struct.Struct("!BBHI")


@dataclass(frozen=True)
class Icmpv6Message:
    type: int
    code: int
    rest: int = 0        # MTU for packet too big, id<<16|seq for echo
    data: bytes = b""

    @property
    def mtu(self) -> int:
        return self.rest

    def build(self, src: bytes, dst: bytes) -> bytes:
        body = bytearray(HDR.pack(self.type, self.code, 0, self.rest) + self.data)
        body[2:4] = pseudo_checksum(src, dst, NH_ICMPV6, body).to_bytes(2, "big")
        return bytes(body)

    @classmethod
    def parse(cls, data, src: bytes, dst: bytes) -> "Icmpv6Message":
        if len(data) < ICMPV6_HLEN:
            raise ValueError("not a valid ICMPv6 message: shorter than 8 bytes")
        if pseudo_checksum(src, dst, NH_ICMPV6, data) != 0:
            raise ValueError("not a valid ICMPv6 message: bad checksum")
        t, c, _, rest = HDR.unpack_from(data)
        return cls(t, c, rest, bytes(data[ICMPV6_HLEN:]))


def quote(original) -> bytes:
    """As much of the offending packet as keeps the error within the minimum MTU (§2.4 (c))."""
    return bytes(original[:MIN_MTU - IPV6_HLEN - ICMPV6_HLEN])


def packet_too_big(original, mtu: int) -> Icmpv6Message:
    return Icmpv6Message(PACKET_TOO_BIG, 0, mtu, quote(original))


def error_packet(src, original, msg: Icmpv6Message, hlim: int = 64) -> bytes:
    """A whole IPv6 packet carrying an ICMPv6 error about `original` back to its source."""
    s, d = IPv6Address(src).packed, bytes(original[8:24])
    return IPv6Header(IPv6Address(s), IPv6Address(d), NH_ICMPV6, hlim).build(msg.build(s, d))
