"""The node's lease as a file, as flannel writes /run/flannel/subnet.env (pure, but for the
atomic write):

    TUNL_NETWORK=10.42.0.0/16
    TUNL_SUBNET=10.42.1.1/24
    TUNL_MTU=1480
    TUNL_IPMASQ=false
    TUNL_BRIDGE=mybr0

TUNL_SUBNET is the bridge's address (the containers' gateway) with the subnet's length, as
FLANNEL_SUBNET is; TUNL_MTU the tunnel device's MTU, which every container interface on the
overlay takes. The CNI plugin (`tunl-cni`) reads it; shell scripts can source it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from ..errors import ConfigError

DEFAULT_PATH = "/run/tunl/subnet.env"
KEYS = ("TUNL_NETWORK", "TUNL_SUBNET", "TUNL_MTU", "TUNL_IPMASQ", "TUNL_BRIDGE")


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Interface          # gateway/prefixlen, e.g. 10.42.1.1/24
    mtu: int
    ipmasq: bool = False
    bridge: str = "mybr0"

    def format(self) -> str:
        return (f"TUNL_NETWORK={self.network}\nTUNL_SUBNET={self.subnet}\nTUNL_MTU={self.mtu}\n"
                f"TUNL_IPMASQ={'true' if self.ipmasq else 'false'}\nTUNL_BRIDGE={self.bridge}\n")

    @classmethod
    def parse(cls, text: str, where: str = DEFAULT_PATH) -> "SubnetEnv":
        """ConfigError naming the file, the key and the rule for anything else."""
        d: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, eq, value = line.partition("=")
            if not eq:
                raise ConfigError(f"{where} line {n}: not KEY=VALUE")
            d[key.strip()] = value.strip()
        missing = [k for k in KEYS[:3] if k not in d]
        if missing:
            raise ConfigError(f"{where}: no {', '.join(missing)} (is the mesh agent running?)")
        try:
            network = IPv4Network(d["TUNL_NETWORK"])
        except ValueError:
            raise ConfigError(f'{where}: TUNL_NETWORK "{d["TUNL_NETWORK"]}" is not an IPv4 '
                              "network") from None
        try:
            subnet = IPv4Interface(d["TUNL_SUBNET"])
        except ValueError:
            raise ConfigError(f'{where}: TUNL_SUBNET "{d["TUNL_SUBNET"]}" is not an IPv4 '
                              "address/prefix") from None
        if not subnet.network.subnet_of(network):
            raise ConfigError(f"{where}: TUNL_SUBNET {subnet} is not inside TUNL_NETWORK "
                              f"{network}")
        if not d["TUNL_MTU"].isdigit() or not 68 <= int(d["TUNL_MTU"]) <= 65535:
            raise ConfigError(f'{where}: TUNL_MTU "{d["TUNL_MTU"]}" is not an MTU (68-65535)')
        masq = d.get("TUNL_IPMASQ", "false")
        if masq not in ("true", "false"):
            raise ConfigError(f'{where}: TUNL_IPMASQ "{masq}" is true or false')
        return cls(network, subnet, int(d["TUNL_MTU"]), masq == "true",
                   d.get("TUNL_BRIDGE") or "mybr0")


def read(path: str = DEFAULT_PATH) -> SubnetEnv:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (is the mesh agent running on this "
                          "node?)") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return SubnetEnv.parse(text, path)


def write(env: SubnetEnv, path: str = DEFAULT_PATH) -> bool:
    """Replace the file atomically (a reader never sees half of it); whether it changed."""
    text = env.format()
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except OSError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True
