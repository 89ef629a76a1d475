"""`tunl tunnel show WORDS` lists what `ip tunnel show WORDS` would: the tunnels whose dev,
name, remote, local and key the words give (ip_tunnel_parm_match()); and the verbs take
iproute2's prefixes (`p` is prl, `6` is 6rd). In a fresh network namespace, on the userspace
data plane (no eBPF, no kernel module involved).
"""
from __future__ import annotations

import json
import os

import pytest

from nsutil import Net

pytestmark = [pytest.mark.root]
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces and TUN devices", allow_module_level=True)

US = "--dataplane userspace"


@pytest.fixture(scope="module")
def host():
    net = Net()
    try:
        h = net.host("A")
        # two underlay devices for `dev` (veth pairs: this kernel may have no dummy module)
        h.run("ip link add d0 type veth peer name d0p && ip link add d1 type veth peer name d1p"
              " && ip addr add 192.0.2.1/24 dev d0 && ip addr add 198.51.100.1/24 dev d1 && "
              "for d in d0 d0p d1 d1p; do ip link set $d up; done")
        h.tunl(f"tunnel add gre1 mode gre key 5 dev d0 local 192.0.2.1 {US}")
        h.tunl(f"tunnel add gre2 mode gre ikey 7 okey 9 dev d1 {US}")
        h.tunl(f"tunnel add t3 mode ipip dev d0 remote 203.0.113.3 tos inherit/AF41 {US}")
        h.tunl(f"tunnel add t4 mode ipip {US}")
        yield h
    finally:
        net.close()


def names(host, words: str) -> list[str]:
    out = host.tunl(f"tunnel show {words}").stdout
    return [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]


@pytest.mark.parametrize("words, want", [
    ("", ["gre1", "gre2", "t3", "t4"]),
    ("dev d0", ["gre1", "t3"]),
    ("dev d1", ["gre2"]),
    ("key 5", ["gre1"]),
    ("key 7", ["gre2"]),
    ("ikey 7", ["gre2"]),
    ("okey 9", ["gre1", "gre2", "t3", "t4"]),
    ("key 0", ["gre1", "gre2", "t3", "t4"]),
    ("dev d0 key 5", ["gre1"]),
    ("dev d1 key 5", []),
    ("remote 203.0.113.3", ["t3"]),
    ("local 192.0.2.1 dev d0", ["gre1"]),
    ("mode ipip dev d0", ["t3"]),
])
def test_show_filters(host, words, want):
    assert names(host, words) == want


def test_show_verbs_and_prefixes_filter_alike(host):
    for verb in ("show", "s", "sh", "list", "l", "lst"):
        out = host.tunl(f"tunnel {verb} dev d1").stdout
        assert out.startswith("gre2: gre/ip remote any local any dev d1 ttl inherit ikey 7 "
                              "okey 9"), (verb, out)


def test_show_dev_of_no_device_is_an_error(host):
    p = host.tunl("tunnel show dev nosuch", check=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == 'tunl: dev "nosuch": Cannot find device "nosuch"\n'


def test_show_key_with_a_mode_without_keys_is_refused(host):
    p = host.tunl("tunnel show mode ipip key 5", check=False)
    assert (p.returncode, p.stderr) == \
        (1, "tunl: key with mode ipip: keys are only for gre and vti tunnels\n")


def test_tos_names_are_shown_and_in_json(host):
    assert host.tunl("tunnel show t3").stdout == \
        "t3: ip/ip remote 203.0.113.3 local any dev d0 ttl inherit tos inherit/AF41\n"
    (t3,) = json.loads(host.tunl("-j tunnel show dev d0 remote 203.0.113.3").stdout)
    assert t3["tos"] == "0x89"          # print_tunnel()'s JSON: the whole byte
    host.tunl("tunnel change t3 tos EF")
    assert "ttl inherit tos EF\n" in host.tunl("tunnel show t3").stdout
    host.tunl("tunnel change t3 dsf 0x11")
    assert "ttl inherit tos inherit/0x10\n" in host.tunl("tunnel show t3").stdout
    p = host.tunl("tunnel change t3 tos 0x100", check=False)
    assert p.returncode == 1 and "bad TOS value" in p.stderr


def test_prl_and_6rd_by_prefix(host):
    try:
        host.tunl(f"tunnel a isatap0 mode isatap local 192.0.2.1 {US}")
        host.tunl(f"tunnel a sit1 mode sit local 198.51.100.1 {US}")
        host.tunl("tunnel p prl-default 192.0.2.9 dev isatap0")
        assert " pdr 192.0.2.9 " in host.tunl("tunnel sh isatap0").stdout
        host.tunl("tunnel pr prl-delete 192.0.2.9 dev isatap0")
        assert " pdr " not in host.tunl("tunnel sh isatap0").stdout
        host.tunl("tunnel 6 dev sit1 6rd-prefix 2001:db8::/32")
        assert "6rd-prefix 2001:db8::/32" in host.tunl("tunnel sh sit1").stdout
    finally:
        host.tunl("tunnel d isatap0", check=False)
        host.tunl("tunnel de sit1", check=False)
    assert names(host, "") == ["gre1", "gre2", "t3", "t4"]
