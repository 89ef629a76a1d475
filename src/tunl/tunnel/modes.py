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
    if mode is TunnelMode.VTI:
        from . import vti
        return vti
    raise UnsupportedError(f"mode {mode.value}: not a mode of tunl")


CODEC_CLASS = {"ipip": "IpipCodec", "gre": "GreCodec", "sit": "SitCodec", "isatap": "SitCodec",
               "vti": "VtiCodec"}


def codec_for(spec, xfrm=None):
    """A fresh codec for a tunnel (it may keep state, like GRE's sequence numbers); a vti's
    works over its namespace's states and policies, `xfrm`."""
    cls = getattr(module_for(spec.mode), CODEC_CLASS[spec.mode.value])
    return cls(spec, xfrm) if spec.mode is TunnelMode.VTI else cls(spec)


def module_for_proto(proto: int) -> ModuleType:
    return module_for({4: TunnelMode.IPIP, 47: TunnelMode.GRE, 41: TunnelMode.SIT,
                       50: TunnelMode.VTI}[proto])
