"""tunl-cni's words, as flannel's CNI plugin (flannel-io/cni-plugin, flannel_linux.go) has
them: the network configuration, the delegate's configuration built from the node's lease
(subnet.env), the attachment saved for DEL, and the CNI error. Pure: no I/O.

    {"cniVersion": "1.0.0", "name": "tunl", "type": "tunl-cni"}

becomes, on a node whose lease is 10.42.1.0/24 of 10.42.0.0/16 with TUNL_MTU=1480,

    {"cniVersion": "1.0.0", "name": "tunl", "type": "bridge", "bridge": "mybr0", "mtu": 1480,
     "isGateway": true, "isDefaultGateway": true, "hairpinMode": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.42.1.0/24",
                                                 "gateway": "10.42.1.1"}]],
              "routes": [{"dst": "10.42.0.0/16", "gw": "10.42.1.1"}]}}

`delegate` is merged over the delegate's defaults and `ipam` over the IPAM's (key by key);
`name`, `cniVersion` and `ipam` are the network's and may not be set in `delegate`.
"""
from __future__ import annotations

import json
import re

from ..errors import TunlError

TYPE_CHECKING = False
if TYPE_CHECKING:                       # typing costs start-up time; the plugin runs per pod
    from collections.abc import Iterable, Mapping

    from .subnetenv import SubnetEnv

PLUGIN_TYPE = "tunl-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
DEFAULT_SUBNET_FILE = "/run/tunl/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/tunl"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
VALID_ATTACHMENTS = "cni.dev/valid-attachments"

# the spec's error codes (SPEC.md, section 5, "Error")
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50                      # STATUS: cannot service ADD
INTERNAL = 999                          # libcni's ErrInternal: a bug, or a delegate that crashed

# the versions whose results have the same shape: a delegate that does not speak the first
# (plugins 1.1.1 stop at 1.0.0) is spoken to in the second, and its result relabelled
SAME_RESULT = {"1.1.0": "1.0.0"}

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*\Z")       # libcni utils.cniValidNameChars
_VERSION = re.compile(r"\d+\.\d+\.\d+\Z")
_NAME_RULE = 'a letter or digit, then letters, digits, "_", "." or "-"'
IFNAMSIZ = 16


class CNIError(TunlError):
    """An error as the CNI spec returns it: `code` is the spec's, `msg` names the field (or
    variable, or file) and the rule it broke, `details` adds what the caller may want."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def result(self, version: str = LATEST) -> dict:
        return {"cniVersion": version, "code": self.code, "msg": self.msg,
                "details": self.details}


def _what(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _bad(fieldname: str, rule: str, details: str = "", code: int = INVALID_CONFIG) -> CNIError:
    return CNIError(code, f'"{fieldname}": {rule}', details)


def _object(v, fieldname: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(fieldname, f"must be a JSON object, not {_what(v)}")
    return v


def _string(v, fieldname: str) -> str:
    if not isinstance(v, str) or not v:
        raise _bad(fieldname, f"must be a non-empty string, not {_what(v) if v != '' else 'empty'}")
    return v


class _Value:
    """A frozen value with named fields, compared by value: what a frozen dataclass gives,
    without importing dataclasses (and inspect), which would double the plugin's start-up."""
    __slots__ = ()
    FIELDS: tuple[str, ...] = ()
    DEFAULTS: tuple = ()

    def __init__(self, *args, **kw):
        if len(args) > len(self.FIELDS):
            raise TypeError(f"{type(self).__name__}: {len(args)} values for {self.FIELDS}")
        vals = dict(zip(self.FIELDS, args), **kw)
        for name, default in zip(self.FIELDS, self.DEFAULTS):
            v = vals.pop(name, default)
            if v is _REQUIRED:
                raise TypeError(f"{type(self).__name__}: {name} is required")
            object.__setattr__(self, name, v)
        if vals:
            raise TypeError(f"{type(self).__name__}: no field {', '.join(sorted(vals))}")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is frozen")

    def _tuple(self) -> tuple:
        return tuple(getattr(self, n) for n in self.FIELDS)

    def __eq__(self, other):
        return type(other) is type(self) and other._tuple() == self._tuple()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{n}={getattr(self, n)!r}"
                                                     for n in self.FIELDS) + ")"

    __hash__ = None


