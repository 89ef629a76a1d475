"""Output in the words of `ip tunnel show` (print_tunnel()) and `ip -s tunnel show`."""
from __future__ import annotations

from ..model import TunnelMode, TunnelSpec
from .grammar import dsfield_n2a


def tunnel_line(spec: TunnelSpec) -> str:
    parts = [f"{spec.name}: {spec.mode.show_name}/ip",
             f"remote {spec.remote or 'any'}", f"local {spec.local or 'any'}"]
    for addr, default in spec.prl:        # as iproute2 6.1 prints them, seen in the interop guest
        parts.append(f"{'pdr' if default else 'pr'} {addr}")
    if spec.dev:
        parts.append(f"dev {spec.dev}")
    parts.append(f"ttl {spec.ttl}" if spec.ttl else "ttl inherit")
    if spec.tos:
        parts.append(f"tos {tos_word(spec.tos)}")
    if not spec.pmtudisc:
        parts.append("nopmtudisc")
    if spec.mode in (TunnelMode.SIT, TunnelMode.ISATAP):
        prefix, relay = spec.sixrd
        if prefix.prefixlen:
            parts.append(f"6rd-prefix {prefix}")
            if int(relay.network_address):
                parts.append(f"6rd-relay_prefix {relay}")
    if spec.mode is TunnelMode.GRE:
        if spec.ikey is not None and spec.ikey == spec.okey:
            parts.append(f"key {spec.ikey}")
        else:
            if spec.ikey is not None:
                parts.append(f"ikey {spec.ikey}")
            if spec.okey is not None:
                parts.append(f"okey {spec.okey}")
    line = " ".join(parts)
    for flag, text in (("iseq", "Drop packets out of sequence."),
                       ("icsum", "Checksum in received packet is required."),
                       ("oseq", "Sequence packets on output."),
                       ("ocsum", "Checksum output packets.")):
        if getattr(spec, flag):
            line += "\n  " + text
    return line


def tos_word(tos: int) -> str:
    """The TOS of print_tunnel(): inherit (1), inherit/T (bit 0 and a DS field) or T, where
    T is the rt_dsfield name of the DS field or 0x%02x (rtnl_dsfield_n2a())."""
    if tos == 1:
        return "inherit"
    if tos & 1:
        return "inherit/" + dsfield_n2a(tos & ~1)
    return dsfield_n2a(tos)


def selected(spec: dict, f: dict) -> bool:
    """Whether `tunl tunnel show WORDS` lists the tunnel of spec (a TunnelSpec.to_dict()),
    f being what grammar.parse_show() made of the words. ip_tunnel_parm_match() compares
    dev (the link), name, remote, local and ikey (`key N` sets ikey and okey, `okey N` alone
    filters nothing), each only where the words give it: any, 0 or left out is any. tunl
    also compares the mode (iproute2 6.1, given a mode, shows that mode's fallback device)."""
    def given(addr):
        return addr is not None and int(addr) != 0
    return ((not f.get("dev") or f["dev"] == spec["dev"]) and
            (not f.get("name") or f["name"] == spec["name"]) and
            (not given(f.get("remote")) or str(f["remote"]) == spec["remote"]) and
            (not given(f.get("local")) or str(f["local"]) == spec["local"]) and
            (not f.get("ikey") or f["ikey"] == spec["ikey"]) and
            ("mode" not in f or f["mode"].value == spec["mode"]))


def stats_lines(c: dict, xfrm: dict | None = None) -> str:
    """The two tables of `ip -s tunnel show`, then tunl's drops by reason, and for a vti the
    namespace's xfrm error counters under the kernel's names (/proc/net/xfrm_stat)."""
    lines = [
        "RX: Packets    Bytes        Errors CsumErrs OutOfSeq Mcasts",
        f"    {c['rx_packets']:<10} {c['rx_bytes']:<12} {c['rx_errors']:<6} "
        f"{c['rx_crc_errors']:<8} {c['rx_fifo_errors']:<8} {0:<8}",
        "TX: Packets    Bytes        Errors DeadLoop NoRoute  NoBufs",
        f"    {c['tx_packets']:<10} {c['tx_bytes']:<12} {c['tx_errors']:<6} "
        f"{c['collisions']:<8} {c['tx_carrier_errors']:<8} {c['tx_dropped']:<6}",
    ]
    drops = [f"{k}={v}" for d in (c["rx_drop"], c["tx_drop"]) for k, v in sorted(d.items())]
    if drops:
        lines.append("Drops: " + " ".join(drops))
    if xfrm:
        lines.append("Xfrm: " + " ".join(f"{k}={v}" for k, v in sorted(xfrm.items())))
    return "\n".join(lines)


def details_line(status: dict) -> str:
    """`-d`: the data plane the tunnel got, how many outer sources it takes packets from
    when it has a member set, and on the eBPF plane what took which path."""
    line = f"  dataplane {status['dataplane']}"
    if status.get("members") is not None:
        line += f" members {status['members']}"
    e = status.get("ebpf")
    if e:
        line += (f" fast rx {e['fast_rx']} tx {e['fast_tx']}"
                 f" slow rx {e['slow_rx']} tx {e['slow_tx']}")
        for what, why in (("tx", e["slow_tx_why"]), ("rx", e["slow_rx_why"])):
            if why:
                line += f"\n  slow path {what}: " + "; ".join(why)
    return line


def to_json(status: dict) -> dict:
    """One tunnel for --json: iproute2's field names where it has them."""
    s = status["spec"]
    out = {"ifname": s["name"], "mode": s["mode"], "remote": s["remote"] or "any",
           "local": s["local"] or "any", "dev": s["dev"],
           "ttl": s["ttl"] or "inherit"}
    # print_tunnel()'s JSON: "tos" is rtnl_dsfield_n2a() of the whole byte ("EF", "0xb9"),
    # none for 0; for inherit alone iproute2 writes none either, tunl writes "inherit"
    if s["tos"]:
        out["tos"] = "inherit" if s["tos"] == 1 else dsfield_n2a(s["tos"])
    out["pmtudisc"] = s["pmtudisc"]
    for k in ("ikey", "okey", "iseq", "oseq", "icsum", "ocsum"):
        if s[k]:
            out[k] = s[k]
    if s["mode"] == "isatap":
        out["prl"] = [{"addr": a, "default": d} for a, d in s["prl"]]
    if s["mode"] in ("sit", "isatap"):
        out["6rd_prefix"] = s["ip6rd_prefix"] or "2002::/16"
        out["6rd_relay_prefix"] = s["ip6rd_relay_prefix"] or "0.0.0.0/0"
    out.update(dataplane=status["dataplane"], mtu=status["mtu"], up=status["up"],
               members=status.get("members"), stats=status["counters"])
    if "ebpf" in status:
        out["ebpf"] = status["ebpf"]
    if "xfrm" in status:
        out["xfrm"] = status["xfrm"]
    return out
