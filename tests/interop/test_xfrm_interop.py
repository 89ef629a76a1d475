"""`tunl xfrm` against the kernel's xfrm in the guest (Debian's kernel, with esp4, ip_vti,
xfrm_user and the crypto modules): a state or policy tunl adds is the one `ip xfrm` adds with
the same words (what `ip xfrm state` and `ip -s xfrm state` print of it, keys included), and
`tunl xfrm ... show` prints what `ip xfrm ... show` prints. Both suites of a vti: AES-GCM
(rfc4106) and AES-CBC with HMAC-SHA-256."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nsutil import XFRM_POLICIES, XFRM_STATE, XFRM_SUITES, xfrm_listing

TUNL = os.path.join(os.path.dirname(sys.executable), "tunl")   # the guest sees the host's files
CBC_KEY = "0x" + bytes(range(1, 17)).hex()
STATES = [
    XFRM_STATE,
    "src 172.16.0.2 dst 172.16.0.1 proto esp spi 4097 reqid 1 mode tunnel mark 7 mask 0xff "
    "{algo}",
    "src 192.0.2.1 dst 192.0.2.2 proto esp spi 020000 mode tunnel {algo} mark 0x10 mask 0xf0",
]
# gcm and authenc are the suites, seqiv and echainiv make their IVs from the default RNG (drbg)
CRYPTO = ("gf128mul", "ghash-generic", "ctr", "gcm", "seqiv", "echainiv", "authenc",
          "jitterentropy_rng", "drbg")


@pytest.fixture(scope="module")
def xg(rig):
    """The guest, with the modules of IPsec: the tunnel and xfrm ones are in its initramfs;
    the crypto ones are insmod-ed from the kernel package the image was built from."""
    vm = rig.vm
    for mod in ("xfrm_user", "esp4", "ip_vti"):
        vm.run(f"modprobe {mod}", chroot=False)
    kroot = os.path.join(os.path.dirname(vm.kernel), "kroot")
    loaded = vm.run("cat /proc/modules", chroot=False)[1]
    for mod in CRYPTO:
        p = subprocess.run(["modprobe", "-d", kroot, "-S", vm.kver, "--show-depends", mod],
                           capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("insmod ") and \
                    os.path.basename(line.split()[1])[:-3].replace("-", "_") + " " not in loaded:
                vm.run(f"insmod /host{line.split()[1]}", chroot=False, check=False)
    rc, out = vm.run("ip xfrm state add src 192.0.2.9 dst 192.0.2.10 proto esp spi 0x999 "
                     f"{XFRM_SUITES['gcm']} && ip xfrm state add src 192.0.2.9 dst 192.0.2.10 "
                     f"proto esp spi 0x998 {XFRM_SUITES['cbc']}", check=False)
    vm.run("ip xfrm state flush", check=False)
    if rc != 0:
        pytest.skip(f"the guest's kernel cannot make these states: {out.strip()}")
    yield rig
    vm.run("ip xfrm state flush; ip xfrm policy flush", check=False)


def run(rig, cmd: str) -> str:
    rc, out = rig.vm.run(cmd, check=False)
    assert rc == 0, f"{cmd} -> {rc}\n{out}"
    return out


def listing(rig, obj: str) -> tuple[str, str]:
    """`ip xfrm OBJ` and `ip -s xfrm OBJ` (without the times and indexes that differ)."""
    return xfrm_listing(lambda cmd: run(rig, cmd), obj)


def flush(rig) -> None:
    run(rig, "ip xfrm state flush && ip xfrm policy flush")


def added(rig, obj: str, words: list[str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The listing of OBJ after `ip xfrm OBJ add` of each of words, and after `tunl xfrm OBJ
    add` of the same, each from nothing; tunl's are left in place."""
    by = []
    for cmd in ("ip", TUNL):
        flush(rig)
        for w in words:
            run(rig, f"{cmd} xfrm {obj} add {w}")
        by.append(listing(rig, obj))
    return by[0], by[1]


@pytest.mark.parametrize("suite", sorted(XFRM_SUITES))
def test_state_add_is_ip_state_add(xg, record, suite):
    by_ip, by_tunl = added(xg, "state", [s.format(algo=XFRM_SUITES[suite]) for s in STATES])
    flush(xg)
    print(f"\n--- ip xfrm state after ip xfrm state add ({suite}):\n{by_ip[0]}"
          f"--- after tunl xfrm state add:\n{by_tunl[0]}", file=sys.stderr)
    record(f"xfrm state add ({suite})", "ip xfrm state: tunl = ip", by_ip == by_tunl)
    assert by_tunl[0] == by_ip[0]
    assert by_tunl[1] == by_ip[1]          # -s: lifetimes, flags, counters too