_REQUIRED = object()                    # a field without a default


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


# ---------------------------------------------------------------------------------- the call

class Invocation(_Value):
    """The CNI_* environment of one call, checked as libcni's skel checks it."""
    FIELDS = ("command", "container_id", "netns", "ifname", "args", "path")
    DEFAULTS = (_REQUIRED, "", "", "", "", ())
    __slots__ = FIELDS
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    path: tuple[str, ...]

    # which variables each command needs (SPEC.md section 2; skel.getCmdArgsFromEnv)
    REQUIRED = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
                "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
                "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
                "GC": ("CNI_PATH",), "STATUS": (), "VERSION": ()}

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Invocation:
        cmd = env.get("CNI_COMMAND", "")
        if not cmd:
            raise CNIError(INVALID_ENV, "CNI_COMMAND: not set (one of " + ", ".join(COMMANDS)
                           + "); tunl-cni is run by a container runtime")
        if cmd not in COMMANDS:
            raise CNIError(INVALID_ENV, f'CNI_COMMAND "{cmd}": not one of ' + ", ".join(COMMANDS))
        need = cls.REQUIRED[cmd]
        missing = [v for v in need if not env.get(v)]
        if missing:
            raise CNIError(INVALID_ENV, f"{', '.join(missing)}: required for {cmd}, not set")
        cid, ifname = env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
        if "CNI_CONTAINERID" in need and not _NAME.match(cid):
            raise CNIError(INVALID_ENV, f'CNI_CONTAINERID "{cid}": must be {_NAME_RULE}')
        if "CNI_IFNAME" in need and not valid_ifname(ifname):
            raise CNIError(INVALID_ENV, f'CNI_IFNAME "{ifname}": {IFNAME_RULE}')
        path = tuple(p for p in env.get("CNI_PATH", "").split(":") if p)
        return cls(cmd, cid, env.get("CNI_NETNS", ""), ifname, env.get("CNI_ARGS", ""), path)


IFNAME_RULE = 'a device name is 1-15 characters, not "." or "..", without "/", ":" or spaces'


def valid_ifname(name: str) -> bool:
    """The kernel's rules for a device name (dev_valid_name())."""
    return bool(name) and len(name) < IFNAMSIZ and name not in (".", "..") and not any(
        c in "/:" or c.isspace() for c in name)


# ------------------------------------------------------------------------ the network config

