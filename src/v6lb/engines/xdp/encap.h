/* v6lb XDP: dsr-ip6ip6 and dsr-srv6 encapsulation, as v6lb.core.dsr.outer_header.
 *
 * dsr-ip6ip6: an outer IPv6 header, next header 41 (40 bytes). dsr-srv6: an outer IPv6
 * header, next header 43, then an RFC 8754 SRH with one segment (the backend's SID,
 * segments left 0, last entry 0, next header 41): 64 bytes, Linux seg6 "encap".
 * Outer word 0 = the inner one (version, traffic class, flow label: RFC 6438), with
 * the flow's derived label when the inner label is 0 ((h & 0xfffff) or 1); payload
 * length = the whole inner packet (plus the SRH); hop limit 64; source = the VIP's
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
#define V6LB_SRH_LEN 24

static __always_inline __u32 v6lb_label(__u32 h)
{
	__u32 l = h & 0xfffff;

	return l ? l : 1;
}

/* Returns an XDP verdict; the frame is rewritten only on XDP_TX. */
static __always_inline int v6lb_encap(struct xdp_md *ctx, const struct backend *be, __u32 h,
				      __u32 inner_len, int srv6)
{
	int room = srv6 ? V6LB_IP6_LEN + V6LB_SRH_LEN : V6LB_IP6_LEN;
	void *data, *data_end;
	struct ethhdr *eth, *old;
	__u8 *outer, *inner, *srh;
	__u32 w0;
	__u8 tmp[ETH_ALEN];

	if (bpf_xdp_adjust_head(ctx, -room)) {
		v6lb_count(V6LB_CNT_PASS_ADJUST);
		return XDP_PASS;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	/* cannot happen (the inner header was there): for the verifier */
	if (data + sizeof(struct ethhdr) + 2 * V6LB_IP6_LEN > data_end) {
		v6lb_count(V6LB_CNT_PASS_ADJUST);
		return XDP_PASS;
	}
	eth = data;
	outer = data + sizeof(struct ethhdr);
	if (srv6) {
		if (data + sizeof(struct ethhdr) + 2 * V6LB_IP6_LEN + V6LB_SRH_LEN > data_end) {
			v6lb_count(V6LB_CNT_PASS_ADJUST);
			return XDP_PASS;
		}
		old = data + V6LB_IP6_LEN + V6LB_SRH_LEN;
		srh = outer + V6LB_IP6_LEN;
		inner = srh + V6LB_SRH_LEN;
	} else {
		old = data + V6LB_IP6_LEN;
		srh = 0;
		inner = outer + V6LB_IP6_LEN;
	}
	__builtin_memcpy(eth, old, sizeof(struct ethhdr));
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);

	w0 = bpf_ntohl(*(__u32 *)inner);
	if (!(w0 & 0xfffff))
		w0 |= v6lb_label(h);
	*(__u32 *)outer = bpf_htonl(w0);
	outer[7] = V6LB_OUTER_HOP_LIMIT;
	__builtin_memcpy(outer + 8, be->src, 16);
	__builtin_memcpy(outer + 24, be->dst, 16);
	if (srh) {
		*(__u16 *)(outer + 4) = bpf_htons((__u16)(inner_len + V6LB_SRH_LEN));
		outer[6] = 43;
		srh[0] = 41; /* next header */
		srh[1] = 2;  /* length in 8-byte units after the first 8 */
		srh[2] = 4;  /* routing type: SRH */
		srh[3] = 0;  /* segments left */
		srh[4] = 0;  /* last entry */
		srh[5] = 0;  /* flags */
		*(__u16 *)(srh + 6) = 0; /* tag */
		__builtin_memcpy(srh + 8, be->dst, 16);
	} else {
		*(__u16 *)(outer + 4) = bpf_htons((__u16)inner_len);
		outer[6] = 41;
	}
	inner[7] -= 1;
	v6lb_count(V6LB_CNT_TX);
	return XDP_TX;
}

#endif
