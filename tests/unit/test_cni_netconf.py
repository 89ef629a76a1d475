"""tunl-cni without root: the network configuration and its every refusal, the delegate's
configuration built from a lease, the CNI error result, and the plugin's commands run in this
process against a fake delegate (a shell script on CNI_PATH that records what it was given)."""
from __future__ import annotations

import io
import json
import os
import stat
import sys
from ipaddress import IPv4Interface, IPv4Network

import pytest
from hypothesis import given, strategies as st

from tunl.cli import cni as plugin
from tunl.mesh import cni
from tunl.mesh.cni import Attachment, CNIError, Invocation, NetConf
from tunl.mesh.subnetenv import SubnetEnv

ENV = SubnetEnv(IPv4Network("10.42.0.0/16"), IPv4Interface("10.42.1.1/24"), 1480, False, "mybr0")
BASE = {"cniVersion": "1.0.0", "name": "tunl", "type": "tunl-cni"}


def conf(**kw) -> NetConf:
    return NetConf.parse(json.dumps({**BASE, **kw}))


# ------------------------------------------------------------------------- configuration

def test_minimal_config_takes_the_defaults():
    c = NetConf.parse(json.dumps(BASE))
    assert (c.cni_version, c.name, c.subnet_file, c.data_dir) == (
        "1.0.0", "tunl", "/run/tunl/subnet.env", "/var/lib/cni/tunl")
    assert (c.delegate, c.ipam, c.runtime_config, c.prev_result, c.valid_attachments) == (
        {}, {}, None, None, None)


def test_every_field_is_read():
    c = conf(subnetFile="/tmp/n1.env", dataDir="/tmp/d", delegate={"ipMasq": True},
             ipam={"dataDir": "/tmp/ipam"}, runtimeConfig={"mac": "02:00:00:00:00:01"},
             prevResult={"cniVersion": "1.0.0"}, **{"cni.dev/valid-attachments": [
                 {"containerID": "c1", "ifname": "eth0"}]}, args={"cni": {}})
    assert (c.subnet_file, c.data_dir, c.delegate, c.ipam) == (
        "/tmp/n1.env", "/tmp/d", {"ipMasq": True}, {"dataDir": "/tmp/ipam"})
    assert c.runtime_config == {"mac": "02:00:00:00:00:01"}
    assert c.valid_attachments == frozenset({("c1", "eth0")})


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_every_supported_version_is_accepted(version):
    assert conf(cniVersion=version).cni_version == version


