"""Receive-side tunnel selection in the order of ip_tunnel_lookup() (net/ipv4/ip_tunnel.c).

For a received packet, remote = its source and local = its destination. The kernel tries, in
order and returning the first tunnel found:
  1. local == t.saddr and remote == t.daddr
  2. remote == t.daddr and t.saddr == any
  3. local == t.saddr and t.daddr == any,
     or local == t.daddr and local is multicast (a broadcast tunnel, "remote 239.x local y")
  4. t.saddr == any and t.daddr == any
and then the fallback device, which the caller handles (lookup returns None).
"""
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunl.tunnel.lookup import ANY, lookup

A, B = IPv4Address("192.0.2.1").packed, IPv4Address("192.0.2.2").packed      # local
X, Y = IPv4Address("198.51.100.7").packed, IPv4Address("198.51.100.8").packed  # remote
M = IPv4Address("239.1.1.1").packed                                             # group


def tunnels(*pairs):
    return [(local, remote, f"t{i}") for i, (local, remote) in enumerate(pairs)]


ALL = tunnels((A, X), (ANY, X), (A, ANY), (ANY, ANY))


def test_exact_match_wins_over_everything():
    assert lookup(ALL, X, A) == "t0"
    assert lookup(list(reversed(ALL)), X, A) == "t0"


def test_then_remote_only():
    assert lookup(ALL[1:], X, A) == "t1"
    assert lookup(list(reversed(ALL[1:])), X, A) == "t1"
    # the remote matches but the tunnel is bound to another local address: not this one
    assert lookup(tunnels((B, X), (ANY, ANY)), X, A) == "t1"


def test_then_local_only():
    assert lookup(ALL[2:], X, A) == "t2"
    assert lookup(list(reversed(ALL[2:])), X, A) == "t2"
    assert lookup(tunnels((A, ANY), (ANY, ANY)), Y, A) == "t0"


def test_then_wildcard():
    assert lookup(ALL[3:], X, A) == "t3"
    assert lookup(tunnels((B, ANY), (ANY, Y), (ANY, ANY)), X, A) == "t2"


def test_no_match_is_none_for_the_fallback_device():
    assert lookup([], X, A) is None
    assert lookup(tunnels((B, X), (A, Y), (ANY, Y), (B, ANY)), X, A) is None


def test_remote_only_beats_local_only_whatever_the_order():
    t = tunnels((A, ANY), (ANY, X))
    assert lookup(t, X, A) == "t1"
    assert lookup(list(reversed(t)), X, A) == "t1"


def test_broadcast_tunnel_matches_packets_to_its_group():
    # `ip tunnel add t mode gre remote 239.1.1.1 local 192.0.2.1`: peers send to the group
    t = tunnels((A, M), (ANY, ANY))
    assert lookup(t, X, M) == "t0"
    assert lookup(list(reversed(t)), X, M) == "t0"  # stage 3 comes before the wildcard
    # a unicast destination equal to some tunnel's remote is not a broadcast match
    assert lookup(tunnels((A, Y)), X, Y) is None


def test_ties_in_a_stage_go_to_the_first_tunnel_given():
    # the kernel refuses two keyless tunnels with the same endpoints; tunl's documented rule
    t = [(ANY, X, "first"), (ANY, X, "second")]
    assert lookup(t, X, A) == "first"


# ---- against a model of the four loops -------------------------------------------------------

def kernel_stages(tunnels, src, dst):
    """The tunnels each of the four loops of ip_tunnel_lookup() would accept."""
    remote, local = src, dst
    multicast = local[0] >> 4 == 14
    return [
        [v for s, d, v in tunnels if local == s and remote == d],
        [v for s, d, v in tunnels if remote == d and s == ANY],
        [v for s, d, v in tunnels
         if (local == s and d == ANY) or (local == d and multicast)],
        [v for s, d, v in tunnels if s == ANY and d == ANY],
    ]


endpoints = st.sampled_from([ANY, A, B, X, Y, M])


@settings(max_examples=2000)
@given(st.lists(st.tuples(endpoints, endpoints), unique=True, max_size=8),
       st.sampled_from([A, B, X, Y]), st.sampled_from([A, B, X, Y, M]))
def test_agrees_with_ip_tunnel_lookup(pairs, src, dst):
    t = tunnels(*pairs)
    got = lookup(t, src, dst)
    for stage in kernel_stages(t, src, dst):
        if stage:
            assert got in stage
            return
    assert got is None


@pytest.mark.parametrize("value", [0, "", False])
def test_falsy_values_are_still_found(value):
    # the table may map to an index or a counter that happens to be 0
    assert lookup([(A, X, value)], X, A) == value
    assert lookup([(ANY, ANY, value)], X, A) == value
