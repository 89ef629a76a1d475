"""Which codec module carries which mode."""
from __future__ import annotations

from types import ModuleType

from ..errors import UnsupportedError
from ..model import TunnelMode


def module_for(mode: TunnelMode) -> ModuleType:
    if mode is TunnelMode.IPIP:
        from . import ipip
        return ipip
    if mode is TunnelMode.GRE:
        from . import gre
        return gre
    if mode in (TunnelMode.SIT, TunnelMode.ISATAP):
        from . import sit
        return sit
    raise UnsupportedError(f"mode {mode.value}: a vti tunnel needs IPsec (xfrm), which the "
                           "userspace data plane does not carry")


CODEC_CLASS = {"ipip": "IpipCodec", "gre": "GreCodec", "sit": "SitCodec", "isatap": "SitCodec"}


def codec_for(spec):
    """A fresh codec for a tunnel (it may keep state, like GRE's sequence numbers)."""
    return getattr(module_for(spec.mode), CODEC_CLASS[spec.mode.value])(spec)


def module_for_proto(proto: int) -> ModuleType:
    return module_for({4: TunnelMode.IPIP, 47: TunnelMode.GRE, 41: TunnelMode.SIT}[proto])
