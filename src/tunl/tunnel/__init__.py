"""Pure encapsulation and decapsulation per mode. No I/O: bytes in, offsets or a Drop out.

Every mode module (ipip, gre, sit) has the same shape, which the data plane drives:

    PROTO                      the outer IP protocol number (4, 47, 41)
    demux(buf, n)              a received outer packet buf[:n] -> (ihl, end, key, ctx) | Drop:
                               checks the outer header (outer.validate_outer) and finds what
                               the tunnel lookup needs: `key` is the GRE key (None without
                               one, and always None for ipip and sit); `ctx` is whatever the
                               codec wants back in decap_at (the parsed GRE header, say)
    Codec(spec)                one per tunnel, built from its TunnelSpec:
      .proto, .versions        outer protocol; inner IP versions it carries ((4,), (4, 6), (6,))
      .overhead                bytes in front of the inner packet (20, 24..36 for gre)
      .encap(buf, off, n, dst, ident) -> start | Drop
                               the inner packet is buf[off:off+n] with free headroom in front
                               (outer.HEADROOM); write the headers in front of it, in place,
                               and return where the outer packet starts
      .decap_at(buf, ihl, end, ctx) -> (offset, length) | Drop
                               after the lookup chose this tunnel: the mode's receive rules,
                               then outer.check_inner(); may keep state (GRE sequence numbers)

The outer IPv4 header and the inner checks are shared (outer.py); a mode adds only its own
header and rules.
"""
