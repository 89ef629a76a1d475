"""Raw IPv4 sockets: one to send whole packets (IP_HDRINCL), one per protocol to receive."""
from __future__ import annotations

import socket

SO_BINDTODEVICE = 25
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
IP_FREEBIND = 15


def sender(dev: str | None = None, local: str | None = None) -> socket.socket:
    """IPPROTO_RAW implies IP_HDRINCL: the kernel sends our header as it is, filling in only
    a zero source address, a zero IP ID and the header checksum (raw_send_hdrinc()).

    The kernel routes a raw send by the socket's own address, not the header's: a tunnel with
    a `local` binds its socket to it, so that source-based rules (`ip rule add from LOCAL`)
    route its outer packets as they route the kernel's own tunnel (IP_FREEBIND: the address
    may come and go)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    if dev:
        s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, dev.encode())
    if local:
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        s.bind((local, 0))
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