@pytest.mark.parametrize("suite", sorted(XFRM_SUITES))
def test_state_show_get_del_update(xg, suite):
    words = [s.format(algo=XFRM_SUITES[suite]) for s in STATES]
    flush(xg)
    for w in words:
        run(xg, f"ip xfrm state add {w}")
    assert run(xg, f"{TUNL} xfrm state show") == run(xg, "ip xfrm state show")
    assert run(xg, f"{TUNL} xfrm state list nokeys") == run(xg, "ip xfrm state list nokeys")
    assert run(xg, f"{TUNL} xfrm s l dst 172.16.0.0/24 reqid 1") == \
        run(xg, "ip xfrm s l dst 172.16.0.0/24 reqid 1")
    get = "dst 172.16.0.2 proto esp spi 0x1000 mark 7"
    assert run(xg, f"{TUNL} xfrm state get {get}") == run(xg, f"ip xfrm state get {get}")
    assert run(xg, f"{TUNL} xfrm state count") == run(xg, "ip xfrm state count")
    # update: what ip xfrm state update does to a valid state (xfrm_state_update() takes
    # its lifetimes and output mark, nothing of what a vti sets), tunl's does
    upd = STATES[0].format(algo=XFRM_SUITES[suite])
    before = listing(xg, "state")
    run(xg, f"{TUNL} xfrm state update {upd}")
    by_tunl = listing(xg, "state")
    run(xg, f"ip xfrm state update {upd}")
    assert by_tunl == listing(xg, "state"), f"before:\n{before[0]}"
    run(xg, f"{TUNL} xfrm state del {get}")
    assert "spi 0x00001000" not in run(xg, "ip xfrm state")
    run(xg, f"{TUNL} xfrm state flush")
    assert run(xg, "ip xfrm state") == ""


def test_policy_add_is_ip_policy_add(xg, record):
    by_ip, by_tunl = added(xg, "policy", XFRM_POLICIES)
    print(f"\n--- ip xfrm policy after ip xfrm policy add:\n{by_ip[0]}"
          f"--- after tunl xfrm policy add:\n{by_tunl[0]}", file=sys.stderr)
    assert run(xg, f"{TUNL} xfrm policy show") == run(xg, "ip xfrm policy show")
    assert run(xg, f"{TUNL} xfrm policy list dir out") == run(xg, "ip xfrm policy list dir out")
    sel = "src 10.0.0.0/8 dst 10.1.0.0/16 proto tcp dir fwd mark 9 mask 0xff"
    assert run(xg, f"{TUNL} xfrm policy get {sel}") == run(xg, f"ip xfrm policy get {sel}")
    run(xg, f"{TUNL} xfrm policy del {sel}")
    assert "10.1.0.0/16" not in run(xg, "ip xfrm policy")
    run(xg, f"{TUNL} xfrm policy flush")
    assert run(xg, "ip xfrm policy") == ""
    record("xfrm policy add", "ip xfrm policy: tunl = ip", by_ip == by_tunl)
    assert by_tunl[0] == by_ip[0]
    assert by_tunl[1] == by_ip[1]


def test_a_vti_with_tunls_states_and_policies(xg):
    """The whole set-up of a route-based IPsec tunnel, every part made by tunl."""
    flush(xg)
    g = xg.guest
    g(f"{TUNL} tunnel add vti1 mode vti local 172.16.0.1 remote 172.16.0.2 okey 7 ikey 7 "
      "--dataplane kernel", undo="ip link del vti1")
    for d, (a, b) in (("out", ("172.16.0.1", "172.16.0.2")), ("in", ("172.16.0.2", "172.16.0.1"))):
        run(xg, f"{TUNL} xfrm state add src {a} dst {b} proto esp spi 0x{d == 'out' and 1 or 2}000"
                f" reqid 1 mode tunnel mark 7 {XFRM_SUITES['gcm']} replay-window 32")
        run(xg, f"{TUNL} xfrm policy add dir {d} tmpl src {a} dst {b} proto esp mode tunnel "
                "mark 7")
    assert "vti remote 172.16.0.2 local 172.16.0.1" in run(xg, "ip -d link show vti1")
    assert run(xg, f"{TUNL} xfrm state") == run(xg, "ip xfrm state")
    assert run(xg, f"{TUNL} xfrm policy") == run(xg, "ip xfrm policy")
    flush(xg)


def test_bad_words_change_nothing(xg):
    flush(xg)
    for words, msg in (
            (f"state add src 1.1.1.1 dst 2.2.2.2 proto esp spi 0x1000 mode tunnel enc 'cbc(des)' "
             f"{CBC_KEY}",
             'enc "cbc(des)": tunl carries cbc(aes)'),
            ("state add src 1.1.1.1 dst 2.2.2.2 proto ah spi 0x1000 mode tunnel "
             f"{XFRM_SUITES['gcm']}",
             'proto "ah"'),
            ("policy add dir sideways", 'dir "sideways"')):
        rc, out = xg.vm.run(f"{TUNL} xfrm {words}; echo rc=$?", check=False)
        lines = out.strip().splitlines()
        assert lines[-1] == "rc=1" and len(lines) == 2 and msg in lines[0], out
    assert run(xg, "ip xfrm state") == "" and run(xg, "ip xfrm policy") == ""
