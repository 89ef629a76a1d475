// SPDX-License-Identifier: GPL-2.0
/*
 * tunl's eBPF data plane: two tc programs that add and strip the outer header inside the
 * kernel, for tunnels whose device is a TUN device (no ipip/ip_gre/sit module needed).
 *
 *   tunl_egress   tc egress of the tunnel device: encapsulate (ip_tunnel_xmit() rules),
 *                 then bpf_redirect_neigh() to the underlay device the outer route names.
 *   tunl_ingress  tc ingress of an underlay device: find the tunnel the way ip_tunnel_lookup()
 *                 does, drop what comes from outside its member set (if it has one), check
 *                 and strip the outer header (ip_tunnel_rcv() rules, RFC 6040), then
 *                 bpf_redirect(..., BPF_F_INGRESS) into the tunnel device.
 *
 * Whatever these programs do not handle goes on as if they were not there (TC_ACT_OK): on
 * egress the packet reaches the device queue, where tunld's userspace data plane (the slow
 * path) encapsulates it; on ingress the kernel delivers it to tunld's raw sockets, or drops
 * it and counts it in its own statistics when ip_rcv() finds it bad. So every packet is
 * handled by the kernel's rules, on the fast path or the slow one, never half of each.
 *
 * The layouts of the maps' keys and values are mirrored in bpf/maps.py.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)   /* Linux 6.3 */
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define AF_INET 2
#define PACKET_HOST 0
#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff
#define GRE_CSUM 0x8000
#define GRE_ROUTING 0x4000
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define GRE_VERSION 0x0007
#define ECN_MASK 3
#define ECN_ECT_1 1
#define ECN_ECT_0 2
#define ECN_CE 3

enum mode { MODE_IPIP = 1, MODE_GRE = 2, MODE_SIT = 3 };

/* struct tnl.flags */
#define F_PMTUDISC 0x01     /* outer DF always */
#define F_OKEY 0x02         /* GRE key on transmit */
#define F_SLOW_TX 0x04      /* every transmitted packet to the slow path */
#define F_SLOW_RX 0x08      /* every received packet to the slow path */
#define F_DECAP_L3 0x20     /* the kernel has BPF_F_ADJ_ROOM_DECAP_L3_* (6.3+) */
#define F_MEMBERS 0x40      /* only outer sources in tunl_members (tunld fills it first) */

struct tnl {                /* one tunnel, by the tunnel device's ifindex */
	__u32 ifindex;
	__u32 link;         /* underlay device, 0: any */
	__be32 local;       /* 0: any */
	__be32 remote;      /* 0: NBMA, the next hop of the route on the device */
	__be32 okey;
	__u8 mode;
	__u8 ttl;           /* 0: inherit */
	__u8 tos;           /* bit 0 set: inherit */
	__u8 flags;
};

struct rx_key {             /* how ip_tunnel_lookup() tells tunnels apart */
	__be32 local;
	__be32 remote;
	__be32 key;
	__u8 proto;         /* 4, 41 or 47 */
	__u8 has_key;
	__u16 pad;
};

struct route_key {          /* LPM: prefixlen counts the 32 bits of ifindex, then the prefix */
	__u32 prefixlen;
	__be32 ifindex;
	__be32 addr;
};

struct path_key {
	__u32 ifindex;
	__be32 dst;
};

struct member_key {         /* one outer source a tunnel takes packets from */
	__u32 ifindex;
	__be32 addr;
};

struct path {               /* the outer route to one destination, kept by tunld */
	__u32 oif;
	__be32 src;         /* the route's preferred source, for a tunnel without local */
	__u32 mtu;          /* the path MTU: the route's, the device's, or learned (ICMP) */
};

