// SPDX-License-Identifier: GPL-2.0
/* v6lb XDP data plane: the DSR modes and npt, decided as v6lb.core's forwarders decide.
 *
 * docs/dataplane-xdp.md describes the program, its maps and where it differs from the
 * core. In short: not IPv6, or neither to a VIP address nor an npt prefix's -> XDP_PASS;
 * a packet the core drops -> XDP_DROP, counted by the core's reason; one the core
 * forwards -> encapsulated (dsr-ip6ip6, dsr-srv6), MACs rewritten (dsr-l2, l2.h) or
 * translated (npt, npt.h), XDP_TX; an ICMPv6 error for a VIP -> to the quoted flow's
 * owner (icmp.h); too big -> Packet Too Big built here (ptb.h); Time Exceeded and outer
 * fragmentation -> XDP_PASS, counted, for the kernel stack.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "counters.h"
#include "maps.h"
#include "parse.h"
#include "hash.h"
#include "encap.h"
#include "l2.h"
#include "npt.h"
#include "icmp.h"
#include "ptb.h"

#define V6LB_R_LENGTH_MISMATCH 3
#define V6LB_R_NO_MATCH 20
#define V6LB_R_NO_BACKEND 28

static __always_inline int v6lb_pass(__u32 slot)
{
	v6lb_count(slot);
	return XDP_PASS;
}

static __always_inline int v6lb_drop(__u32 reason)
{
	v6lb_count(reason);
	return XDP_DROP;
}

static __always_inline struct vip_val *v6lb_vip(const __u8 *addr, __u16 port, __u8 proto)
{
	struct vip_key k = {};

	__builtin_memcpy(k.addr, addr, 16);
	k.port = port;
	k.proto = proto;
	return bpf_map_lookup_elem(&v6lb_vips, &k);
}

/* A packet the core drops for ``reason``: dropped and counted if it is for a VIP
 * address, else npt's if a prefix claims it (npt.h; no-match: a packet to translate),
 * else the host's own (passed). Off the fast path: one more lookup. */
static __always_inline int v6lb_refuse(struct xdp_md *ctx, const __u8 *ip6, __u32 reason,
				       const struct v6lb_pkt *p)
{
	if (!v6lb_vip(ip6 + 24, 0, 0)) {
		if (reason == V6LB_R_NO_MATCH)
			return v6lb_npt(ctx, 0, p->l4_off, p->proto, p->later);
		return v6lb_npt(ctx, reason, 0, 0, 0);
	}
	return v6lb_drop(reason);
}

/* _steer + _hand_over of the core, for one VIP and one flow hash key. */
static __always_inline int v6lb_steer(struct xdp_md *ctx, __u8 *ip6, __u32 vip, __u32 *key,
				      __u32 nwords, __u32 len)
{
	struct vip_info *v = bpf_map_lookup_elem(&v6lb_vip_info, &vip);
	struct backend *be;
	__u32 h, slot, *idx;
	void *table;

	if (!v || (v->mode != V6LB_MODE_IP6IP6 && v->mode != V6LB_MODE_SRV6 &&
		   v->mode != V6LB_MODE_L2))
		return v6lb_pass(V6LB_CNT_PASS_MODE);
	if (v->mode != V6LB_MODE_L2 && ip6[7] <= 1) /* dsr-l2 does not route (l2.h) */
		return v6lb_pass(V6LB_CNT_PASS_HOP_LIMIT);
	h = v6lb_jhash_words(key, nwords, v->seed);
	table = bpf_map_lookup_elem(&v6lb_maglev, &vip); /* the table in place now */
	if (!table)
		return v6lb_drop(V6LB_R_NO_BACKEND);
	slot = v6lb_reciprocal_scale(h, v->table_size);
	idx = bpf_map_lookup_elem(table, &slot);
	if (!idx || *idx == V6LB_NONE)
		return v6lb_drop(V6LB_R_NO_BACKEND);
	if (v->mode == V6LB_MODE_L2)
		return v6lb_l2(ctx, *idx);
	be = bpf_map_lookup_elem(&v6lb_backends, idx);
	if (!be)
		return v6lb_drop(V6LB_R_NO_BACKEND);
	if (len > v->limit) /* RFC 2473 sec. 7.1: (a) the stack, (b) Packet Too Big (ptb.h) */
		return len <= V6LB_MIN_MTU ? v6lb_pass(V6LB_CNT_PASS_TOO_BIG)
					   : v6lb_too_big(ctx, v->limit, len);
	return v6lb_encap(ctx, be, h, len, v->mode == V6LB_MODE_SRV6);
}

/* An ICMPv6 error for a VIP: to the owner of the quoted flow (icmp.h); ``key``: the
 * entry's (10 words), rewritten here. */
