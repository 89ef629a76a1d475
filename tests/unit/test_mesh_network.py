"""The overlay's words (flannel's layout) and the choice of subnets: pure, no root."""
import json
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, strategies as st

from tunl.errors import ConfigError
from tunl.mesh import network as nw
from tunl.mesh.network import BadLeaseError, Lease, NetworkConfig, NetworkFullError

CFG = NetworkConfig.parse("10.42.0.0/16")


def test_config_is_flannels_json():
    assert json.loads(CFG.to_json()) == {"Network": "10.42.0.0/16", "SubnetLen": 24,
                                         "Backend": {"Type": "ipip"}}
    # flannel's own config, as an operator writes it with etcdctl
    flannel = b'{"Network": "10.5.0.0/16", "SubnetLen": 26, "Backend": {"Type": "gre"}}'
    c = NetworkConfig.from_json(flannel)
    assert (c.network, c.subnet_len, c.mode) == (IPv4Network("10.5.0.0/16"), 26, "gre")


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"Network": "10.0.0.0/33"}', b"\xff\xfe",
                                 b'{"SubnetLen": 24}', b'{"Network": "10.0.0.0/8", "SubnetLen": 7}'])
def test_garbage_config_is_refused(raw):
    with pytest.raises(BadLeaseError):
        NetworkConfig.from_json(raw)


@pytest.mark.parametrize("net,slen,mode,word", [("10.42.0.0/16", 16, "ipip", "--subnet-len"),
                                                ("10.42.0.0/16", 31, "ipip", "--subnet-len"),
                                                ("10.42.0.0/16", 24, "vti", "--mode"),
                                                ("10.42.0.0/16", 24, "sit", "sit carries IPv6"),
                                                ("10.42.0.0/33", 24, "ipip", "--network")])
def test_bad_config_names_the_word(net, slen, mode, word):
    with pytest.raises(ConfigError, match=word):
        NetworkConfig.parse(net, slen, mode)


def test_key_is_flannels():
    assert nw.subnet_key(IPv4Network("10.42.1.0/24")) == "10.42.1.0-24"
    assert nw.key_subnet("/coreos.com/network/subnets/10.42.1.0-24") == IPv4Network("10.42.1.0/24")


@given(st.integers(1, 255), st.ip_addresses(v=4))
def test_lease_round_trip(n, ip):
    ip = IPv4Address(ip)
    subnet = IPv4Network(f"10.42.{n}.0/24")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip in CFG.network:
        with pytest.raises(BadLeaseError):
            nw.parse_lease(CFG, nw.subnet_key(subnet), Lease(subnet, ip, "ipip", "x").to_json())
        return
    lease = Lease(subnet, ip, "ipip", "node-x")
    assert nw.parse_lease(CFG, "/p/subnets/" + nw.subnet_key(subnet), lease.to_json()) == lease


GOOD = json.dumps({"PublicIP": "172.16.0.9", "BackendType": "ipip"}).encode()


@pytest.mark.parametrize("key,raw,why", [
    ("10.43.1.0-24", GOOD, "is not a /24 of 10.42.0.0/16"),      # outside the network
    ("10.42.1.0-25", GOOD, "is not a /24"),                      # wrong length
    ("10.42.0.0-24", GOOD, "first subnet"),                      # never leased
    ("10.42.1.0", GOOD, "not a subnet key"),
    ("10.42.1.0-24", b"garbage", "not a lease"),
    ("10.42.1.0-24", b'{"PublicIP": "not-an-ip"}', "not a lease"),
    ("10.42.1.0-24", b'{"PublicIP": "172.16.0.9", "BackendType": "vxlan"}', "BackendType"),
    ("10.42.1.0-24", b'{"PublicIP": "10.42.7.7", "BackendType": "ipip"}', "cannot carry"),
    ("10.42.1.0-24", b'{"PublicIP": "127.0.0.1", "BackendType": "ipip"}', "cannot carry"),
])
def test_bad_leases_are_refused_with_the_reason(key, raw, why):
    with pytest.raises(BadLeaseError, match=why):
        nw.parse_lease(CFG, key, raw)


def test_choose_prefers_and_skips_taken():
    small = NetworkConfig.parse("10.9.0.0/28", 30)
    taken = {IPv4Network("10.9.0.4/30")}
    assert nw.choose(small, taken, IPv4Network("10.9.0.8/30")) == IPv4Network("10.9.0.8/30")
    for _ in range(20):
        assert nw.choose(small, taken, IPv4Network("10.9.0.4/30")) in \
            {IPv4Network("10.9.0.8/30"), IPv4Network("10.9.0.12/30")}


def test_full_network_is_a_clear_error():
    small = NetworkConfig.parse("10.9.0.0/28", 30)
    with pytest.raises(NetworkFullError, match=r"network 10.9.0.0/28 is full: all 3 /30"):
        nw.choose(small, set(small.subnets()))


@given(st.integers(0, 2**32 - 1), st.integers(25, 30))
def test_choose_never_gives_a_taken_or_foreign_subnet(seed, slen):
    rng = random.Random(seed)
    cfg = NetworkConfig.parse("10.7.0.0/24", slen)
    all_ = list(cfg.subnets())
    taken = set(rng.sample(all_, rng.randrange(len(all_))))
    s = nw.choose(cfg, taken, rng=rng)
    assert s not in taken and s.subnet_of(cfg.network) and s.prefixlen == slen
    assert s != next(cfg.network.subnets(new_prefix=slen))