DROP = object()        # the key is left out
BAD = [
    # (raw configuration, code, message)
    (b"", 6, "network configuration: not JSON"),
    (b"{not json", 6, "network configuration: not JSON"),
    (b"\xff\xfe", 6, "network configuration: not JSON"),
    (b"[]", 6, "network configuration: must be a JSON object, not a list"),
    (b'"tunl"', 6, "network configuration: must be a JSON object, not a string"),
    ({"cniVersion": DROP}, 7,
     '"cniVersion": required (one of 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)'),
    ({"cniVersion": 1.0}, 7, '"cniVersion": must be a string, not a number'),
    ({"cniVersion": "0.2.0"}, 1,
     '"cniVersion": "0.2.0" is not one tunl-cni speaks (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)'),
    ({"cniVersion": "2.0.0"}, 1, '"cniVersion": "2.0.0" is not one tunl-cni speaks'),
    ({"name": DROP}, 7, '"name": required: the network\'s name'),
    ({"name": ""}, 7, '"name": must be a letter or digit, then letters, digits, "_", "." or '
                      '"-", not ""'),
    ({"name": "my net"}, 7, '"name": must be a letter or digit'),
    ({"name": 5}, 7, '"name": must be a letter or digit, then letters, digits, "_", "." or "-", '
                     'not 5'),
    ({"type": "flannel"}, 7, '"type": must be "tunl-cni" (this plugin), not "flannel"'),
    ({"type": None}, 7, '"type": must be "tunl-cni" (this plugin), not null'),
    ({"type": DROP}, 7, '"type": required: "tunl-cni"'),
    ({"subnetFile": "run/tunl/subnet.env"}, 7,
     '"subnetFile": must be an absolute path, not "run/tunl/subnet.env"'),
    ({"subnetFile": 3}, 7, '"subnetFile": must be an absolute path, not 3'),
    ({"dataDir": ""}, 7, '"dataDir": must be an absolute path, not ""'),
    ({"delegate": []}, 7, '"delegate": must be a JSON object, not a list'),
    ({"delegate": "bridge"}, 7, '"delegate": must be a JSON object, not a string'),
    ({"delegate": {"name": "x"}}, 7,
     '"delegate.name": must not be set: set by tunl-cni to the network\'s name'),
    ({"delegate": {"cniVersion": "1.0.0"}}, 7,
     '"delegate.cniVersion": must not be set: set by tunl-cni to the network\'s cniVersion'),
    ({"delegate": {"ipam": {}}}, 7, '"delegate.ipam": must not be set: set by tunl-cni from the '
                                    'node\'s lease; use the top-level "ipam"'),
    ({"delegate": {"type": 7}}, 7, '"delegate.type": must be a plugin\'s name'),
    ({"delegate": {"type": "../../bin/sh"}}, 7,
     '"delegate.type": must be a plugin\'s name (a letter or digit, then letters, digits, "_", '
     '"." or "-"), not "../../bin/sh"'),
    ({"delegate": {"type": "tunl-cni"}}, 7,
     '"delegate.type": must not be "tunl-cni": it would call itself'),
    ({"delegate": {"bridge": "a-bridge-name-too-long"}}, 7,
     '"delegate.bridge": "a-bridge-name-too-long": a device name is 1-15 characters'),
    ({"delegate": {"bridge": 0}}, 7, '"delegate.bridge": 0: a device name is 1-15 characters'),
    ({"delegate": {"mtu": 67}}, 7, '"delegate.mtu": must be an MTU (68-65535), not 67'),
    ({"delegate": {"mtu": "1480"}}, 7, '"delegate.mtu": must be an MTU (68-65535), not "1480"'),
    ({"delegate": {"mtu": True}}, 7, '"delegate.mtu": must be an MTU (68-65535), not true'),
    ({"delegate": {"ipMasq": "yes"}}, 7, '"delegate.ipMasq": must be true or false, not "yes"'),
    ({"delegate": {"hairpinMode": 1}}, 7, '"delegate.hairpinMode": must be true or false, not 1'),
    ({"ipam": "host-local"}, 7, '"ipam": must be a JSON object, not a string'),
    ({"ipam": {"type": ""}}, 7, '"ipam.type": must be a plugin\'s name'),
    ({"runtimeConfig": []}, 7, '"runtimeConfig": must be a JSON object, not a list'),
    ({"prevResult": "ok"}, 7, '"prevResult": must be a JSON object, not a string'),
    ({"cni.dev/valid-attachments": {}}, 7,
     '"cni.dev/valid-attachments": must be a list of objects, not an object'),
    ({"cni.dev/valid-attachments": [1]}, 7,
     '"cni.dev/valid-attachments[0]": must be a JSON object, not a number'),
    ({"cni.dev/valid-attachments": [{"containerID": "c1"}]}, 7,
     '"cni.dev/valid-attachments[0].ifname": must be a non-empty string, not null'),
    ({"cni.dev/valid-attachments": [{"containerID": "", "ifname": "eth0"}]}, 7,
     '"cni.dev/valid-attachments[0].containerID": must be a non-empty string, not empty'),
]


@pytest.mark.parametrize("raw,code,msg", BAD, ids=[f"{i}-{b[2][:28]}" for i, b in enumerate(BAD)])
def test_bad_config_names_the_field_and_the_rule(raw, code, msg):
    if isinstance(raw, dict):
        raw = json.dumps({k: v for k, v in {**BASE, **raw}.items() if v is not DROP})
    with pytest.raises(CNIError) as e:
        NetConf.parse(raw)
    assert e.value.code == code
    assert e.value.msg.startswith(msg), e.value.msg


def test_missing_cniversion_in_a_config_without_one():
    with pytest.raises(CNIError) as e:
        NetConf.parse(b'{"name": "tunl", "type": "tunl-cni"}')
    assert e.value.code == 7 and e.value.msg.startswith('"cniVersion": required')


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10)
KEYS = st.sampled_from(["cniVersion", "name", "type", "subnetFile", "dataDir", "delegate", "ipam",
                        "runtimeConfig", "prevResult", "cni.dev/valid-attachments"])


