/* v6lb XDP: dsr-l2, as v6lb.core.dsr hands a packet over: (FORWARD_L2, PORT_INSIDE, mac).
 *
 * The IPv6 packet is not changed at all, not even the hop limit (L2 DSR does not
 * route; docs/dsr.md). The frame's destination MAC becomes the backend's, its source
 * the LB's own on the link it leaves by:
 * - no egress link set (v6lb_conf.l2_ifindex 0): back out of the ingress link
 *   (XDP_TX), source = the MAC the frame was sent to (the LB's, on that link);
 * - an egress link set: redirected there (bpf_redirect), source = that link's MAC
 *   (the kernel plane's "ether saddr set LB_MAC ... fwd to EGRESS").
 * A backend with no MAC in v6lb_l2_macs (none in the file, none learned) is passed to
 * the stack, counted pass-no-mac.
 */
#ifndef V6LB_L2_H
#define V6LB_L2_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"

static __always_inline int v6lb_l2(struct xdp_md *ctx, __u32 idx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct l2_mac *m = bpf_map_lookup_elem(&v6lb_l2_macs, &idx);
	__u32 zero = 0;
	struct v6lb_conf *c = bpf_map_lookup_elem(&v6lb_conf, &zero);

	if (!m || !m->known || (void *)(eth + 1) > data_end) {
		v6lb_count(V6LB_CNT_PASS_NO_MAC);
		return XDP_PASS;
	}
	v6lb_count(V6LB_CNT_TX_L2);
	if (c && c->l2_ifindex) {
		__builtin_memcpy(eth->h_source, c->l2_mac, ETH_ALEN);
		__builtin_memcpy(eth->h_dest, m->mac, ETH_ALEN);
		return bpf_redirect(c->l2_ifindex, 0);
	}
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, m->mac, ETH_ALEN);
	return XDP_TX;
}

#endif