/* counters, per tunnel and per CPU, in the kernel's terms (rtnl_link_stats64) and drops */
enum {
	C_RX_PACKETS, C_RX_BYTES, C_TX_PACKETS, C_TX_BYTES,
	C_RX_ECN,               /* RFC 6040: outer CE over a not-ECT inner packet */
	C_TX_DEAD_LOOP,         /* the outer route leads back into the tunnel */
	C_RX_SLOW, C_TX_SLOW,   /* handed to the slow path */
	C_RX_NOT_MEMBER,        /* an outer source not in the tunnel's member set */
	C_MAX
};
struct counters {
	__u64 c[C_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct tnl);
} tunl_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct rx_key);
	__type(value, __u32);
} tunl_rx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, __be32);
} tunl_routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct path_key);
	__type(value, struct path);
} tunl_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct member_key);
	__type(value, __u8);
} tunl_members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct counters);
} tunl_stats SEC(".maps");

/* add n to counter `what` and, for a packet moved, len to the byte counter after it: one
 * lookup per packet */
static __always_inline void count2(__u32 ifindex, int what, __u64 n, __u64 len)
{
	struct counters *c = bpf_map_lookup_elem(&tunl_stats, &ifindex);

	if (!c) {
		struct counters zero = {};

		bpf_map_update_elem(&tunl_stats, &ifindex, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&tunl_stats, &ifindex);
		if (!c)
			return;
	}
	if (what >= 0 && what < C_MAX)
		c->c[what] += n;
	if (len && what >= 0 && what + 1 < C_MAX)
		c->c[what + 1] += len;
}

#define count(ifindex, what, n) count2(ifindex, what, n, 0)

static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* ------------------------------------------------------------------------------------------ */
/* egress                                                                                     */

struct outer_hdr {
	struct iphdr ip;
	__be16 gre_flags;
	__be16 gre_proto;
	__be32 gre_key;
};

/* the length of the TCP header at off: what every segment of a GSO packet repeats */
static __always_inline __u32 tcp_hlen(struct __sk_buff *skb, __u32 off)
{
	__u8 doff;

	if (bpf_skb_load_bytes(skb, off + 12, &doff, 1))
		return 60;
	return (doff >> 4) * 4;
}

