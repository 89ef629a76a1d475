"""Raw IPv4 sockets: one to send whole packets (IP_HDRINCL), one per protocol to receive."""
from __future__ import annotations

import socket

SO_BINDTODEVICE = 25
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3


def sender(dev: str | None = None) -> socket.socket:
    """IPPROTO_RAW implies IP_HDRINCL: the kernel sends our header as it is, filling in only
    a zero source address, a zero IP ID and the header checksum (raw_send_hdrinc())."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    if dev:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, dev.encode())
    # the tunnel decides DF itself; the socket must not refuse or fragment on its own
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
    s.setblocking(False)
    return s


def receiver(proto: int) -> socket.socket:
    """Receives every packet of `proto` addressed to this namespace, outer header included.
    Because a raw socket takes them, the kernel sends no protocol unreachable."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)
    return s
