"""What the mesh asks of netfilter on the kernel data plane, through the `nft` tool (one
transaction per change, so a rule set is never half there):

  members     table ip tunl_members: encapsulated packets of the overlay's protocol whose
              outer source is not a node of the overlay are dropped before the kernel's tunnel
              device decapsulates them, and counted by protocol (as Calico drops IPIP from
              hosts outside its pool; the kernel's tunl0 takes IPIP from anyone)
  masquerade  table ip tunl_masq: traffic from the overlay to the outside leaves with the
              node's address, as flannel's --ip-masq rules do

Only these two tables are tunl's; nothing else in the ruleset is read or changed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network

from ..errors import TunlError

MEMBERS = "tunl_members"
MASQ = "tunl_masq"
PROTOS = {"ipip": 4, "gre": 47, "sit": 41}      # the outer protocol of each mode
MULTICAST = "224.0.0.0/4"


class NftError(TunlError):
    """nft refused a change (the message is nft's)."""


def available() -> bool:
    return shutil.which("nft") is not None


def _nft(script: str, *args: str) -> str:
    nft = shutil.which("nft")
    if nft is None:
        raise NftError("nftables: no nft command on this host (apt install nftables)")
    r = subprocess.run([nft, *args, "-f", "-"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise NftError(f"nftables: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else r.returncode}")
    return r.stdout


def _list(table: str) -> list[dict] | None:
    nft = shutil.which("nft")
    if nft is None:
        return None
    r = subprocess.run([nft, "-j", "list", "table", "ip", table], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout).get("nftables", [])


def _elements(addrs) -> str:
    return ", ".join(str(a) for a in sorted(addrs))


def members_script(mode: str, addrs: frozenset[IPv4Address], exists: bool) -> str:
    """The transaction that makes the members table hold `addrs` (pure). The table is made
    once; later changes only refill the set, so the drop counters survive them."""
    lines = []
    if not exists:
        proto = PROTOS[mode]
        lines += [f"table ip {MEMBERS} {{",
                  "  set members { type ipv4_addr; }",
                  f"  counter not_member_{mode} {{ }}",
                  "  chain input {",
                  "    type filter hook input priority filter - 5; policy accept;",
                  f"    ip protocol {proto} ip saddr != @members counter name "
                  f"not_member_{mode} drop",
                  "  }", "}"]
    lines.append(f"flush set ip {MEMBERS} members")
    if addrs:
        lines.append(f"add element ip {MEMBERS} members {{ {_elements(addrs)} }}")
    return "\n".join(lines) + "\n"


def set_members(mode: str, addrs: frozenset[IPv4Address]) -> None:
    """Only `addrs` may send `mode`'s encapsulation to this host."""
    table = _list(MEMBERS)
    if table is not None and not any(f"not_member_{mode}" == o.get("counter", {}).get("name")
                                     for o in table):
        _nft(f"delete table ip {MEMBERS}\n")          # made for another mode: start again
        table = None
    _nft(members_script(mode, addrs, table is not None))


def members() -> dict | None:
    """{"members": [...], "dropped": {mode: packets}} of the members table, None without it."""
    table = _list(MEMBERS)
    if table is None:
        return None
    out: dict = {"members": [], "dropped": {}}
    for o in table:
        if "set" in o and o["set"].get("name") == "members":
            out["members"] = [str(e) for e in o["set"].get("elem", [])]
        c = o.get("counter")
        if c and c.get("name", "").startswith("not_member_"):
            out["dropped"][c["name"][len("not_member_"):]] = c.get("packets", 0)
    return out


def masquerade_script(network: IPv4Network, subnet: IPv4Network) -> str:
    """flannel's four masquerade rules (pure): within the overlay nothing is rewritten; from
    the overlay to the outside (not multicast) the source becomes the node's; from outside
    the overlay into it (but not into this node's own subnet) too."""
    n = str(network)
    return (f"table ip {MASQ}\ndelete table ip {MASQ}\n"
            f"table ip {MASQ} {{\n"
            "  chain postrouting {\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {n} ip daddr {n} return\n"
            f"    ip saddr {n} ip daddr != {MULTICAST} masquerade fully-random\n"
            f"    ip saddr != {n} ip daddr {subnet} return\n"
            f"    ip saddr != {n} ip daddr {n} masquerade fully-random\n"
            "  }\n}\n")


def masquerade(network: IPv4Network, subnet: IPv4Network) -> None:
    _nft(masquerade_script(network, subnet))


def remove(table: str) -> bool:
    """Delete one of tunl's tables; whether it was there."""
    if _list(table) is None:
        return False
    _nft(f"delete table ip {table}\n")
    return True