SEC("tc")
int tunl_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct tnl *t = bpf_map_lookup_elem(&tunl_tunnels, &ifindex);
	struct outer_hdr o = {};
	__u8 inner_tos, inner_ttl, version;
	__be16 inner_df = 0;
	__be32 dst, src;
	__u32 oif, hlen, l3l4, inner_len = skb->len;
	__u64 flags;

	if (!t)
		return TC_ACT_OK;
	if (t->flags & F_SLOW_TX)
		goto slow;

	/* the inner packet: what this mode carries (ipip_tunnel_xmit(), sit_tunnel_xmit()) */
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr iph;

		if (t->mode == MODE_SIT || bpf_skb_load_bytes(skb, 0, &iph, sizeof(iph)))
			goto slow;
		version = 4;
		l3l4 = iph.ihl * 4 + 8;
		if (iph.protocol == IPPROTO_TCP)
			l3l4 = iph.ihl * 4 + tcp_hlen(skb, iph.ihl * 4);
		inner_tos = iph.tos;
		inner_ttl = iph.ttl;
		inner_df = iph.frag_off & bpf_htons(IP_DF);
		dst = iph.daddr;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (t->mode == MODE_IPIP || bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)))
			goto slow;
		version = 6;
		l3l4 = sizeof(ip6) + 8;
		if (ip6.nexthdr == IPPROTO_TCP)
			l3l4 = sizeof(ip6) + tcp_hlen(skb, sizeof(ip6));
		inner_tos = (ip6.priority << 4) | (ip6.flow_lbl[0] >> 4);
		inner_ttl = ip6.hop_limit;
		dst = 0;
	} else {
		goto slow;
	}

	/* the outer destination: the remote, else the next hop of the inner route on the
	 * device, as ip_tunnel_xmit() takes rt_nexthop() (NBMA); tunld mirrors those routes */
	if (t->remote) {
		dst = t->remote;
	} else {
		struct route_key rk = { .prefixlen = 64, .ifindex = bpf_htonl(ifindex), .addr = dst };
		__be32 *gw;

		if (version != 4)
			goto slow;      /* sit's NBMA, isatap and 6rd next hops: the slow path */
		gw = bpf_map_lookup_elem(&tunl_routes, &rk);
		if (!gw)
			goto slow;      /* no route: the slow path counts it */
		if (*gw)
			dst = *gw;
	}

	/* the outer route, which tunld looks up as ip_tunnel_xmit() does; one it has not looked
	 * up yet, or one back into the tunnel, goes to the slow path */
	{
		struct path_key pk = { .ifindex = ifindex, .dst = dst };
		struct path *p = bpf_map_lookup_elem(&tunl_paths, &pk);
		__u32 seg = inner_len;

		if (!p || p->oif == ifindex)
			goto slow;
		/* sit over a path under 1280 + 20 clears DF (RFC 4213 §3.2.2): the slow path */
		if (t->mode == MODE_SIT && p->mtu < 1300)
			goto slow;
		oif = p->oif;
		src = t->local ? t->local : p->src;
		if (!src)
			goto slow;
		/* larger than the path MTU: the slow path answers with ICMP or fragments, by the
		 * rules of tnl_update_pmtu() */
		if (skb->gso_size)
			seg = skb->gso_size + l3l4;
		if (seg + (t->mode == MODE_GRE ? ((t->flags & F_OKEY) ? 28 : 24) : 20) > p->mtu)
			goto slow;
	}

	/* the outer header: ip_tunnel_xmit() */
	hlen = sizeof(struct iphdr);
	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.tos = (t->tos & 1) ? inner_tos : t->tos;
	/* INET_ECN_encapsulate(): the inner ECN field, CE sent as ECT(0) */
	o.ip.tos = (o.ip.tos & ~ECN_MASK) |
		   ((inner_tos & ECN_MASK) == ECN_CE ? ECN_ECT_0 : (inner_tos & ECN_MASK));
	o.ip.ttl = t->ttl ? t->ttl : inner_ttl;
	o.ip.frag_off = (t->flags & F_PMTUDISC) ? bpf_htons(IP_DF) : inner_df;
	o.ip.id = o.ip.frag_off ? 0 : (__be16)bpf_get_prandom_u32();
	o.ip.saddr = src;
	o.ip.daddr = dst;
	flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	if (t->mode == MODE_GRE) {
		o.ip.protocol = IPPROTO_GRE;
		o.gre_proto = version == 4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
		hlen += 4;
		if (t->flags & F_OKEY) {
			o.gre_flags = bpf_htons(GRE_KEY);
			o.gre_key = t->okey;
			hlen += 4;
		}
		flags |= BPF_F_ADJ_ROOM_ENCAP_L4_GRE;
	} else {
		o.ip.protocol = t->mode == MODE_SIT ? IPPROTO_IPV6 : IPPROTO_IPIP;
	}
	if (inner_len + hlen > 0xffff && !(skb->gso_segs > 1))
		goto slow;
	o.ip.tot_len = bpf_htons(inner_len + hlen);
	o.ip.check = 0;
	o.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&o.ip, sizeof(o.ip), 0));

	if (bpf_skb_adjust_room(skb, hlen, BPF_ADJ_ROOM_MAC, flags))
		goto slow;          /* e.g. a GSO packet that is already encapsulated */
	if (bpf_skb_store_bytes(skb, 0, &o, hlen & 0x3f, 0))
		return TC_ACT_SHOT;
	/* bpf_redirect_neigh() wants an L2 header in front of the network header; the
	 * neighbour code fills it in */
	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return TC_ACT_SHOT;
	{
		struct ethhdr eth = { .h_proto = bpf_htons(ETH_P_IP) };

		if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
			return TC_ACT_SHOT;
	}
	count2(ifindex, C_TX_PACKETS, 1, inner_len);        /* and C_TX_BYTES */
	return bpf_redirect_neigh(oif, NULL, 0, 0);

slow:
	count(ifindex, C_TX_SLOW, 1);
	return TC_ACT_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* ingress                                                                                    */

