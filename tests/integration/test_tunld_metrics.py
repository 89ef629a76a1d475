"""tunld --metrics: Prometheus metrics of every tunnel, drops by reason included, equal to
what `tunl -s tunnel show` counts; on both data planes."""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

from nsutil import A_UL, B_UL, Net

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("dataplane")]

TUNLD = os.path.join(os.path.dirname(sys.executable), "tunld")
PORT = 9465


def scrape(h) -> str:
    p = h.run("python3 -c 'import urllib.request;print(urllib.request.urlopen("
              f"\"http://127.0.0.1:{PORT}/metrics\").read().decode())'", check=False)
    return p.stdout if p.returncode == 0 else ""


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_tunld_serves_tunnel_counters_and_drops_by_reason():
    net = Net()
    try:
        a, b = net.host("A"), net.host("B")
        net.underlay({a: f"{A_UL}/16", b: f"{B_UL}/16"})
        a.popen(f"{TUNLD} --metrics 127.0.0.1:{PORT}")
        time.sleep(0.5)
        for h, me, peer, mine, theirs in ((a, A_UL, B_UL, "10.42.1", "10.42.2"),
                                          (b, B_UL, A_UL, "10.42.2", "10.42.1")):
            h.tunl(f"tunnel add tunl0 mode ipip remote {peer} local {me}")
            h.run(f"ip addr add {mine}.1/24 dev tunl0 && ip link set tunl0 up && "
                  f"ip route add {theirs}.0/24 dev tunl0")
        assert a.ping("10.42.2.1", count=3).returncode == 0
        b.send_raw(4, A_UL, [b"\x45\x00\x00"] * 7)          # truncated inner headers
        time.sleep(0.5)
        text = scrape(a)
        stats = a.counters()
        assert metric(text, "tunl_tunnel_rx_packets_total", dev="tunl0") == stats["rx_packets"] >= 3
        assert metric(text, "tunl_tunnel_tx_packets_total", dev="tunl0") == stats["tx_packets"] >= 3
        assert stats["rx_drop"], stats
        for reason, n in stats["rx_drop"].items():
            assert metric(text, "tunl_tunnel_drops_total", dev="tunl0", dir="rx",
                          reason=reason) == n
        assert sum(stats["rx_drop"].values()) >= 7
        assert re.search(r'^tunl_tunnel_up\{dataplane="(ebpf|userspace)",dev="tunl0"\} 1\.0$',
                         text, re.M), text
    finally:
        net.close()