@given(st.dictionaries(KEYS, JSON, max_size=6))
def test_any_json_config_parses_or_is_a_cni_error(d):
    raw = json.dumps({**BASE, **d})
    try:
        c = NetConf.parse(raw)
    except CNIError as e:
        assert e.code in (1, 6, 7) and e.msg.startswith('"') and '": ' in e.msg
        r = e.result()
        assert set(r) == {"cniVersion", "code", "msg", "details"}
        json.dumps(r)
        return
    assert c.name == ({**BASE, **d})["name"]


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_a_cni_error(raw):
    try:
        NetConf.parse(raw)
    except CNIError as e:
        assert e.code in (1, 6, 7)


def test_error_result_has_the_spec_shape():
    e = CNIError(7, '"delegate": must be a JSON object, not a list', "more")
    assert e.result("1.0.0") == {"cniVersion": "1.0.0", "code": 7,
                                 "msg": '"delegate": must be a JSON object, not a list',
                                 "details": "more"}
    assert e.result()["cniVersion"] == "1.1.0"
    assert str(e) == e.msg


def test_asked_version_and_version_result():
    assert cni.asked_version(b'{"cniVersion": "0.4.0", "delegate": []}') == "0.4.0"
    assert cni.asked_version(b'{"cniVersion": "0.2.0"}') is None
    assert cni.asked_version(b"nope") is None and cni.asked_version(b"[1]") is None
    assert cni.version_result(b'{"cniVersion": "1.0.0"}') == {
        "cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    assert cni.version_result(b"")["cniVersion"] == "1.1.0"
    assert cni.version_result(b'{"cniVersion": "x"}')["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("command,version,ok", [
    ("ADD", "0.3.0", True), ("CHECK", "0.3.1", False), ("CHECK", "0.4.0", True),
    ("GC", "1.0.0", False), ("STATUS", "1.0.0", False), ("STATUS", "1.1.0", True)])
def test_commands_need_their_version(command, version, ok):
    c = conf(cniVersion=version)
    if ok:
        c.allows(command)
        return
    with pytest.raises(CNIError) as e:
        c.allows(command)
    assert e.value.code == 1
    assert e.value.msg.startswith(f'"cniVersion": {version} does not allow {command}')


def test_gc_needs_the_valid_attachments():
    with pytest.raises(CNIError, match=r'"cni.dev/valid-attachments": required for GC') as e:
        conf(cniVersion="1.1.0").allows("GC")
    assert e.value.code == 7
    conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}).allows("GC")


# ---------------------------------------------------------------------------- environment

RUNTIME = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/c1",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni:/opt/cni/bin", "CNI_ARGS": "A=1"}


def test_invocation_reads_the_runtime_environment():
    inv = Invocation.from_env(RUNTIME)
    assert inv == Invocation("ADD", "c1", "/run/netns/c1", "eth0", "A=1",
                             ("/usr/lib/cni", "/opt/cni/bin"))
    with pytest.raises(AttributeError):
        inv.command = "DEL"
    assert Invocation.from_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1",
                                "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}).netns == ""
    assert Invocation.from_env({"CNI_COMMAND": "STATUS"}).path == ()


@pytest.mark.parametrize("env,msg", [
    ({"CNI_COMMAND": None}, "CNI_COMMAND: not set"),
    ({"CNI_COMMAND": "add"}, 'CNI_COMMAND "add": not one of ADD, DEL, CHECK, VERSION, GC, STATUS'),
    ({"CNI_NETNS": None, "CNI_PATH": None}, "CNI_NETNS, CNI_PATH: required for ADD, not set"),
    ({"CNI_COMMAND": "GC", "CNI_PATH": None}, "CNI_PATH: required for GC, not set"),
    ({"CNI_CONTAINERID": "-x"}, 'CNI_CONTAINERID "-x": must be a letter or digit'),
    ({"CNI_CONTAINERID": "a/b"}, 'CNI_CONTAINERID "a/b": must be a letter or digit'),
    ({"CNI_IFNAME": "eth0123456789012"}, 'CNI_IFNAME "eth0123456789012": a device name is 1-15'),
    ({"CNI_IFNAME": ".."}, 'CNI_IFNAME "..": a device name'),
    ({"CNI_IFNAME": "e:0"}, 'CNI_IFNAME "e:0": a device name'),
    ({"CNI_COMMAND": "CHECK", "CNI_IFNAME": None}, "CNI_IFNAME: required for CHECK, not set"),
])
def test_bad_environment_is_code_4_and_names_the_variable(env, msg):
    e = {k: v for k, v in {**RUNTIME, **env}.items() if v is not None}
    with pytest.raises(CNIError) as err:
        Invocation.from_env(e)
    assert err.value.code == 4 and err.value.msg.startswith(msg), err.value.msg


