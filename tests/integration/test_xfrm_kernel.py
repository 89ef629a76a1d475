"""`tunl xfrm` against this host's kernel, in a fresh network namespace (tlxf-…): a state or
policy tunl adds is the one `ip xfrm` adds with the same words (what `ip xfrm` and
`ip -s xfrm` print of it), show prints what ip prints, del and flush remove. What this kernel
cannot do (no esp4, no AES-GCM: "Requested type not found", "Requested AEAD algorithm not
found") is skipped with the kernel's reason; the interop guest has it all."""
from __future__ import annotations

import os
import uuid

import pytest

import nsutil
from nsutil import XFRM_POLICIES, XFRM_STATE, XFRM_SUITES, Host, sh, xfrm_listing


@pytest.fixture
def ns():
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace, the kernel's xfrm)")
    name = f"tlxf-{uuid.uuid4().hex[:8]}"
    sh(f"ip netns add {name}")
    # the kernel's xfrm, asked for by name: without ip_vti here, auto would take tunld's
    nsutil.ENV["TUNL_DATAPLANE"] = "kernel"
    try:
        h = Host(name)
        if h.run("ip xfrm state count", check=False).returncode != 0:
            pytest.skip("this kernel has no xfrm_user netlink family")
        yield h
    finally:
        nsutil.ENV.pop("TUNL_DATAPLANE", None)
        sh(f"ip netns del {name}", check=False)


def listing(h: Host, obj: str) -> tuple[str, str]:
    return xfrm_listing(lambda cmd: h.run(cmd).stdout, obj)


def can_add_state(h: Host, algo: str) -> None:
    p = h.run(f"ip xfrm state add {XFRM_STATE.format(algo=algo)}", check=False)
    h.run("ip xfrm state flush")
    if p.returncode != 0:
        pytest.skip(f"this kernel cannot make the state: {p.stderr.strip()}")


@pytest.mark.parametrize("suite", ["gcm", "cbc"])
def test_state_add_show_del_is_ips(ns, suite):
    algo = XFRM_SUITES[suite]
    can_add_state(ns, algo)
    words = XFRM_STATE.format(algo=algo)
    ns.run(f"ip xfrm state add {words}")
    by_ip = listing(ns, "state")
    assert ns.tunl("xfrm state show").stdout == by_ip[0]
    ns.run("ip xfrm state flush")
    ns.tunl(f"xfrm state add {words}")
    assert listing(ns, "state") == by_ip
    ns.tunl("xfrm state del dst 172.16.0.2 proto esp spi 0x1000 mark 7")
    assert ns.run("ip xfrm state").stdout == ""


def test_state_refused_by_this_kernel_says_why_and_changes_nothing(ns):
    """Where the kernel lacks what a state needs, tunl says the kernel's reason in one line."""
    words = XFRM_STATE.format(algo=XFRM_SUITES["gcm"])
    p = ns.run(f"ip xfrm state add {words}", check=False)
    if p.returncode == 0:
        pytest.skip("this kernel has everything the gcm state needs")
    t = ns.tunl(f"xfrm state add {words}", check=False)
    why = p.stderr.strip().removeprefix("Error: ").rstrip(".")
    assert t.returncode == 1 and t.stdout == ""
    assert t.stderr.count("\n") == 1 and why in t.stderr, (p.stderr, t.stderr)
    assert ns.run("ip xfrm state").stdout == ""


def test_policy_add_show_get_del_is_ips(ns):
    for w in XFRM_POLICIES:
        ns.run(f"ip xfrm policy add {w}")
    by_ip = listing(ns, "policy")
    assert ns.tunl("xfrm policy show").stdout == by_ip[0]
    assert ns.tunl("xfrm policy list dir out").stdout == \
        ns.run("ip xfrm policy list dir out").stdout
    ns.run("ip xfrm policy flush")
    for w in XFRM_POLICIES:
        ns.tunl(f"xfrm policy add {w}")
    assert listing(ns, "policy") == by_ip
    sel = "src 10.0.0.0/8 dst 10.1.0.0/16 proto tcp dir fwd mark 9 mask 0xff"
    assert ns.tunl(f"xfrm policy get {sel}").stdout == \
        ns.run(f"ip xfrm policy get {sel}").stdout
    ns.tunl(f"xfrm policy del {sel}")
    assert "10.1.0.0/16" not in ns.run("ip xfrm policy").stdout
    again = ns.tunl(f"xfrm policy add {XFRM_POLICIES[0]}", check=False)
    assert again.returncode == 1 and "exists" in again.stderr and again.stderr.count("\n") == 1
    gone = ns.tunl(f"xfrm policy del {sel}", check=False)
    assert gone.returncode == 1 and "no such policy" in gone.stderr
    ns.tunl("xfrm policy flush")
    assert ns.run("ip xfrm policy").stdout == ""


def test_bad_words_change_nothing(ns):
    t = ns.tunl("xfrm policy add dir out tmpl src 172.16.0.1 dst 172.16.0.2 proto esp "
                "mode transport", check=False)
    assert (t.returncode, t.stdout) == (1, "")
    assert t.stderr == 'tunl: tmpl mode "transport": a vti takes mode tunnel\n'
    assert ns.run("ip xfrm policy").stdout == ""
