"""ECN across a tunnel, as include/net/inet_ecn.h does it (RFC 6040)."""
from ..wire.ipv4 import fix_checksum

NOT_ECT, ECT_1, ECT_0, CE = 0, 1, 2, 3
MASK = 3


def encapsulate(outer_tos: int, inner_tos: int) -> int:
    """INET_ECN_encapsulate(): copy the inner ECN field, but never CE (it becomes ECT(0))."""
    inner = inner_tos & MASK
    return (outer_tos & ~MASK) | (ECT_0 if inner == CE else inner)


# results of decapsulate()
OK, OK_LOG, DROP = 0, 1, 2


def decapsulate(outer_tos: int, inner_tos: int) -> tuple[int, bool]:
    """__INET_ECN_decapsulate(): (verdict, set inner CE).

    A not-ECT inner packet under an outer CE is dropped (RFC 6040 §4.2); under ECT(0|1) it is
    accepted and the kernel logs it. Otherwise an outer CE marks the inner packet CE, and an
    outer ECT(1) turns an inner ECT(0) into ECT(1) (see set_ect1_ipv4()).
    """
    outer = outer_tos & MASK
    if inner_tos & MASK == NOT_ECT:
        if outer == NOT_ECT:
            return OK, False
        return (DROP if outer == CE else OK_LOG), False
    return OK, outer == CE


def _set(buf, off: int, codepoint: int) -> None:
    if buf[off] >> 4 == 6:           # traffic class straddles bytes 0 and 1; no checksum
        buf[off + 1] = (buf[off + 1] & ~(MASK << 4)) | (codepoint << 4)
        return
    buf[off + 1] = (buf[off + 1] & ~MASK) | codepoint
    fix_checksum(buf, off)


def set_ce(buf, off: int) -> None:
    """IP_ECN_set_ce() / IP6_ECN_set_ce(): mark the inner packet at buf[off:] CE (an IPv4
    header gets its checksum fixed)."""
    _set(buf, off, CE)


def set_ect1(buf, off: int) -> None:
    """IP_ECN_set_ect1() / IP6_ECN_set_ect1(): an ECT(0) packet becomes ECT(1) (RFC 6040 §4.2,
    under an outer ECT(1)); any other codepoint is left alone."""
    tos = buf[off + 1] if buf[off] >> 4 == 4 else ((buf[off] & 0x0F) << 4) | (buf[off + 1] >> 4)
    if tos & MASK == ECT_0:
        _set(buf, off, ECT_1)
