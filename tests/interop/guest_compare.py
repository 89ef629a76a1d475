"""Run in the guest: for each set of `ip tunnel add` words, make the device with iproute2's
ioctl path (`ip tunnel add`), with its netlink path (`ip link add ... type KIND`) and with
tunl's kernel data plane, and print the three `ip -d link show` outputs as JSON."""
import json
import re
import subprocess
import sys

from tunl.cli.grammar import spec_for_add
from tunl.kernel.tunnels import KernelTunnels

CASES = [
    "t1 mode ipip remote 192.0.2.1 local 192.0.2.2",
    "t1 mode ipip remote 192.0.2.1 local 192.0.2.2 ttl 64 tos 10",
    "t1 mode ipip remote 192.0.2.1 nopmtudisc",
    "t1 mode ipip local 192.0.2.2 tos inherit dev eth0",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2 key 42",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2 ikey 1.2.3.4 okey 7",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2 seq",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2 icsum oseq",
    "t1 mode gre remote 192.0.2.1 local 192.0.2.2 key 9 seq csum ttl 33",
    "t1 mode sit remote 192.0.2.1 local 192.0.2.2",
    "t1 mode sit local 192.0.2.2 ttl 64",
    "t1 mode isatap local 192.0.2.2",
    "t1 mode vti remote 192.0.2.1 local 192.0.2.2 key 5",
]


def show(name):
    out = subprocess.run(["ip", "-d", "link", "show", name], capture_output=True, text=True).stdout
    out = re.sub(r"^\d+: ", "", out)                   # the ifindex
    return "\n".join(line for line in out.splitlines() if not line.strip().startswith("alias "))


def link_words(words: str) -> list[str]:
    """`ip tunnel add` words as `ip link add` takes them: mode M becomes type KIND (with the
    inner protocol `ip tunnel` implies: ipip carries IPv4 only, sit IPv6 only)."""
    w = words.split()
    i = w.index("mode")
    mode = w[i + 1]
    kind = {"ipip": "ipip", "gre": "gre", "sit": "sit", "isatap": "sit", "vti": "vti"}[mode]
    extra = {"ipip": ["mode", "ipip"], "sit": ["mode", "ip6ip"], "isatap": ["mode", "ip6ip", "isatap"]}
    w[i:i + 2] = ["type", kind] + extra.get(mode, [])
    return w


def make(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    out = show("t1") if r.returncode == 0 else f"{argv[0]}: {r.stderr.strip()}"
    subprocess.run(["ip", "link", "del", "t1"], capture_output=True)
    return out


def main():
    k = KernelTunnels()
    results = []
    for words in CASES:
        ioctl = make(["ip", "tunnel", "add", *words.split()])
        netlink = make(["ip", "link", "add", *link_words(words)])
        try:
            k.add(spec_for_add(words.split()))
            tunl = show("t1")
            k.delete("t1")
        except Exception as e:          # reported, and the case fails on the host side
            tunl = f"tunl: {e}"
            subprocess.run(["ip", "link", "del", "t1"], capture_output=True)
        results.append({"words": words, "ip tunnel add": ioctl, "ip link add": netlink,
                        "tunl": tunl})
    json.dump(results, sys.stdout)


main()