static __always_inline int v6lb_icmp_error(struct xdp_md *ctx, __u8 *ip6, void *data_end,
					   __u32 l4_off, __u32 len, __u32 *key)
{
	__u32 nwords = 0;
	struct vip_val *svc = v6lb_icmp_quote(ip6, data_end, l4_off, len, key, &nwords);
	__u32 vip;
	int rc;

	if (!svc) { /* counted by reason; and on the address's first VIP, as the core */
		svc = v6lb_vip(ip6 + 24, 0, 0);
		if (svc && svc->index < V6LB_MAX_VIPS)
			v6lb_icmp_count(2 * svc->index + 1);
		return XDP_DROP;
	}
	vip = svc->index;
	if (vip == V6LB_NONE)
		return v6lb_pass(V6LB_CNT_PASS_MODE);
	rc = v6lb_steer(ctx, ip6, vip, key, nwords, len);
	if (rc == XDP_TX || rc == XDP_REDIRECT) {
		v6lb_count(V6LB_CNT_ICMP_FORWARDED);
		if (vip < V6LB_MAX_VIPS)
			v6lb_icmp_count(2 * vip);
	}
	return rc;
}

static __always_inline int v6lb_xdp_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct v6lb_pkt p;
	struct vip_val *svc;
	__u32 key[10] = {};
	__u32 len, nwords;
	__u16 sport = 0, dport = 0;
	__u8 *ip6, *l4;
	int rc;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return v6lb_pass(V6LB_CNT_PASS_NOT_IPV6);
	ip6 = (__u8 *)(eth + 1);
	if ((void *)(ip6 + V6LB_IP6_LEN) > data_end || (ip6[0] >> 4) != 6)
		return v6lb_pass(V6LB_CNT_PASS_NOT_IPV6);
	len = V6LB_IP6_LEN + (((__u32)ip6[4] << 8) | ip6[5]);
	if ((void *)(ip6 + len) != data_end)
		return v6lb_refuse(ctx, ip6, V6LB_R_LENGTH_MISMATCH, &p);
	rc = v6lb_parse(ip6, data_end, &p);
	if (rc)
		return v6lb_refuse(ctx, ip6, rc, &p);

	__builtin_memcpy(key, ip6 + 8, 32);
	if (p.l4_off > V6LB_IP6_LEN + V6LB_MAX_EXT_BYTES + 8)
		return v6lb_refuse(ctx, ip6, V6LB_R_EXT_CHAIN_TOO_LONG, &p); /* verifier */
	l4 = ip6 + p.l4_off;
	if (!p.later && (p.proto == 6 || p.proto == 17)) {
		if ((void *)(l4 + 4) > data_end)
			return v6lb_refuse(ctx, ip6, V6LB_R_L4_TRUNCATED, &p); /* cannot happen */
		sport = *(__u16 *)l4;
		dport = *(__u16 *)(l4 + 2);
	}

	if (p.frag_off >= 0) {
		/* every fragment on the 3-tuple: (src, dst, proto), the default VIP */
		svc = v6lb_vip(ip6 + 24, 0, (p.proto == 6 || p.proto == 17) ? p.proto : 0);
		if (!svc)
			return v6lb_refuse(ctx, ip6, V6LB_R_NO_MATCH, &p);
		/* port 0 keys are the defaults: no VIP serves port 0 */
		if (!p.later && (p.proto == 6 || p.proto == 17) &&
		    (!dport || !v6lb_vip(ip6 + 24, dport, p.proto)))
			return v6lb_drop(V6LB_R_NO_MATCH);
		key[8] = p.proto;
		nwords = 9;
	} else if (p.proto == 6 || p.proto == 17) {
		/* the fast path: one lookup names the VIP (and so the address is one) */
		svc = v6lb_vip(ip6 + 24, dport, p.proto);
		if (!svc || !dport) /* port 0 keys are the defaults: no VIP serves port 0 */
			return v6lb_refuse(ctx, ip6, V6LB_R_NO_MATCH, &p);
		key[8] = sport; /* a port's two bytes (network order), two zero bytes */
		key[9] = dport;
		nwords = 10;
	} else {
		svc = v6lb_vip(ip6 + 24, 0, 0); /* the address's first VIP */
		if (!svc)
			return v6lb_npt(ctx, 0, p.l4_off, p.proto, p.later);
		if (p.proto == 58) {
			if ((void *)(l4 + 1) > data_end)
				return v6lb_drop(V6LB_R_L4_TRUNCATED); /* cannot happen: parsed */
			if (l4[0] < 128)
				return v6lb_icmp_error(ctx, ip6, data_end, p.l4_off, len, key);
		}
		/* RFC 7045: any other upper layer is forwarded, on the 3-tuple */
		key[8] = p.proto;
		nwords = 9;
	}
	if (svc->index == V6LB_NONE)
		return v6lb_pass(V6LB_CNT_PASS_MODE);
	return v6lb_steer(ctx, ip6, svc->index, key, nwords, len);
}

#ifndef V6LB_NO_ENTRY
SEC("xdp")
int v6lb_xdp(struct xdp_md *ctx)
{
	return v6lb_xdp_main(ctx);
}
#endif

char _license[] SEC("license") = "GPL";