# ------------------------------------------------------------------------------- delegate

def test_delegate_is_kube_flannels_bridge_on_the_nodes_lease():
    assert cni.delegate_config(conf(), ENV) == {
        "cniVersion": "1.0.0", "name": "tunl", "type": "bridge", "bridge": "mybr0", "mtu": 1480,
        "isGateway": True, "isDefaultGateway": True, "hairpinMode": True, "ipMasq": False,
        "ipam": {"type": "host-local",
                 "ranges": [[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}]],
                 "routes": [{"dst": "10.42.0.0/16", "gw": "10.42.1.1"}]}}


def test_delegate_and_ipam_are_merged_over_the_defaults():
    d = cni.delegate_config(conf(cniVersion="0.4.0", delegate={"ipMasq": True, "mtu": 1400,
                                                               "isDefaultGateway": False,
                                                               "vlan": 3},
                                 ipam={"dataDir": "/tmp/ipam", "routes": []},
                                 runtimeConfig={"mac": "02:00:00:00:00:01"}), ENV)
    assert (d["cniVersion"], d["ipMasq"], d["mtu"], d["isDefaultGateway"], d["vlan"]) == (
        "0.4.0", True, 1400, False, 3)
    assert d["isGateway"] is True and d["bridge"] == "mybr0"
    assert d["ipam"] == {"type": "host-local", "dataDir": "/tmp/ipam", "routes": [],
                         "ranges": [[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}]]}
    assert d["runtimeConfig"] == {"mac": "02:00:00:00:00:01"}


def test_a_delegate_other_than_bridge_gets_no_bridge_words():
    d = cni.delegate_config(conf(delegate={"type": "ptp"}), ENV)
    assert d["type"] == "ptp" and d["mtu"] == 1480 and d["ipMasq"] is False
    assert not {"bridge", "isGateway", "isDefaultGateway", "hairpinMode"} & set(d)
    assert d["ipam"]["ranges"] == [[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}]]


def test_ranges_of_the_operator_must_be_inside_the_nodes_subnet():
    ok = [[{"subnet": "10.42.1.128/25", "rangeStart": "10.42.1.130"}]]
    assert cni.delegate_config(conf(ipam={"ranges": ok}), ENV)["ipam"]["ranges"] == ok
    for ranges, msg in (
            ([[{"subnet": "10.42.2.0/24"}]], '"ipam.ranges[0][0].subnet": 10.42.2.0/24 is not '
                                             "inside this node's subnet 10.42.1.0/24"),
            ([[{"subnet": "bogus"}]], '"ipam.ranges[0][0].subnet": "bogus" is not an IPv4'),
            ([[{"gateway": "10.42.1.1"}]], '"ipam.ranges[0][0].subnet": must be a non-empty'),
            ([[]], '"ipam.ranges[0]": must be a non-empty list of ranges'),
            ([["x"]], '"ipam.ranges[0][0]": must be a JSON object, not a string'),
            ({}, '"ipam.ranges": must be a non-empty list of range sets, not an object')):
        with pytest.raises(CNIError) as e:
            cni.delegate_config(conf(ipam={"ranges": ranges}), ENV)
        assert e.value.code == 7 and e.value.msg.startswith(msg), e.value.msg
    # another IPAM plugin's ranges are its own business
    other = cni.delegate_config(conf(ipam={"type": "static", "ranges": {}}), ENV)
    assert other["ipam"]["type"] == "static"


