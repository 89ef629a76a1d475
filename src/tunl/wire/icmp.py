"""ICMP for IPv4 (RFC 792, RFC 1191): echo, destination unreachable, time exceeded."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from .checksum import inet_checksum
from .drop import Drop
from .ipv4 import IPV4_HLEN, PROTO_ICMP, IPv4Header

ECHO_REPLY, DEST_UNREACH, ECHO_REQUEST, TIME_EXCEEDED = 0, 3, 8, 11
# destination unreachable codes
NET_UNREACH, HOST_UNREACH, PROTO_UNREACH, PORT_UNREACH, FRAG_NEEDED = 0, 1, 2, 3, 4
TTL_EXCEEDED = 0

ICMP_HLEN = 8
# icmp_send(): an error quotes as much of the offending packet as fits in 576 bytes
MAX_ERROR_LEN = 576

HDR = struct.Struct("!BBHI")


@dataclass(frozen=True)
class IcmpMessage:
    type: int
    code: int
    rest: int = 0          # id<<16|seq for echo, next-hop MTU for frag needed
    data: bytes = b""      # echo payload, or the quoted packet of an error

    @property
    def ident(self) -> int:
        return self.rest >> 16

    @property
    def seq(self) -> int:
        return self.rest & 0xFFFF

    @property
    def mtu(self) -> int:
        return self.rest & 0xFFFF

    def build(self) -> bytes:
        buf = bytearray(HDR.pack(self.type, self.code, 0, self.rest) + self.data)
        buf[2:4] = inet_checksum(buf).to_bytes(2, "big")
        return bytes(buf)

    @classmethod
    def parse(cls, data) -> "IcmpMessage":
        if len(data) < ICMP_HLEN:
            raise ValueError("not a valid ICMP message: shorter than 8 bytes")
        if inet_checksum(data) != 0:
            raise ValueError("not a valid ICMP message: bad checksum")
        t, c, _, rest = HDR.unpack_from(data)
        return cls(t, c, rest, bytes(data[ICMP_HLEN:]))


def echo(type_: int, ident: int, seq: int, payload: bytes = b"") -> IcmpMessage:
    return IcmpMessage(type_, 0, (ident << 16) | seq, payload)


def quote(original) -> bytes:
    """The part of an offending packet an ICMP error carries (as icmp_send() sizes it)."""
    return bytes(original[:MAX_ERROR_LEN - IPV4_HLEN - ICMP_HLEN])


def dest_unreach(code: int, original, mtu: int = 0) -> IcmpMessage:
    """Destination unreachable; with FRAG_NEEDED, mtu is the next-hop MTU (RFC 1191)."""
    return IcmpMessage(DEST_UNREACH, code, mtu & 0xFFFF if code == FRAG_NEEDED else 0,
                       quote(original))


def time_exceeded(original) -> IcmpMessage:
    return IcmpMessage(TIME_EXCEEDED, TTL_EXCEEDED, 0, quote(original))


def error_packet(src, original, msg: IcmpMessage, ttl: int = 64) -> bytes:
    """A whole IPv4 packet carrying an ICMP error about `original` back to its source.

    TOS is the original's RT_TOS bits with internetwork control precedence, and DF is clear,
    as icmp_send() sends an error.
    """
    tos = (original[1] & 0x1E) | 0xC0
    return IPv4Header(IPv4Address(src), IPv4Address(bytes(original[12:16])), PROTO_ICMP,
                      ttl=ttl, tos=tos, flags_frag=0).build(msg.build())


def parse_error(data) -> tuple[IcmpMessage, bytes] | Drop:
    """An ICMP error's message and the quoted original packet, or why it is unusable."""
    try:
        msg = IcmpMessage.parse(data)
    except ValueError:
        return Drop.MALFORMED
    if msg.type not in (DEST_UNREACH, TIME_EXCEEDED) or len(msg.data) < IPV4_HLEN:
        return Drop.MALFORMED
    return msg, msg.data
