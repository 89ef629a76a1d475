"""What tunld remembers of its tunnels, where an ordinary command cannot reach it.

The device alias (`ip link show` prints it) is for people: anyone may change it with
`ip link set DEV alias …`, and anyone may create a TUN device and give it a "tunl:" alias. So
the record that says which devices are tunl's, and with which spec, is a root-only file per
network namespace: /run/tunl/netns-<cookie>/tunnels.json, each entry keyed by the device's
name and ifindex (a device deleted and made again by someone else has another ifindex), with
its data plane and its member set (the outer sources it takes packets from; none recorded:
from anyone), so that a tunld started after a crash enforces the set from its first packet.
The namespace is named by its cookie (SO_NETNS_COOKIE), which the kernel never reuses while it
runs, unlike the inode of /proc/self/ns/net.
"""
from __future__ import annotations

import json
import os
import socket
from ipaddress import IPv4Address

from ..errors import TunlError
from ..model import TunnelSpec

RUN_DIR = "/run/tunl"
SO_NETNS_COOKIE = 71     # include/uapi/asm-generic/socket.h (Linux 5.14)


def netns_id() -> str:
    """A name for this network namespace that no other namespace gets while the host runs."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            cookie = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                    "little")
            return f"netns-{cookie}"
        except OSError:            # an older kernel: the inode, reused after the namespace ends
            return f"netns-ino{os.stat('/proc/self/ns/net').st_ino}"


def state_dir() -> str:
    return os.path.join(RUN_DIR, netns_id())


class State:
    """name -> (ifindex, spec) of the tunnels tunld made in this namespace."""

    def __init__(self, directory: str | None = None):
        self.dir = directory or state_dir()
        self.path = os.path.join(self.dir, "tunnels.json")
        self.planes: dict[str, str] = {}    # name -> data plane, of the last load()
        # name -> member set, of the last load(); a tunnel without one takes from anyone
        self.members: dict[str, frozenset[IPv4Address]] = {}

    def load(self, move_bad: bool = True) -> dict[str, tuple[int, TunnelSpec]] | None:
        """The record; None when there is none (a damaged one is none, and moved aside to
        tunnels.json.bad unless move_bad is false)."""
        try:
            with open(self.path) as f:
                raw = json.load(f)
            entries = raw["tunnels"].items()
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            if move_bad:
                try:
                    os.replace(self.path, self.path + ".bad")
                except OSError:
                    pass
            return None
        out = {}
        for name, entry in entries:
            try:
                out[name] = (int(entry["ifindex"]), TunnelSpec.from_dict(entry["spec"]))
                if entry.get("dataplane") in ("ebpf", "userspace"):
                    self.planes[name] = entry["dataplane"]
            except (KeyError, TypeError, ValueError, TunlError):    # one bad entry: skip it
                continue
            if entry.get("members") is not None:
                self.members[name] = _members(entry["members"])
        return out

    def save(self, tunnels: dict[str, tuple[int, TunnelSpec]],
             planes: dict[str, str] | None = None,
             members: dict[str, frozenset[IPv4Address]] | None = None) -> None:
        """Write atomically (a new file renamed over the old one), readable by root only."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        planes = planes or {}
        members = members or {}
        data = {"tunnels": {name: {"ifindex": ifindex, "spec": spec.to_dict(),
                                   "dataplane": planes.get(name, "userspace"),
                                   "members": (sorted(str(a) for a in members[name])
                                               if members.get(name) is not None else None)}
                            for name, (ifindex, spec) in sorted(tunnels.items())}}
        tmp = self.path + f".{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)

    @property
    def xfrm_path(self) -> str:
        return os.path.join(self.dir, "xfrm.json")

    def load_xfrm(self) -> tuple[list[dict], list[dict]]:
        """The IPsec states and policies tunld keeps (as their to_dict()); none when the
        record is missing or damaged."""
        try:
            with open(self.xfrm_path) as f:
                raw = json.load(f)
            states, policies = raw["states"], raw["policies"]
            if isinstance(states, list) and isinstance(policies, list):
                return states, policies
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return [], []

    def save_xfrm(self, states: list[dict], policies: list[dict]) -> None:
        """Write atomically, readable by root only: the states carry their keys, as the
        kernel's xfrm keeps them (and `ip xfrm state` prints them)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        tmp = self.xfrm_path + f".{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"states": states, "policies": policies}, f, indent=1)
        os.replace(tmp, self.xfrm_path)

    def has_tunnels(self) -> bool | None:
        """Whether the record lists tunnels; None when there is no record to say."""
        record = self.load(move_bad=False)
        return None if record is None else bool(record)


def _members(raw) -> frozenset[IPv4Address]:
    """A recorded member set. A damaged one takes from no one: a restart must never open a
    tunnel to senders its set kept out (root fixes it with a new set)."""
    try:
        if isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            return frozenset(IPv4Address(a) for a in raw)
    except ValueError:
        pass
    return frozenset()