@st.composite
def leases(draw):
    plen = draw(st.integers(8, 22))
    net = IPv4Network((draw(st.integers(0, 2**32 - 1)), plen), strict=False)
    slen = draw(st.integers(plen + 2, 28))
    sub = list(net.subnets(new_prefix=slen))[:64]
    s = draw(st.sampled_from(sub))
    bridge = draw(st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True))
    return SubnetEnv(net, IPv4Interface(f"{s.network_address + 1}/{slen}"),
                     draw(st.integers(68, 65535)), draw(st.booleans()), bridge)


@given(leases(), st.sampled_from(cni.SUPPORTED_VERSIONS),
       st.fixed_dictionaries({}, optional={"ipMasq": st.booleans(), "hairpinMode": st.booleans(),
                                           "mtu": st.integers(68, 65535)}))
def test_delegate_always_addresses_from_the_lease(env, version, delegate):
    c = conf(cniVersion=version, delegate=delegate)
    d = cni.delegate_config(c, env)
    assert json.loads(json.dumps(d)) == d
    assert (d["cniVersion"], d["name"], d["type"], d["bridge"]) == (version, "tunl", "bridge",
                                                                    env.bridge)
    assert d["mtu"] == delegate.get("mtu", env.mtu)
    assert d["ipMasq"] is delegate.get("ipMasq", False)
    (r,), = d["ipam"]["ranges"]
    assert IPv4Network(r["subnet"]) == env.subnet.network
    assert r["gateway"] == str(env.subnet.ip)
    assert d["ipam"]["routes"] == [{"dst": str(env.network), "gw": str(env.subnet.ip)}]


def test_delegate_version_speaks_the_newest_the_delegate_knows():
    old = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]          # plugins 1.1.1
    assert cni.delegate_version("1.1.0", old, "bridge") == "1.0.0"
    assert cni.delegate_version("1.1.0", old + ["1.1.0"], "bridge") == "1.1.0"
    assert cni.delegate_version("0.4.0", old, "bridge") == "0.4.0"
    with pytest.raises(CNIError) as e:
        cni.delegate_version("1.1.0", ["0.3.0", "0.3.1"], "bridge")
    assert e.value.code == 1
    assert e.value.msg == '"delegate.type": plugin "bridge" speaks CNI 0.3.0, 0.3.1, not 1.1.0'


def test_relabel_only_between_results_of_the_same_shape():
    r = {"cniVersion": "1.0.0", "ips": []}
    assert cni.relabel(r, "1.1.0") == {"cniVersion": "1.1.0", "ips": []}
    assert cni.relabel({"cniVersion": "1.1.0"}, "1.0.0") == {"cniVersion": "1.0.0"}
    assert cni.relabel({"cniVersion": "0.4.0"}, "1.1.0") == {"cniVersion": "0.4.0"}
    d = cni.with_prev_result({"cniVersion": "1.0.0", "type": "bridge"},
                             {"cniVersion": "1.1.0", "ips": []})
    assert d["prevResult"] == {"cniVersion": "1.0.0", "ips": []}


def test_delegate_failure_is_passed_through_or_explained():
    err = b'{"cniVersion": "1.0.0", "code": 11, "msg": "busy", "details": "d"}'
    assert cni.delegate_failure("bridge", 3, err, "1.1.0") == (
        {"cniVersion": "1.1.0", "code": 11, "msg": "busy", "details": "d"}, 3)
    r, status = cni.delegate_failure("bridge", 2, b"panic: oops\n", "1.0.0")
    assert status == 2 and r["code"] == 999 and r["details"] == "panic: oops"
    assert r["msg"] == 'delegate "bridge" exited with status 2 and no error result'


def test_check_lease():
    d = cni.delegate_config(conf(), ENV)
    cni.check_lease(d, ENV)
    moved = SubnetEnv(ENV.network, IPv4Interface("10.42.7.1/24"), 1480)
    with pytest.raises(CNIError, match="the node's subnet is now 10.42.7.0/24") as e:
        cni.check_lease(d, moved)
    assert e.value.code == 7
    cni.check_lease({"ipam": {"type": "dhcp"}}, moved)


# ---------------------------------------------------------------------------- attachments

NAMES = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,20}", fullmatch=True)
IFNAMES = st.from_regex(r"[a-z][a-z0-9\-]{0,14}", fullmatch=True)


