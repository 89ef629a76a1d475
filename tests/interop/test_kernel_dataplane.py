"""tunl's kernel data plane, in the guest whose kernel has the tunnel modules: the devices it
makes over netlink are the ones iproute2 makes with the same words; show, change, del, prl and
6rd work on them; a device tunl did not make is never changed."""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

TUNL = os.path.join(os.path.dirname(sys.executable), "tunl")   # the guest sees the host's files
HERE = os.path.dirname(os.path.abspath(__file__))
# the kernel gives a tunnel made over netlink (ip_tunnel_newlink()) no MTU bounds, where the
# ioctl path (__ip_tunnel_create()) sets 68 and 65535 minus the headers
MTU_BOUNDS = re.compile(r" minmtu \d+ maxmtu \d+")


@pytest.fixture(scope="module")
def compared(rig):
    rig.vm.run("modprobe ip_vti", chroot=False)
    root = os.path.dirname(os.path.dirname(HERE))
    out = rig.guest(f"cd {root} && .venv/bin/python tests/interop/guest_compare.py", timeout=300)
    return {r["words"]: r for r in json.loads(out)}


def cases():
    import ast
    src = open(os.path.join(HERE, "guest_compare.py")).read()
    start = src.index("CASES = [")
    return ast.literal_eval(src[start + len("CASES = "):src.index("]", start) + 1])


@pytest.mark.parametrize("words", cases())
def test_the_device_is_the_one_iproute2_makes(compared, record, words):
    r = compared[words]
    same_netlink = r["tunl"] == r["ip link add"]
    same_ioctl = MTU_BOUNDS.sub("", r["tunl"]) == MTU_BOUNDS.sub("", r["ip tunnel add"])
    record(f"kernel: {words[3:]}", "ip -d link: tunl = iproute2", same_netlink and same_ioctl)
    assert r["tunl"] == r["ip link add"], f"\ntunl:        {r['tunl']}\nip link add: {r['ip link add']}"
    assert MTU_BOUNDS.sub("", r["tunl"]) == MTU_BOUNDS.sub("", r["ip tunnel add"])


def test_cli_add_show_change_prl_6rd_del_on_kernel_devices(guest):
    rig = guest
    g = rig.guest
    g(f"{TUNL} tunnel add k1 mode gre remote 192.0.2.1 local 192.0.2.2 key 5 "
      "--dataplane kernel", undo="ip link del k1")
    assert "gre" in g("ip -d link show k1")          # the kernel's own device, not a TUN
    assert g(f"{TUNL} tunnel show k1") == g("ip tunnel show k1")
    g(f"{TUNL} tunnel change k1 ttl 9")
    assert "ttl 9" in g("ip tunnel show k1")
    g(f"{TUNL} tunnel add k2 mode isatap local 192.0.2.2", undo="ip link del k2")
    g(f"{TUNL} tunnel prl prl-default 192.0.2.9 dev k2")
    assert "pdr 192.0.2.9" in g("ip tunnel show k2")
    g(f"{TUNL} tunnel 6rd dev k2 6rd-prefix 2001:db8::/32 6rd-relay_prefix 192.0.0.0/8")
    assert "6rd-prefix 2001:db8::/32 6rd-relay_prefix 192.0.0.0/8" in g("ip tunnel show k2")
    assert g(f"{TUNL} tunnel show k2") == g("ip tunnel show k2")
    g(f"{TUNL} tunnel del k1 && {TUNL} tunnel del k2")
    assert "k1" not in g("ip -br link") and "k2" not in g("ip -br link")


def test_auto_takes_the_kernel_where_it_has_the_module(guest):
    rig = guest
    rig.guest(f"{TUNL} tunnel add a1 mode ipip remote 192.0.2.1 local 192.0.2.3",
              undo="ip link del a1")
    detail = rig.guest("ip -d link show a1")
    assert "ipip ipip remote 192.0.2.1" in detail and "tun type" not in detail


def test_devices_tunl_did_not_make_are_left_alone(guest):
    rig = guest
    before = rig.guest("ip tunnel show tunl0")
    rc, out = rig.vm.run(f"{TUNL} tunnel change tunl0 ttl 5; echo rc=$?", check=False)
    assert "tunl did not create it" in out and "rc=1" in out
    rc, out = rig.vm.run(f"{TUNL} tunnel del gre0; echo rc=$?", check=False)
    assert "tunl did not create it" in out and "rc=1" in out
    assert rig.guest("ip tunnel show tunl0") == before
    assert "gre0" in rig.guest("ip -br link")


def test_doctor_in_the_guest_says_the_kernel_carries_the_tunnels(guest):
    out = guest.guest(f"{TUNL} doctor", check=False)
    for mode in ("ipip", "gre", "sit"):
        assert re.search(rf"^\s+{mode}\s+kernel\b", out, re.M), out
