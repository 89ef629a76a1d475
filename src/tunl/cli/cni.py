"""`tunl-cni`: the CNI plugin of the mesh, run by a container runtime once per call.

It reads the node's lease from subnet.env (written by `tunl mesh agent --subnet-file`),
builds a `bridge` configuration on the agent's bridge with host-local addresses from the
node's subnet (tunl.mesh.cni), and runs that plugin from CNI_PATH, as flannel's CNI plugin
does. ADD saves what it sent as <dataDir>/<containerID>-<ifname>, and DEL, CHECK and GC use
the saved configuration, so they work after subnet.env has changed or gone.

Every failure is a CNI error result on stdout and exit status 1 (or the failed delegate's
own result and status); stderr carries the delegates' logs. Imports are kept to what a call
needs: the runtime starts the plugin for every pod.
"""
from __future__ import annotations

import json
import os
import sys

from ..mesh import cni
from ..mesh.cni import CNIError

USAGE = """\
tunl-cni: the CNI plugin of the tunl mesh, run by a container runtime (CNI_COMMAND=ADD|DEL|
CHECK|GC|STATUS|VERSION, the network configuration on stdin). See README.md, "The mesh".
"""


class DelegateFailed(Exception):
    """A delegate's error result, to pass through with its exit status."""

    def __init__(self, result: dict, status: int):
        super().__init__(result.get("msg", ""))
        self.result, self.status = result, status


def main() -> int:
    stdout = sys.stdout
    raw = b""
    try:
        if os.environ.get("CNI_COMMAND") == "VERSION":
            raw = _stdin()
            _print(stdout, cni.version_result(raw))
            return 0
        inv = cni.Invocation.from_env(os.environ)
        raw = _stdin()
        conf = cni.NetConf.parse(raw)
        conf.allows(inv.command)
        return COMMANDS[inv.command](inv, conf, stdout)
    except CNIError as e:
        if e.code == cni.INVALID_ENV and not os.environ.get("CNI_COMMAND"):
            sys.stderr.write(USAGE)
        _print(stdout, e.result(cni.asked_version(raw) or cni.LATEST))
        return 1
    except DelegateFailed as e:
        _print(stdout, e.result)
        return e.status
    except Exception as e:   # a bug: still an error result, never a traceback
        sys.stderr.write(f"tunl-cni: internal error: {e!r}\n")
        _print(stdout, CNIError(cni.INTERNAL, f"tunl-cni: internal error: {e}").result(
            cni.asked_version(raw) or cni.LATEST))
        return 1


def _stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except (OSError, AttributeError, ValueError) as e:
        raise CNIError(cni.IO_FAILURE, f"stdin: cannot read the network configuration: {e}") \
            from None


def _print(out, result: dict) -> None:
    out.write(json.dumps(result) + "\n")
    out.flush()


# ------------------------------------------------------------------------------ the commands

def add(inv: cni.Invocation, conf: cni.NetConf, out) -> int:
    env = load_subnet_env(conf.subnet_file)
    delegate = cni.delegate_config(conf, env)
    typ = delegate["type"]
    plugin = find_plugin(typ, inv.path)
    if conf.cni_version in cni.SAME_RESULT:
        # a delegate may not speak the newest version: ask it (plugins 1.1.1 stop at 1.0.0)
        supported = _run(plugin, "VERSION", {"cniVersion": conf.cni_version}, inv)
        delegate["cniVersion"] = cni.delegate_version(
            conf.cni_version, supported.get("supportedVersions", ()), typ)
    att = cni.Attachment(inv.container_id, inv.ifname, delegate)
    path = os.path.join(conf.data_dir, att.filename)
    before = _read(path)
    save(path, att.to_json())
    try:
        result = _run(plugin, "ADD", delegate, inv, version=conf.cni_version)
    except DelegateFailed:
        if before is None:
            # SPEC.md section 4: a failed delegated ADD is followed by its DEL
            try:
                _run(plugin, "DEL", delegate, inv)
            except (DelegateFailed, CNIError):
                pass
            _remove(path)
        else:                            # a second ADD: the first attachment stays as it was
            save(path, before)
        raise
    _print(out, cni.relabel(result, conf.cni_version))
    return 0


def delete(inv: cni.Invocation, conf: cni.NetConf, out) -> int:
    path = os.path.join(conf.data_dir, cni.filename(inv.container_id, inv.ifname))
    data = _read(path)
    if data is None:
        return 0                         # nothing saved: already deleted (DEL is idempotent)
    try:
        att = cni.Attachment.from_json(data, path)
    except CNIError as e:
        # as flannel: the delegate cannot be called without it; the rest goes with the node
        sys.stderr.write(f"tunl-cni: {e.msg}; removed\n")
        _remove(path)
        return 0
    _run(find_plugin(att.delegate["type"], inv.path), "DEL", att.delegate, inv,
         version=conf.cni_version)
    _remove(path)
    return 0


def check(inv: cni.Invocation, conf: cni.NetConf, out) -> int:
    if conf.prev_result is None:
        raise CNIError(cni.INVALID_CONFIG, '"prevResult": required for CHECK: the result of '
                       "the container's ADD")
    path = os.path.join(conf.data_dir, cni.filename(inv.container_id, inv.ifname))
    data = _read(path)
    if data is None:
        raise CNIError(cni.UNKNOWN_CONTAINER, f"{path}: no attachment of container "
                       f"{inv.container_id} ({inv.ifname}): it was not added with this dataDir")
    att = cni.Attachment.from_json(data, path)
    cni.check_lease(att.delegate, load_subnet_env(conf.subnet_file))
    _run(find_plugin(att.delegate["type"], inv.path), "CHECK",
         cni.with_prev_result(att.delegate, conf.prev_result), inv, version=conf.cni_version)
    return 0


