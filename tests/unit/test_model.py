"""TunnelSpec validation: every refusal is a ConfigError whose message names the word."""
from ipaddress import IPv4Address, IPv4Network

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunl.errors import ConfigError, TunlError
from tunl.model import IFNAMSIZ, TunnelMode, TunnelSpec, check_ifname, network, parse_ipv4

NON_GRE = [TunnelMode.IPIP, TunnelMode.SIT, TunnelMode.ISATAP]


def refused(match: str, **kw) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        TunnelSpec(**kw)
    return str(e.value)


def test_defaults_are_an_nbma_ipip_tunnel_that_inherits_ttl():
    s = TunnelSpec(name="tunl0")
    assert (s.mode, s.ttl, s.tos, s.pmtudisc, s.remote, s.local) == (
        TunnelMode.IPIP, 0, 0, True, None, None)
    assert s.nbma
    assert not s.with_(remote=IPv4Address("192.0.2.1")).nbma


def test_config_error_is_a_tunl_error():
    assert issubclass(ConfigError, TunlError)


# ---- ttl ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", [0, 1, 64, 255])
def test_ttl_in_range_is_accepted(ttl):
    assert TunnelSpec(name="t", ttl=ttl).ttl == ttl


@pytest.mark.parametrize("ttl", [-1, 256, 1000])
def test_ttl_out_of_range_is_refused(ttl):
    msg = refused(r"^ttl ", name="t", ttl=ttl)
    assert str(ttl) in msg


def test_fixed_ttl_with_nopmtudisc_is_refused():
    # iproute2: "ttl != 0 and nopmtudisc are incompatible"
    msg = refused("nopmtudisc", name="t", ttl=64, pmtudisc=False)
    assert msg.startswith("ttl 64")


def test_ttl_inherit_with_nopmtudisc_is_accepted():
    s = TunnelSpec(name="t", ttl=0, pmtudisc=False)
    assert (s.ttl, s.pmtudisc) == (0, False)


@settings(max_examples=200)
@given(st.integers(1, 255))
def test_every_fixed_ttl_needs_pmtudisc(ttl):
    with pytest.raises(ConfigError, match=f"^ttl {ttl} with nopmtudisc"):
        TunnelSpec(name="t", ttl=ttl, pmtudisc=False)


# ---- tos ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tos", [-1, 256])
def test_tos_out_of_range_is_refused(tos):
    refused(r"^tos ", name="t", tos=tos)


@pytest.mark.parametrize("tos", [0, 1, 0x10, 0x11, 0xFF])
def test_tos_in_range_is_accepted(tos):
    assert TunnelSpec(name="t", tos=tos).tos == tos


# ---- names ---------------------------------------------------------------------------------------

def test_name_of_15_characters_is_accepted():
    assert IFNAMSIZ == 16
    assert TunnelSpec(name="a" * 15).name == "a" * 15


@pytest.mark.parametrize("length", [16, 17, 64])
def test_name_of_16_or_more_characters_is_refused(length):
    msg = refused(r'^name "', name="n" * length)
    assert "n" * length in msg and "15" in msg


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a:1", "a b", "tab\t", "nl\n"])
def test_name_with_forbidden_characters_is_refused(name):
    refused(r"^name ", name=name)


def test_dev_follows_the_same_rules_and_is_named_dev():
    assert TunnelSpec(name="t", dev="eth0").dev == "eth0"
    refused(r'^dev "', name="t", dev="e" * 16)
    refused(r'^dev "', name="t", dev="eth0:1")


# ASCII only: IFNAMSIZ counts bytes, and these names are one byte a character
names = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@",
                min_size=1, max_size=40)


@settings(max_examples=300)
@given(names)
def test_name_length_rule(name):
    if len(name) >= 16:
        with pytest.raises(ConfigError, match="^name "):
            check_ifname(name)
    elif name not in (".", ".."):
        assert check_ifname(name) == name


# ---- keys, seq, csum -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", NON_GRE, ids=lambda m: m.value)
@pytest.mark.parametrize("field", ["ikey", "okey"])
def test_keys_on_non_gre_tunnels_are_refused(mode, field):
    msg = refused(r"^key ", name="t", mode=mode, **{field: 42})
    assert f"mode {mode.value}" in msg


def test_keys_on_gre_are_accepted_and_range_checked():
    s = TunnelSpec(name="g", mode=TunnelMode.GRE, ikey=0, okey=0xFFFFFFFF)
    assert (s.ikey, s.okey) == (0, 0xFFFFFFFF)
    refused(r"^ikey ", name="g", mode=TunnelMode.GRE, ikey=-1)
    refused(r"^okey ", name="g", mode=TunnelMode.GRE, okey=2**32)


@pytest.mark.parametrize("field", ["iseq", "oseq", "icsum", "ocsum"])
def test_seq_and_csum_only_on_gre(field):
    msg = refused(r"^seq/csum ", name="t", **{field: True})
    assert "mode ipip" in msg
    assert getattr(TunnelSpec(name="g", mode=TunnelMode.GRE, **{field: True}), field)