@given(NAMES, IFNAMES)
def test_attachment_round_trip(cid, ifname):
    a = Attachment(cid, ifname, cni.delegate_config(conf(), ENV))
    assert Attachment.from_json(a.to_json(), "f") == a
    assert a.filename == f"{cid}-{ifname}" and a.network == "tunl"


@pytest.mark.parametrize("data", [b"", b"{}", b"[]", b'{"containerID": 1, "ifname": "e", '
                                  b'"delegate": {"type": "bridge"}}',
                                  b'{"containerID": "c", "ifname": "e", "delegate": {"type": '
                                  b'"../x"}}'])
def test_garbage_attachment_is_code_6(data):
    with pytest.raises(CNIError, match="/d/c-e: not an attachment saved by tunl-cni") as e:
        Attachment.from_json(data, "/d/c-e")
    assert e.value.code == 6


def test_stale_attachments_are_this_networks_not_listed():
    d = {"name": "tunl", "type": "bridge"}
    saved = [Attachment("c2", "eth0", d), Attachment("c1", "eth0", d),
             Attachment("c1", "net1", d), Attachment("c9", "eth0", {**d, "name": "other"})]
    assert [(a.container_id, a.ifname) for a in cni.stale(saved, "tunl", frozenset(
        {("c1", "eth0")}))] == [("c1", "net1"), ("c2", "eth0")]
    assert cni.stale(saved, "tunl", frozenset({("c1", "eth0"), ("c1", "net1"), ("c2", "eth0")})) \
        == []


# ---------------------------------------------------------- the plugin, on a fake delegate

FAKE = """#!/bin/sh
# a delegate that records its calls; ADD fails when $FAKE_FAIL exists
cat > "$FAKE_LOG/$CNI_COMMAND.${CNI_CONTAINERID:-none}.json"
env | grep '^CNI_' | sort > "$FAKE_LOG/$CNI_COMMAND.${CNI_CONTAINERID:-none}.env"
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0"]}';;
ADD) if [ -e "$FAKE_FAIL" ]; then
       echo '{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"try later"}'; exit 3; fi
     echo '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"'$CNI_NETNS'"}],
            "ips":[{"address":"10.42.1.2/24","gateway":"10.42.1.1","interface":0}]}';;
DEL) if [ -e "$FAKE_FAIL_DEL" ]; then echo 'panic'; exit 2; fi;;
esac
"""


@pytest.fixture
def node(tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "bridge").write_text(FAKE)
    (bin_ / "bridge").chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    (tmp_path / "n1.env").write_text(ENV.format())
    for k in list(os.environ):
        if k.startswith("CNI_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", str(tmp_path / "fail"))
    monkeypatch.setenv("FAKE_FAIL_DEL", str(tmp_path / "fail-del"))

    class Node:
        path = tmp_path
        data = tmp_path / "data"

        def config(self, **kw) -> dict:
            return {**BASE, "subnetFile": str(tmp_path / "n1.env"), "dataDir": str(self.data),
                    **kw}

        def call(self, command, config, cid="c1", ifname="eth0", netns="/run/netns/c1",
                 path=None):
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
                   "CNI_NETNS": netns, "CNI_PATH": path or f"/nonexistent:{bin_}"}
            for k, v in env.items():
                if v is None:
                    monkeypatch.delenv(k, raising=False)
                else:
                    monkeypatch.setenv(k, v)
            raw = config if isinstance(config, bytes) else json.dumps(config).encode()
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
            out = io.StringIO()
            monkeypatch.setattr(sys, "stdout", out)
            status = plugin.main()
            text = out.getvalue()
            return status, (json.loads(text) if text.strip() else None)

        def sent(self, command, cid="c1") -> dict:
            return json.loads((log / f"{command}.{cid}.json").read_text())

        def env(self, command, cid="c1") -> str:
            return (log / f"{command}.{cid}.env").read_text()

    return Node()


def test_add_saves_the_delegate_and_prints_its_result(node):
    status, result = node.call("ADD", node.config())
    assert status == 0
    assert result["ips"] == [{"address": "10.42.1.2/24", "gateway": "10.42.1.1", "interface": 0}]
    assert result["cniVersion"] == "1.0.0"
    sent = node.sent("ADD")
    assert sent == cni.delegate_config(conf(), ENV)
    saved = node.data / "c1-eth0"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.data.stat().st_mode) == 0o700
    assert Attachment.from_json(saved.read_bytes(), "x") == Attachment("c1", "eth0", sent)
    assert "CNI_NETNS=/run/netns/c1" in node.env("ADD") and "CNI_IFNAME=eth0" in node.env("ADD")