def gc(inv: cni.Invocation, conf: cni.NetConf, out) -> int:
    """SPEC.md "GC": DEL every saved attachment of this network the runtime no longer lists,
    without a netns (it is gone), and keep going past a failure."""
    saved = []
    try:
        names = sorted(os.listdir(conf.data_dir))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise CNIError(cni.IO_FAILURE, f"{conf.data_dir}: {e.strerror}") from None
    for name in names:
        if name.startswith("."):
            continue                     # a save under way
        path = os.path.join(conf.data_dir, name)
        data = _read(path)
        if data is None:
            continue
        try:
            saved.append(cni.Attachment.from_json(data, path))
        except CNIError as e:
            sys.stderr.write(f"tunl-cni: GC: {e.msg}; left alone\n")
    failed = []
    for att in cni.stale(saved, conf.name, conf.valid_attachments or frozenset()):
        one = cni.Invocation("DEL", att.container_id, "", att.ifname, "", inv.path)
        try:
            _run(find_plugin(att.delegate["type"], inv.path), "DEL", att.delegate, one)
        except (CNIError, DelegateFailed) as e:
            r = e.result(conf.cni_version) if isinstance(e, CNIError) else e.result
            failed.append((att, r))
            continue
        _remove(os.path.join(conf.data_dir, att.filename))
    if failed:
        first = failed[0][1]
        raise CNIError(first.get("code", cni.INTERNAL) if isinstance(first.get("code"), int)
                       else cni.INTERNAL,
                       f"GC: {len(failed)} stale attachment(s) not deleted, they stay for the "
                       "next GC", "; ".join(f"{a.container_id}/{a.ifname}: {r.get('msg')}"
                                            for a, r in failed))
    return 0


def status(inv: cni.Invocation, conf: cni.NetConf, out) -> int:
    try:
        load_subnet_env(conf.subnet_file)
    except CNIError as e:
        raise CNIError(cni.NOT_AVAILABLE, f"not available: {e.msg}", e.details) from None
    return 0


COMMANDS = {"ADD": add, "DEL": delete, "CHECK": check, "GC": gc, "STATUS": status}


# ---------------------------------------------------------------------------- files, plugins

def load_subnet_env(path: str):
    """The node's lease, or a CNIError: 11 while the agent has not written it (yet), 5 when
    it cannot be read, 6 when it does not parse."""
    from ..errors import ConfigError
    from ..mesh.subnetenv import SubnetEnv
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise CNIError(cni.TRY_AGAIN_LATER, f'"subnetFile": {path}: no such file: is '
                       "`tunl mesh agent --subnet-file` running on this node?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CNIError(cni.IO_FAILURE, f'"subnetFile": {path}: '
                       f"{getattr(e, 'strerror', None) or e}") from None
    try:
        return SubnetEnv.parse(text, path)
    except ConfigError as e:
        raise CNIError(cni.DECODE_FAILURE, f'"subnetFile": {e}') from None


def find_plugin(typ: str, path: tuple[str, ...]) -> str:
    for d in path:
        exe = os.path.join(d, typ)
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    raise CNIError(cni.INVALID_CONFIG, f'"delegate.type": no plugin "{typ}" in CNI_PATH '
                   f"{':'.join(path) or '(empty)'}")


def _run(exe: str, command: str, conf: dict, inv: cni.Invocation, version: str | None = None):
    """Run a delegate as SPEC.md section 4 says: our environment with CNI_COMMAND (and, for
    GC, the attachment's own), the configuration on stdin, its stderr ours. Its result, or
    DelegateFailed with its error result in `version`."""
    import subprocess
    env = dict(os.environ)
    env["CNI_COMMAND"] = command
    if command != "VERSION":
        env.update(CNI_CONTAINERID=inv.container_id, CNI_IFNAME=inv.ifname,
                   CNI_PATH=":".join(inv.path))
        if inv.netns:
            env["CNI_NETNS"] = inv.netns
        else:
            env.pop("CNI_NETNS", None)
    try:
        p = subprocess.run([exe], input=json.dumps(conf).encode(), stdout=subprocess.PIPE,
                           env=env, check=False)
    except OSError as e:
        raise CNIError(cni.IO_FAILURE, f"{exe}: cannot run: {e.strerror}") from None
    typ = os.path.basename(exe)
    if p.returncode != 0:
        raise DelegateFailed(*cni.delegate_failure(typ, p.returncode, p.stdout,
                                                   version or conf.get("cniVersion", cni.LATEST)))
    if not p.stdout.strip():
        return {}
    try:
        r = json.loads(p.stdout)
    except (ValueError, UnicodeDecodeError):
        r = None
    if not isinstance(r, dict):
        raise CNIError(cni.DECODE_FAILURE, f'delegate "{typ}" {command}: its result is not a '
                       "JSON object", p.stdout[-400:].decode("utf-8", "replace"))
    return r


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CNIError(cni.IO_FAILURE, f"{path}: {e.strerror}") from None


def save(path: str, data: bytes) -> None:
    """Write atomically, readable by root only (0600; the directory 0700), synced."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CNIError(cni.IO_FAILURE, f'"dataDir": {path}: {e.strerror}') from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CNIError(cni.IO_FAILURE, f"{path}: {e.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
