/* v6lb XDP: Packet Too Big for a packet longer than its VIP's tunnel MTU, as the core's
 * DsrForwarder._hand_over and IcmpErrorSource build it (RFC 2473 sec. 7.1, RFC 4443).
 *
 * A packet of at most 1280 bytes that does not fit: the core fragments the outer
 * packet; the program passes it to the stack (pass-too-big). A longer one: answered
 * with Packet Too Big carrying max(tunnel MTU, 1280), built here in the frame itself:
 * bpf_xdp_adjust_head(-48) for the new IPv6 and ICMPv6 headers, the quote cut to the
 * first 1232 bytes of the packet (bpf_xdp_adjust_tail) so the error is 1280 bytes,
 * the checksum by bpf_csum_diff (pseudo-header, then the message in 512-byte pieces).
 * Source: the core's ICMPv6 error source (lb.addresses[0], ...); destination: the
 * packet's source; hop limit 64, traffic class and flow label 0. The MACs are swapped:
 * XDP_TX, back to the router that sent the packet, counted tx-too-big.
 * No error (RFC 4443 sec. 2.4 e, f), the packet dropped and counted too-big, as the core:
 * a source that is multicast or unspecified; a packet that is itself an ICMPv6 error;
 * no token in this CPU's bucket (lb.icmp_error_rate per second, lb.icmp_error_burst:
 * the core's, per CPU here).
 */
#ifndef V6LB_PTB_H
#define V6LB_PTB_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "counters.h"
#include "maps.h"
#include "parse.h"

#define V6LB_R_TOO_BIG 31
#define V6LB_MIN_MTU 1280
#define V6LB_PTB_HDR 48                                  /* IPv6 + ICMPv6 headers */
#define V6LB_PTB_QUOTE (V6LB_MIN_MTU - V6LB_PTB_HDR)      /* 1232 */
#define V6LB_NS 1000000000ull

static __always_inline int v6lb_ptb_token(const struct v6lb_conf *c)
{
	__u32 zero = 0;
	struct icmp_bucket *b = bpf_map_lookup_elem(&v6lb_icmp_bucket, &zero);
	__u64 now = bpf_ktime_get_ns(), full = (__u64)c->icmp_burst * V6LB_NS;

	if (!b)
		return 0;
	if (!b->last) {
		b->tokens = full;
	} else if (now > b->last && c->icmp_rate) {
		__u64 dt = now - b->last, t = full;

		/* refilled to the burst once dt * rate reaches it: no overflow */
		if (dt < full / c->icmp_rate)
			t = b->tokens + dt * c->icmp_rate;
		b->tokens = t < full ? t : full;
	}
	b->last = now;
	if (b->tokens < V6LB_NS)
		return 0;
	b->tokens -= V6LB_NS;
	return 1;
}

static __always_inline __u32 v6lb_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u32)s;
}

/* ``len`` bytes of IPv6 packet (len > 1280) longer than ``limit``. A global function:
 * checked once by the verifier, and it may move the frame (the caller returns its
 * verdict at once). */
__noinline int v6lb_too_big(struct xdp_md *ctx, __u32 limit, __u32 len)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 *ip6 = data + sizeof(struct ethhdr), *ip, *icmp, *l4;
	__u32 zero = 0, mtu = limit > V6LB_MIN_MTU ? limit : V6LB_MIN_MTU;
	struct v6lb_conf *c = bpf_map_lookup_elem(&v6lb_conf, &zero);
	struct ethhdr *eth;
	struct v6lb_pkt p;
	__u8 pseudo[40] = {};
	__u64 sum;
	__s64 s;

	if (!c || (void *)(ip6 + V6LB_IP6_LEN) > data_end || len <= V6LB_MIN_MTU)
		goto drop;
	/* RFC 4443 sec. 2.4 (e): not to a multicast or unspecified source */
	if (ip6[8] == 0xff || (!*(__u64 *)(ip6 + 8) && !*(__u64 *)(ip6 + 16)))
		goto drop;
	/* ... and never about an ICMPv6 error */
	if (!v6lb_parse(ip6, data_end, &p) && p.proto == 58 && !p.later) {
		if (p.l4_off > V6LB_IP6_LEN + V6LB_MAX_EXT_BYTES + 8)
			goto drop;
		l4 = ip6 + p.l4_off;
		if ((void *)(l4 + 1) > data_end || l4[0] < 128)
			goto drop;
	}
	if (!v6lb_ptb_token(c))
		goto drop;

	if (bpf_xdp_adjust_head(ctx, -V6LB_PTB_HDR))
		goto drop;
	if (bpf_xdp_adjust_tail(ctx, V6LB_PTB_QUOTE - (int)len))
		goto drop; /* cannot happen: the frame only gets shorter */
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(struct ethhdr) + V6LB_MIN_MTU > data_end)
		return XDP_ABORTED; /* cannot happen: for the verifier */
	eth = data;
	ip = data + sizeof(struct ethhdr);
	icmp = ip + V6LB_IP6_LEN;
	/* the Ethernet header to the front, its addresses swapped */
	__builtin_memcpy(eth->h_dest, (__u8 *)data + V6LB_PTB_HDR + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth->h_source, (__u8 *)data + V6LB_PTB_HDR, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	*(__u32 *)ip = bpf_htonl(6 << 28);
	*(__u16 *)(ip + 4) = bpf_htons(V6LB_MIN_MTU - V6LB_IP6_LEN);
	ip[6] = 58;
	ip[7] = 64;
	__builtin_memcpy(ip + 8, c->icmp_src, 16);
	__builtin_memcpy(ip + 24, icmp + 8 + 8, 16); /* the quoted packet's source */
	icmp[0] = 2; /* Packet Too Big */
	icmp[1] = 0;
	*(__u16 *)(icmp + 2) = 0;
	*(__u32 *)(icmp + 4) = bpf_htonl(mtu);

	__builtin_memcpy(pseudo, ip + 8, 32);
	pseudo[34] = (V6LB_MIN_MTU - V6LB_IP6_LEN) >> 8;
	pseudo[35] = (V6LB_MIN_MTU - V6LB_IP6_LEN) & 0xff;
	pseudo[39] = 58;
	s = bpf_csum_diff(0, 0, (__be32 *)pseudo, sizeof(pseudo), 0);
	if (s < 0)
		return XDP_ABORTED;
	sum = (__u64)s;
	s = bpf_csum_diff(0, 0, (__be32 *)icmp, 512, 0);
	if (s < 0)
		return XDP_ABORTED;
	sum += (__u64)s;
	s = bpf_csum_diff(0, 0, (__be32 *)(icmp + 512), 512, 0);
	if (s < 0)
		return XDP_ABORTED;
	sum += (__u64)s;
	s = bpf_csum_diff(0, 0, (__be32 *)(icmp + 1024), V6LB_MIN_MTU - V6LB_IP6_LEN - 1024, 0);
	if (s < 0)
		return XDP_ABORTED;
	sum += (__u64)s;
	*(__u16 *)(icmp + 2) = (__u16)~v6lb_fold(sum);
	v6lb_count(V6LB_CNT_TX_TOO_BIG);
	return XDP_TX;
drop:
	v6lb_count(V6LB_R_TOO_BIG);
	return XDP_DROP;
}

#endif
