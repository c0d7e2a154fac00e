/* v6lb XDP: dsr-ip6ip6 encapsulation, the outer header as v6lb.core.dsr.outer_header.
 *
 * Outer word 0 = the inner one (version, traffic class, flow label: RFC 6438), with
 * the flow's derived label when the inner label is 0 ((h & 0xfffff) or 1); payload
 * length = the whole inner packet; next header 41; hop limit 64; source = the VIP's
 * tunnel source; destination = the backend. The inner hop limit is decremented.
 * Ethernet: the frame goes back out where it came in (XDP_TX) with its MAC addresses
 * swapped, to the router that sent it (docs/dataplane-xdp.md).
 */
#ifndef V6LB_ENCAP_H
#define V6LB_ENCAP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#define V6LB_OUTER_HOP_LIMIT 64

static __always_inline __u32 v6lb_label(__u32 h)
{
	__u32 l = h & 0xfffff;

	return l ? l : 1;
}

/* Returns an XDP verdict; the frame is rewritten only on XDP_TX. */
static __always_inline int v6lb_encap_ip6ip6(struct xdp_md *ctx, const struct backend *be,
					     __u32 h, __u32 inner_len)
{
	void *data, *data_end;
	struct ethhdr *eth, *old;
	__u8 *outer, *inner;
	__u32 w0;
	__u8 tmp[ETH_ALEN];

	if (bpf_xdp_adjust_head(ctx, -(int)V6LB_IP6_LEN)) {
		v6lb_count(V6LB_CNT_PASS_ADJUST);
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(struct ethhdr) + 2 * V6LB_IP6_LEN > data_end) {
		v6lb_count(V6LB_CNT_PASS_ADJUST);
		return XDP_PASS; /* cannot happen: the inner header was there */
	}
	eth = data;
	old = data + V6LB_IP6_LEN;
	outer = data + sizeof(struct ethhdr);
	inner = outer + V6LB_IP6_LEN;
	__builtin_memcpy(eth, old, sizeof(struct ethhdr));
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);

	w0 = bpf_ntohl(*(__u32 *)inner);
	if (!(w0 & 0xfffff))
		w0 |= v6lb_label(h);
	*(__u32 *)outer = bpf_htonl(w0);
	*(__u16 *)(outer + 4) = bpf_htons((__u16)inner_len);
	outer[6] = 41;
	outer[7] = V6LB_OUTER_HOP_LIMIT;
	__builtin_memcpy(outer + 8, be->src, 16);
	__builtin_memcpy(outer + 24, be->dst, 16);
	inner[7] -= 1;
	v6lb_count(V6LB_CNT_TX);
	return XDP_TX;
}

#endif