def test_broadcast_tunnel_needs_a_local_address():
    msg = refused(r"^remote 239\.1\.2\.3", name="t", remote=IPv4Address("239.1.2.3"))
    assert "local" in msg
    s = TunnelSpec(name="t", remote=IPv4Address("239.1.2.3"), local=IPv4Address("192.0.2.1"))
    assert s.remote == IPv4Address("239.1.2.3")


def test_with_validates_again():
    s = TunnelSpec(name="t", ttl=64)
    with pytest.raises(ConfigError, match="nopmtudisc"):
        s.with_(pmtudisc=False)
    assert s.with_(ttl=0).with_(pmtudisc=False).pmtudisc is False


# ---- modes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,proto,show,overhead", [
    (TunnelMode.IPIP, 4, "ip", 20), (TunnelMode.GRE, 47, "gre", 24),
    (TunnelMode.SIT, 41, "ipv6", 20), (TunnelMode.ISATAP, 41, "ipv6", 20),
    (TunnelMode.VTI, 4, "ip", 20)])
def test_mode_protocol_and_overhead(mode, proto, show, overhead):
    assert (mode.proto, mode.show_name, mode.overhead) == (proto, show, overhead)
    assert TunnelMode(mode.value) is mode


# ---- serialisation -----------------------------------------------------------------------------------

addresses = st.builds(IPv4Address, st.integers(0, 2**32 - 1))


@st.composite
def valid_specs(draw):
    mode = draw(st.sampled_from(list(TunnelMode)))
    gre = mode is TunnelMode.GRE
    pmtudisc = draw(st.booleans())
    local = draw(st.none() | addresses)
    remote = draw(st.none() | addresses)
    if remote is not None and remote.is_multicast and local is None:
        local = IPv4Address("192.0.2.1")
    key = st.none() | st.integers(0, 2**32 - 1)
    return TunnelSpec(
        name=draw(st.text("abcdefghij0123456789-_", min_size=1, max_size=15)), mode=mode,
        remote=remote, local=local, ttl=draw(st.integers(0, 255)) if pmtudisc else 0,
        tos=draw(st.integers(0, 255)), pmtudisc=pmtudisc,
        dev=draw(st.none() | st.sampled_from(["eth0", "ens3", "br-lan"])),
        ikey=draw(key) if gre else None, okey=draw(key) if gre else None,
        iseq=gre and draw(st.booleans()), oseq=gre and draw(st.booleans()),
        icsum=gre and draw(st.booleans()), ocsum=gre and draw(st.booleans()))


@settings(max_examples=300)
@given(valid_specs())
def test_dict_round_trip(spec):
    d = spec.to_dict()
    assert d["mode"] == spec.mode.value
    assert d["remote"] == (str(spec.remote) if spec.remote else None)
    assert TunnelSpec.from_dict(d) == spec


@settings(max_examples=300)
@given(valid_specs())
def test_compact_round_trip_holds_only_what_differs(spec):
    c = spec.to_compact()
    assert c["name"] == spec.name
    default = TunnelSpec(name=spec.name).to_dict()
    assert all(v != default[k] for k, v in c.items() if k != "name")
    assert TunnelSpec.from_dict(c) == spec


def test_from_dict_validates():
    with pytest.raises(ConfigError, match="^ttl 300"):
        TunnelSpec.from_dict({"name": "t", "ttl": 300})


# ---- words of iproute2 ------------------------------------------------------------------------------

def test_parse_ipv4():
    assert parse_ipv4("any", "local") is None
    assert parse_ipv4("10.0.0.1", "local") == IPv4Address("10.0.0.1")
    with pytest.raises(ConfigError, match=r'^remote "10\.0\.0": '):
        parse_ipv4("10.0.0", "remote")


def test_network():
    assert network("10.42.1.7/24", "subnet") == IPv4Network("10.42.1.0/24")
    with pytest.raises(ConfigError, match=r'^subnet "10\.42/33"'):
        network("10.42/33", "subnet")


@pytest.mark.parametrize("fields, word", [
    ({"ttl": 1.5}, '"ttl": must be an integer'),
    ({"remote": 5}, '"remote": must be a string or null'),
    ({"mode": "gre", "ikey": True}, '"ikey": must be an integer or null'),
    ({"pmtudisc": "no"}, '"pmtudisc": must be true or false'),
    ({"iseq": 1}, '"iseq": must be true or false'),
    ({"mode": "nosuch"}, 'mode "nosuch": not a tunnel mode'),
    ({"remote": "1.2.3"}, "spec: "),
    ({"bogus": 1}, 'field "bogus": a tunnel spec has no such field'),
    ({"mode": "isatap", "prl": [["192.0.2.1", "yes"]]}, '"prl": must be a list of'),
])
def test_a_spec_from_json_refuses_wrong_types_naming_the_field(fields, word):
    with pytest.raises(ConfigError, match=re.escape(word)):
        TunnelSpec.from_dict({"name": "t0", **fields})


def test_a_spec_from_json_needs_a_name():
    with pytest.raises(ConfigError, match='"name" is required'):
        TunnelSpec.from_dict({"mode": "ipip"})