def test_add_in_1_1_0_speaks_1_0_0_to_plugins_1_1_1_and_answers_1_1_0(node):
    status, result = node.call("ADD", node.config(cniVersion="1.1.0"))
    assert status == 0 and result["cniVersion"] == "1.1.0"
    assert node.sent("ADD")["cniVersion"] == "1.0.0"
    assert node.sent("VERSION", "c1") == {"cniVersion": "1.1.0"}


def test_failed_add_passes_the_error_through_and_undoes_itself(node):
    (node.path / "fail").touch()
    status, result = node.call("ADD", node.config(cniVersion="1.1.0"))
    assert status == 3
    assert result == {"cniVersion": "1.1.0", "code": 11, "msg": "busy", "details": "try later"}
    assert node.sent("DEL")["name"] == "tunl"          # SPEC.md section 4: DEL after a failed ADD
    assert not (node.data / "c1-eth0").exists()


def test_a_second_add_that_fails_keeps_the_first_attachment(node):
    assert node.call("ADD", node.config())[0] == 0
    first = (node.data / "c1-eth0").read_bytes()
    (node.path / "fail").touch()
    assert node.call("ADD", node.config(delegate={"mtu": 1400}))[0] == 3
    assert (node.data / "c1-eth0").read_bytes() == first
    assert not (node.path / "log" / "DEL.c1.json").exists()


def test_del_uses_the_saved_config_and_is_idempotent(node):
    node.call("ADD", node.config())
    (node.path / "n1.env").unlink()                     # the agent is gone: DEL still works
    assert node.call("DEL", node.config(), netns=None) == (0, None)
    assert node.sent("DEL") == node.sent("ADD")
    assert "CNI_NETNS" not in node.env("DEL")
    assert not (node.data / "c1-eth0").exists()
    (node.path / "log" / "DEL.c1.json").unlink()
    assert node.call("DEL", node.config()) == (0, None)
    assert not (node.path / "log" / "DEL.c1.json").exists()


def test_failed_del_keeps_the_attachment_and_says_why(node):
    node.call("ADD", node.config())
    (node.path / "fail-del").touch()
    status, result = node.call("DEL", node.config())
    assert status == 2 and result["code"] == 999 and result["details"] == "panic"
    assert (node.data / "c1-eth0").exists()


def test_del_of_a_garbage_attachment_removes_it(node):
    node.data.mkdir()
    (node.data / "c1-eth0").write_text("garbage")
    assert node.call("DEL", node.config()) == (0, None)
    assert not (node.data / "c1-eth0").exists()


def test_check_sends_the_saved_config_with_the_prev_result(node):
    _, result = node.call("ADD", node.config(cniVersion="1.1.0"))
    assert node.call("CHECK", node.config(cniVersion="1.1.0", prevResult=result)) == (0, None)
    sent = node.sent("CHECK")
    assert sent["prevResult"] == {**result, "cniVersion": "1.0.0"}
    assert sent["cniVersion"] == "1.0.0" and sent["ipam"] == node.sent("ADD")["ipam"]


@pytest.mark.parametrize("case,code,msg", [
    ("no-prev", 7, '"prevResult": required for CHECK'),
    ("not-added", 3, "no attachment of container c1 (eth0)"),
    ("no-agent", 11, '"subnetFile": '),
    ("moved", 7, "the node's subnet is now 10.42.9.0/24 (TUNL_SUBNET)")])
def test_check_fails_when_something_is_missing(node, case, code, msg):
    prev = {"cniVersion": "1.0.0"}
    if case != "not-added":
        node.call("ADD", node.config())
    if case == "no-agent":
        (node.path / "n1.env").unlink()
    if case == "moved":
        (node.path / "n1.env").write_text(SubnetEnv(ENV.network, IPv4Interface("10.42.9.1/24"),
                                                    1480).format())
    status, r = node.call("CHECK", node.config(**({} if case == "no-prev" else
                                                  {"prevResult": prev})))
    assert status == 1 and r["code"] == code and msg in r["msg"], r


