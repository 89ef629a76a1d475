"""plan(desired, actual): pure; checked against a model of the routing table."""
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, strategies as st

from tunl.mesh.plan import Op, Route, apply, plan

nets = st.integers(1, 12).map(lambda n: IPv4Network(f"10.42.{n}.0/24"))
vias = st.integers(1, 4).map(lambda n: IPv4Address(f"172.16.0.{n}"))
devs = st.sampled_from(["tunl0", "eth0"])
routes = st.builds(Route, nets, vias, devs)


def unique_dst(rs):
    out = {}
    for r in rs:
        out.setdefault(r.dst, r)
    return set(out.values())


@given(st.sets(routes).map(unique_dst), st.sets(routes).map(unique_dst))
def test_plan_makes_actual_desired(desired, actual):
    assert apply(plan(desired, actual), actual) == desired


@given(st.sets(routes).map(unique_dst))
def test_nothing_to_do_when_in_step(desired):
    assert plan(desired, desired) == []


@given(st.sets(routes).map(unique_dst), st.sets(routes).map(unique_dst))
def test_untouched_routes_are_never_in_the_plan(desired, actual):
    for op in plan(desired, actual):
        assert op.route not in (desired & actual)


def test_ops_in_order():
    a = Route(IPv4Network("10.42.1.0/24"), IPv4Address("172.16.0.1"), "tunl0")
    moved = Route(IPv4Network("10.42.2.0/24"), IPv4Address("172.16.0.2"), "tunl0")
    moved_now = Route(IPv4Network("10.42.2.0/24"), IPv4Address("172.16.0.9"), "tunl0")
    new = Route(IPv4Network("10.42.3.0/24"), IPv4Address("172.16.0.3"), "tunl0")
    assert plan({moved_now, new}, {a, moved}) == [Op("delete", a), Op("replace", moved_now),
                                                  Op("add", new)]
    assert str(Op("add", new)) == "add 10.42.3.0/24 via 172.16.0.3 dev tunl0 onlink"


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)), max_size=6),
       st.integers(0, 2**32 - 1))
def test_direct_dev_is_the_longest_connected_prefix_holding_the_address(raw, addr):
    from tunl.mesh.plan import direct_dev
    links = [(IPv4Network((a, plen), strict=False), f"eth{i}") for i, (a, plen) in enumerate(raw)]
    ip = IPv4Address(addr)
    dev = direct_dev(links, ip)
    holding = [(n, d) for n, d in links if ip in n]
    if not holding:
        assert dev is None
    else:
        chosen = [n for n, d in links if d == dev][0]
        assert ip in chosen
        assert chosen.prefixlen == max(n.prefixlen for n, _ in holding)