static __always_inline __u32 *lookup(struct rx_key *k, __be32 local, __be32 remote, int *wild)
{
	__u32 *tun;

	/* ip_tunnel_lookup(): local and remote, remote only, local only, neither */
	k->local = local;
	k->remote = remote;
	tun = bpf_map_lookup_elem(&tunl_rx, k);
	if (tun)
		return tun;
	*wild = 1;
	k->local = 0;
	tun = bpf_map_lookup_elem(&tunl_rx, k);
	if (tun)
		return tun;
	k->local = local;
	k->remote = 0;
	tun = bpf_map_lookup_elem(&tunl_rx, k);
	if (tun)
		return tun;
	k->local = 0;
	return bpf_map_lookup_elem(&tunl_rx, k);
}

/* whether dst is an address of this host: a wildcard tunnel takes only what ip_rcv() would
 * deliver locally, not what the host forwards */
static __always_inline int is_local(void *ctx, __u32 ifindex, struct iphdr *iph)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.ifindex = ifindex,
		.ipv4_src = iph->saddr,
		.ipv4_dst = iph->daddr,
	};
	int ret = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);

	/* not forwarded: local (or broadcast); forwarding off on the device: ip_rcv() would
	 * drop what is not local, so it is taken as local */
	return ret == BPF_FIB_LKUP_RET_NOT_FWDED || ret == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