def test_gc_deletes_what_the_runtime_no_longer_lists(node):
    for cid in ("c1", "c2", "c3"):
        node.call("ADD", node.config(cniVersion="1.1.0"), cid=cid)
    (node.data / "other-eth0").write_bytes(Attachment("other", "eth0", {
        "name": "another-net", "type": "bridge"}).to_json())
    keep = [{"containerID": "c2", "ifname": "eth0"}]
    status, out = node.call("GC", node.config(cniVersion="1.1.0", **{
        "cni.dev/valid-attachments": keep}), cid=None, ifname=None, netns=None)
    assert (status, out) == (0, None)
    assert sorted(os.listdir(node.data)) == ["c2-eth0", "other-eth0"]
    for cid in ("c1", "c3"):
        env = node.env("DEL", cid)
        assert f"CNI_CONTAINERID={cid}" in env and "CNI_IFNAME=eth0" in env
        assert "CNI_NETNS" not in env
        assert node.sent("DEL", cid)["cniVersion"] == "1.0.0"
    assert not (node.path / "log" / "GC.none.json").exists()     # plugins 1.1.1 have no GC


def test_gc_reports_what_it_could_not_delete_and_goes_on(node):
    node.call("ADD", node.config(cniVersion="1.1.0"), cid="c1")
    (node.path / "fail-del").touch()
    status, r = node.call("GC", node.config(cniVersion="1.1.0", **{
        "cni.dev/valid-attachments": []}), cid=None, ifname=None, netns=None)
    assert status == 1 and r["code"] == 999
    assert r["msg"] == "GC: 1 stale attachment(s) not deleted, they stay for the next GC"
    assert r["details"].startswith("c1/eth0: delegate \"bridge\" exited with status 2")
    assert (node.data / "c1-eth0").exists()


def test_status(node):
    assert node.call("STATUS", node.config(cniVersion="1.1.0")) == (0, None)
    (node.path / "n1.env").unlink()
    status, r = node.call("STATUS", node.config(cniVersion="1.1.0"))
    assert status == 1 and r["code"] == 50
    assert r["msg"].startswith('not available: "subnetFile": ')


@pytest.mark.parametrize("config,code,msg", [
    (b"not json", 6, "network configuration: not JSON"),
    ({"cniVersion": "0.1.0"}, 1, '"cniVersion": "0.1.0" is not one tunl-cni speaks'),
    ({"subnetFile": "/nonexistent/subnet.env"}, 11,
     '"subnetFile": /nonexistent/subnet.env: no such file: is `tunl mesh agent --subnet-file` '
     "running on this node?"),
    ({"delegate": []}, 7, '"delegate": must be a JSON object, not a list'),
    ({"delegate": {"type": "macvlan"}}, 7, '"delegate.type": no plugin "macvlan" in CNI_PATH'),
])
def test_bad_input_is_an_error_result_and_status_1(node, config, code, msg, capsys):
    if isinstance(config, dict):
        config = node.config(**config)
    status, r = node.call("ADD", config)
    assert status == 1 and r["code"] == code and r["msg"].startswith(msg), r
    assert set(r) == {"cniVersion", "code", "msg", "details"}
    assert "Traceback" not in capsys.readouterr().err
    assert not node.data.exists() or not os.listdir(node.data)


def test_garbage_subnet_env_is_code_6(node):
    (node.path / "n1.env").write_text("TUNL_NETWORK=10.42.0.0/16\n")
    status, r = node.call("ADD", node.config())
    assert status == 1 and r["code"] == 6 and "no TUNL_SUBNET, TUNL_MTU" in r["msg"]


def test_a_bug_is_an_error_result_not_a_traceback(node, monkeypatch, capsys):
    monkeypatch.setattr(cni, "delegate_config", lambda c, e: 1 / 0)
    status, r = node.call("ADD", node.config())
    assert status == 1 and r["code"] == 999 and "internal error" in r["msg"]
    assert "Traceback" not in capsys.readouterr().err


def test_version_needs_nothing_but_the_command(node):
    assert node.call("VERSION", b'{"cniVersion": "0.4.0"}', cid=None, ifname=None, netns=None,
                     path="") == (0, {"cniVersion": "0.4.0", "supportedVersions": list(
                         cni.SUPPORTED_VERSIONS)})