class NetConf(_Value):
    """tunl-cni's network configuration (the plugin object of a CNI 1.0 configuration list,
    with what the runtime adds: runtimeConfig, prevResult, cni.dev/valid-attachments)."""
    FIELDS = ("cni_version", "name", "subnet_file", "data_dir", "delegate", "ipam",
              "runtime_config", "prev_result", "valid_attachments")
    DEFAULTS = (_REQUIRED, _REQUIRED, DEFAULT_SUBNET_FILE, DEFAULT_DATA_DIR, {}, {}, None, None,
                None)
    __slots__ = FIELDS
    cni_version: str
    name: str
    subnet_file: str
    data_dir: str
    delegate: dict
    ipam: dict
    runtime_config: dict | None
    prev_result: dict | None
    valid_attachments: frozenset[tuple[str, str]] | None     # GC only

    @classmethod
    def parse(cls, data: bytes | str) -> NetConf:
        """The configuration on stdin, or a CNIError: 6 when it is not a JSON object, 1 for
        a cniVersion tunl-cni does not speak, 7 for anything else, naming the field."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CNIError(DECODE_FAILURE, "network configuration: not JSON", str(e)) from None
        if not isinstance(d, dict):
            raise CNIError(DECODE_FAILURE, f"network configuration: must be a JSON object, "
                           f"not {_what(d)}")
        if "cniVersion" not in d:
            raise _bad("cniVersion", "required (one of " + ", ".join(SUPPORTED_VERSIONS) + ")")
        version = d["cniVersion"]
        if not isinstance(version, str):
            raise _bad("cniVersion", f"must be a string, not {_what(version)}")
        if version not in SUPPORTED_VERSIONS:
            raise CNIError(INCOMPATIBLE_VERSION, f'"cniVersion": "{version}" is not one tunl-cni '
                           "speaks (" + ", ".join(SUPPORTED_VERSIONS) + ")",
                           "incompatible CNI versions")
        name = d.get("name")
        if name is None:
            raise _bad("name", "required: the network's name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad("name", f"must be {_NAME_RULE}, not {json.dumps(name)}")
        if "type" not in d:
            raise _bad("type", f'required: "{PLUGIN_TYPE}"')
        typ = d["type"]
        if typ != PLUGIN_TYPE:
            raise _bad("type", f'must be "{PLUGIN_TYPE}" (this plugin), not {json.dumps(typ)}')
        paths = {}
        for key, default in (("subnetFile", DEFAULT_SUBNET_FILE), ("dataDir", DEFAULT_DATA_DIR)):
            v = d.get(key, default)
            if not isinstance(v, str) or not v.startswith("/"):
                raise _bad(key, f"must be an absolute path, not {json.dumps(v)}")
            paths[key] = v
        delegate = _delegate(d.get("delegate", {}))
        ipam = _object(d.get("ipam", {}), "ipam")
        if "type" in ipam:
            _plugin_type(ipam["type"], "ipam.type")
        rc = d.get("runtimeConfig")
        if rc is not None:
            _object(rc, "runtimeConfig")
        prev = d.get("prevResult")
        if prev is not None:
            _object(prev, "prevResult")
        valid = None
        if VALID_ATTACHMENTS in d:
            valid = _attachments(d[VALID_ATTACHMENTS])
        return cls(version, name, paths["subnetFile"], paths["dataDir"], delegate, ipam, rc, prev,
                   valid)

    def allows(self, command: str) -> None:
        """The spec's versions of each command (skel.pluginMain): CHECK from 0.4.0, GC and
        STATUS from 1.1.0; GC needs the runtime's list of valid attachments."""
        since = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
        if since and version_key(self.cni_version) < version_key(since):
            raise CNIError(INCOMPATIBLE_VERSION, f'"cniVersion": {self.cni_version} does not '
                           f"allow {command} (it came with {since})")
        if command == "GC" and self.valid_attachments is None:
            raise _bad(VALID_ATTACHMENTS, "required for GC: the attachments to keep")