SEC("tc")
int tunl_ingress(struct __sk_buff *skb)
{
	struct rx_key k = {};
	struct iphdr iph;
	struct tnl *t;
	__u32 *tun, ifindex, off, strip, pkt_len;
	__u8 inner_tos, version;
	__u64 flags = 0;
	int wild = 0, slow = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->pkt_type != PACKET_HOST)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)))
		return TC_ACT_OK;
	if (iph.protocol != IPPROTO_IPIP && iph.protocol != IPPROTO_GRE &&
	    iph.protocol != IPPROTO_IPV6)
		return TC_ACT_OK;
	/* the checks of ip_rcv(); a packet that fails them, has options or is a fragment is
	 * left to the kernel, which drops and counts it, or reassembles it for the slow path */
	if (iph.version != 4 || iph.ihl != 5 || (iph.frag_off & bpf_htons(IP_MF_OFFSET)))
		return TC_ACT_OK;
	pkt_len = bpf_ntohs(iph.tot_len);
	if (pkt_len < sizeof(iph) || pkt_len > skb->len - ETH_HLEN)
		return TC_ACT_OK;
	if (csum_fold(bpf_csum_diff(0, 0, (__be32 *)&iph, sizeof(iph), 0)) != 0)
		return TC_ACT_OK;

	k.proto = iph.protocol;
	off = ETH_HLEN + sizeof(iph);
	strip = sizeof(iph);
	if (iph.protocol == IPPROTO_GRE) {
		__be16 g[2];
		__u16 gf;

		if (bpf_skb_load_bytes(skb, off, g, sizeof(g)))
			return TC_ACT_OK;
		gf = bpf_ntohs(g[0]);
		/* routing and versions: the slow path drops them; checksums and sequence numbers:
		 * the slow path's rules, on the tunnel the packet is for */
		if (gf & (GRE_ROUTING | GRE_VERSION) || gf & 0x0ff8)
			return TC_ACT_OK;
		slow = gf & (GRE_CSUM | GRE_SEQ);
		if (gf & GRE_CSUM)
			strip += 4;
		if (g[1] == bpf_htons(ETH_P_IP))
			version = 4;
		else if (g[1] == bpf_htons(ETH_P_IPV6))
			version = 6;
		else
			return TC_ACT_OK;
		strip += 4;
		if (gf & GRE_KEY) {
			if (bpf_skb_load_bytes(skb, ETH_HLEN + strip, &k.key, 4))
				return TC_ACT_OK;
			k.has_key = 1;
			strip += 4;
		}
	} else {
		version = iph.protocol == IPPROTO_IPIP ? 4 : 6;
	}

	tun = lookup(&k, iph.daddr, iph.saddr, &wild);
	if (!tun)
		return TC_ACT_OK;   /* not a tunnel of ours: the slow path or the kernel */
	ifindex = *tun;
	t = bpf_map_lookup_elem(&tunl_tunnels, &ifindex);
	if (!t)
		return TC_ACT_OK;
	if (wild && !k.local && !is_local(skb, skb->ingress_ifindex, &iph))
		return TC_ACT_OK;   /* what the host forwards is no tunnel's */
	if (t->flags & F_MEMBERS) {
		/* only nodes of the overlay send into it, on the fast path or the slow one: one
		 * lookup more, for a tunnel that has a member set */
		struct member_key mk = { .ifindex = ifindex, .addr = iph.saddr };

		if (!bpf_map_lookup_elem(&tunl_members, &mk)) {
			count(ifindex, C_RX_NOT_MEMBER, 1);
			return TC_ACT_SHOT;
		}
	}
	if (t->flags & F_SLOW_RX || slow)
		goto slow;
	if (t->link && t->link != skb->ingress_ifindex)
		goto slow;
	if (version == 6 && !(t->flags & F_DECAP_L3))
		goto slow;          /* skb->protocol cannot follow before Linux 6.3 */

	/* RFC 6040 (INET_ECN_decapsulate()) on the inner header */
	off = ETH_HLEN + strip;
	if (version == 4) {
		struct iphdr in;

		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)) || in.version != 4)
			goto slow;
		inner_tos = in.tos;
	} else {
		__u8 b[2];

		if (bpf_skb_load_bytes(skb, off, b, 2) || (b[0] >> 4) != 6)
			goto slow;
		inner_tos = ((b[0] & 0x0f) << 4) | (b[1] >> 4);
	}
	{
		__u8 outer = iph.tos & ECN_MASK, inner = inner_tos & ECN_MASK, set = 0;

		if (inner == 0) {
			if (outer == ECN_CE) {
				count(ifindex, C_RX_ECN, 1);
				return TC_ACT_SHOT;
			}
		} else if (outer == ECN_CE && inner != ECN_CE) {
			set = ECN_CE;
		} else if (outer == ECN_ECT_1 && inner == ECN_ECT_0) {
			set = ECN_ECT_1;
		}
		if (set) {
			if (version == 4) {
				__u16 old, new;
				__u8 tos = (inner_tos & ~ECN_MASK) | set;
				__u8 b0;

				/* the first 16-bit word holds version, ihl and tos */
				if (bpf_skb_load_bytes(skb, off, &b0, 1))
					goto slow;
				old = bpf_htons(((__u16)b0 << 8) | inner_tos);
				new = bpf_htons(((__u16)b0 << 8) | tos);
				bpf_l3_csum_replace(skb, off + 10, old, new, 2);
				bpf_skb_store_bytes(skb, off + 1, &tos, 1, 0);
			} else {
				__u8 b1;

				if (bpf_skb_load_bytes(skb, off + 1, &b1, 1))
					goto slow;
				b1 = (b1 & ~(ECN_MASK << 4)) | (set << 4);
				bpf_skb_store_bytes(skb, off + 1, &b1, 1, 0);
			}
		}
	}

	/* the inner segments keep their size: FIXED_GSO (else gso_size would grow by the
	 * outer header, and segments outgrow the MSS they were cut for) */
	flags = BPF_F_ADJ_ROOM_FIXED_GSO;
	if (t->flags & F_DECAP_L3)
		flags |= version == 6 ? BPF_F_ADJ_ROOM_DECAP_L3_IPV6 : BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
	if (bpf_skb_adjust_room(skb, -(__s32)strip, BPF_ADJ_ROOM_MAC, flags))
		goto slow;
	if (version == 6) {
		__be16 p = bpf_htons(ETH_P_IPV6);

		bpf_skb_store_bytes(skb, 12, &p, 2, 0);
	}
	count2(ifindex, C_RX_PACKETS, 1, pkt_len - strip);  /* and C_RX_BYTES */
	return bpf_redirect(ifindex, BPF_F_INGRESS);

slow:
	count(ifindex, C_RX_SLOW, 1);
	return TC_ACT_OK;
}


char LICENSE[] SEC("license") = "GPL";
