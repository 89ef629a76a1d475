"""TUN devices by hand: the ioctls of include/uapi/linux/if_tun.h."""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import ExistsError, ForeignDeviceError, LinkError

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_TUN_EXCL = 0x8000


def _setiff(name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def create(name: str) -> int:
    """Create a persistent layer-3 TUN device (IFF_TUN, IFF_NO_PI) and return its queue fd.

    Persistent: the device, its addresses and its routes outlive this process, so a restarted
    daemon takes them back with attach().
    """
    try:
        fd = _setiff(name, IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise ExistsError(f'add tunnel "{name}" failed: File exists') from e
        raise LinkError("create tun", name, e.errno) from e
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        os.close(fd)
        raise LinkError("persist tun", name, e.errno) from e
    os.set_blocking(fd, False)
    return fd


def attach(name: str) -> int:
    """Open a queue of an existing persistent TUN device."""
    try:
        fd = _setiff(name, IFF_TUN | IFF_NO_PI)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EBUSY, errno.EPERM):
            raise ForeignDeviceError(f"{name} exists and is not a TUN device tunl can open") from e
        raise LinkError("attach tun", name, e.errno) from e
    os.set_blocking(fd, False)
    return fd


def destroy(fd: int) -> None:
    """Clear persistence and close: the kernel removes the device."""
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)