def asked_version(data: bytes | str) -> str | None:
    """The cniVersion a configuration asks for, if it is one tunl-cni speaks (for the error
    result of a configuration that is otherwise bad)."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    v = d.get("cniVersion") if isinstance(d, dict) else None
    return v if v in SUPPORTED_VERSIONS else None


def version_result(data: bytes | str) -> dict:
    """VERSION's answer: the version asked on input (SPEC.md section 5) and tunl-cni's."""
    try:
        d = json.loads(data) if data.strip() else {}
    except (ValueError, UnicodeDecodeError):
        d = {}
    v = d.get("cniVersion") if isinstance(d, dict) else None
    return {"cniVersion": v if isinstance(v, str) and _VERSION.match(v) else LATEST,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def _plugin_type(v, fieldname: str) -> str:
    # the name of an executable looked up in CNI_PATH: never a path
    if not isinstance(v, str) or not _NAME.match(v):
        raise _bad(fieldname, f"must be a plugin's name ({_NAME_RULE}), not {json.dumps(v)}")
    return v


_BOOLS = ("isGateway", "isDefaultGateway", "hairpinMode", "ipMasq")


def _delegate(v) -> dict:
    d = _object(v, "delegate")
    # flannel's rules (cmdAdd): the network's name and IPAM are the network's own
    for key, why in (("name", "set by tunl-cni to the network's name"),
                     ("cniVersion", "set by tunl-cni to the network's cniVersion"),
                     ("ipam", 'set by tunl-cni from the node\'s lease; use the top-level "ipam"')):
        if key in d:
            raise _bad(f"delegate.{key}", f"must not be set: {why}")
    if "type" in d:
        if _plugin_type(d["type"], "delegate.type") == PLUGIN_TYPE:
            raise _bad("delegate.type", f'must not be "{PLUGIN_TYPE}": it would call itself')
    if "bridge" in d:
        if not isinstance(d["bridge"], str) or not valid_ifname(d["bridge"]):
            raise _bad("delegate.bridge", f"{json.dumps(d['bridge'])}: {IFNAME_RULE}")
    if "mtu" in d:
        m = d["mtu"]
        if isinstance(m, bool) or not isinstance(m, int) or not 68 <= m <= 65535:
            raise _bad("delegate.mtu", f"must be an MTU (68-65535), not {json.dumps(m)}")
    for key in _BOOLS:
        if key in d and not isinstance(d[key], bool):
            raise _bad(f"delegate.{key}", f"must be true or false, not {json.dumps(d[key])}")
    return d


def _attachments(v) -> frozenset[tuple[str, str]]:
    if not isinstance(v, list):
        raise _bad(VALID_ATTACHMENTS, f"must be a list of objects, not {_what(v)}")
    out = set()
    for i, a in enumerate(v):
        _object(a, f"{VALID_ATTACHMENTS}[{i}]")
        for key in ("containerID", "ifname"):
            _string(a.get(key), f"{VALID_ATTACHMENTS}[{i}].{key}")
        out.add((a["containerID"], a["ifname"]))
    return frozenset(out)


# --------------------------------------------------------------------------------- delegate

def delegate_config(conf: NetConf, env: SubnetEnv) -> dict:
    """The configuration handed to the delegate (flannel's doCmdAdd and getDelegateIPAM):
    its defaults, then `delegate` over them; the IPAM's defaults, then `ipam` over them."""
    d: dict = {"cniVersion": conf.cni_version, "name": conf.name, "type": "bridge"}
    typ = conf.delegate.get("type", "bridge")
    if typ == "bridge":
        # kube-flannel's defaults; the gateway is the bridge the agent made
        d.update(bridge=env.bridge, mtu=env.mtu, isGateway=True, isDefaultGateway=True,
                 hairpinMode=True, ipMasq=False)
    else:
        d.update(mtu=env.mtu, ipMasq=False)
    # ipMasq stays off unless asked: the agent masquerades itself (TUNL_IPMASQ)
    d.update(conf.delegate)
    gw = str(env.subnet.ip)
    # the route names its gateway: plugins before 1.3.0 fail CHECK on a route without one
    # (ip.ValidateExpectedRoute, containernetworking/plugins#886)
    ipam: dict = {"type": "host-local",
                  "ranges": [[{"subnet": str(env.subnet.network), "gateway": gw}]],
                  "routes": [{"dst": str(env.network), "gw": gw}]}
    ipam.update(conf.ipam)
    if ipam["type"] == "host-local" and "ranges" in conf.ipam:
        _check_ranges(ipam["ranges"], env)
    d["ipam"] = ipam
    if conf.runtime_config is not None:
        d["runtimeConfig"] = conf.runtime_config
    return d


def _check_ranges(ranges, env: SubnetEnv) -> None:
    from ipaddress import IPv4Network
    mine = env.subnet.network
    if not isinstance(ranges, list) or not ranges:
        raise _bad("ipam.ranges", f"must be a non-empty list of range sets, not {_what(ranges)}")
    for i, rset in enumerate(ranges):
        if not isinstance(rset, list) or not rset:
            raise _bad(f"ipam.ranges[{i}]", f"must be a non-empty list of ranges, not {_what(rset)}")
        for j, r in enumerate(rset):
            where = f"ipam.ranges[{i}][{j}]"
            _object(r, where)
            s = _string(r.get("subnet"), where + ".subnet")
            try:
                net = IPv4Network(s)
            except ValueError:
                raise _bad(where + ".subnet", f'"{s}" is not an IPv4 network') from None
            if not net.subnet_of(mine):
                raise _bad(where + ".subnet", f"{net} is not inside this node's subnet {mine} "
                           "(TUNL_SUBNET): the overlay routes only that here")


def delegate_version(asked: str, supported: Iterable[str], typ: str) -> str:
    """The version to speak with a delegate that speaks `supported`: the asked one, else one
    whose result has the same shape."""
    supported = set(supported)
    if asked in supported:
        return asked
    if SAME_RESULT.get(asked) in supported:
        return SAME_RESULT[asked]
    raise CNIError(INCOMPATIBLE_VERSION, f'"delegate.type": plugin "{typ}" speaks CNI '
                   f"{', '.join(sorted(supported, key=version_key))}, not {asked}")


def relabel(result: dict, version: str) -> dict:
    """The result in `version` when its shape is the same (SAME_RESULT), else unchanged."""
    have = result.get("cniVersion")
    if SAME_RESULT.get(have, have) == SAME_RESULT.get(version, version):
        return {**result, "cniVersion": version}
    return result


def with_prev_result(delegate: dict, prev: dict) -> dict:
    """The saved delegate configuration for CHECK: with the ADD's result, in its version."""
    return {**delegate, "prevResult": relabel(prev, delegate.get("cniVersion", LATEST))}


def delegate_failure(typ: str, status: int, out: bytes, version: str) -> tuple[dict, int]:
    """What to print for a delegate that failed, and the exit status: its own error result
    (in the version asked), or one that says it gave none."""
    try:
        r = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        r = None
    if isinstance(r, dict) and isinstance(r.get("code"), int):
        return {**r, "cniVersion": version}, status or 1
    tail = out[-400:].decode("utf-8", "replace").strip()
    e = CNIError(INTERNAL, f'delegate "{typ}" exited with status {status} and no error result',
                 tail)
    return e.result(version), status or 1


def check_lease(delegate: dict, env: SubnetEnv) -> None:
    """CHECK: the attachment's addresses are still inside the node's subnet (a node that lost
    its lease and took another routes the old subnet nowhere)."""
    from ipaddress import IPv4Network
    try:
        subnet = IPv4Network(delegate["ipam"]["ranges"][0][0]["subnet"])
    except (KeyError, IndexError, TypeError, ValueError):
        return                           # an IPAM of the operator's: nothing to compare
    if not subnet.subnet_of(env.subnet.network):
        raise CNIError(INVALID_CONFIG, f"the node's subnet is now {env.subnet.network} "
                       f"(TUNL_SUBNET), this attachment's addresses are from {subnet}: the "
                       "overlay no longer routes them here; recreate the container")


# ------------------------------------------------------------------------------ attachments

class Attachment(_Value):
    """What ADD saves as <dataDir>/<containerID>-<ifname>, so that DEL and GC find the
    delegate's configuration after subnet.env has changed or gone (flannel's scratch netconf).
    The file holds the delegate's configuration as sent, and the attachment it belongs to."""
    FIELDS = ("container_id", "ifname", "delegate")
    DEFAULTS = (_REQUIRED, _REQUIRED, _REQUIRED)
    __slots__ = FIELDS
    container_id: str
    ifname: str
    delegate: dict

    @property
    def filename(self) -> str:
        return filename(self.container_id, self.ifname)

    @property
    def network(self) -> str:
        return self.delegate.get("name", "")

    def to_json(self) -> bytes:
        return json.dumps({"containerID": self.container_id, "ifname": self.ifname,
                           "delegate": self.delegate}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Attachment:
        try:
            d = json.loads(data)
            a = cls(d["containerID"], d["ifname"], d["delegate"])
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            raise CNIError(DECODE_FAILURE, f"{where}: not an attachment saved by tunl-cni") from None
        if not (isinstance(a.container_id, str) and isinstance(a.ifname, str)
                and isinstance(a.delegate, dict) and _NAME.match(a.delegate.get("type", ""))):
            raise CNIError(DECODE_FAILURE, f"{where}: not an attachment saved by tunl-cni")
        return a


def filename(container_id: str, ifname: str) -> str:
    return f"{container_id}-{ifname}"


def stale(saved: Iterable[Attachment], network: str,
          valid: frozenset[tuple[str, str]]) -> list[Attachment]:
    """GC's plan: the attachments of this network that the runtime no longer lists."""
    return sorted((a for a in saved if a.network == network
                   and (a.container_id, a.ifname) not in valid),
                  key=lambda a: (a.container_id, a.ifname))
