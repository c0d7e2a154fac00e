/* v6lb XDP: npt, RFC 6296 stateless prefix translation, as v6lb.core.nptv6.NptForwarder.
 *
 * Which way: as the python plane steers (engines/python/steer.py), by address, not by
 * link: a destination in an outside prefix is inbound (the first such pair; the
 * destination is translated); else a destination in an inside prefix is traffic
 * between inside hosts (not ours: passed); else a source in an inside prefix is
 * outbound (the first such pair; the source is translated). Anything else: passed.
 *
 * Per packet, in the core's order: a header the core drops (the walk of parse.h) ->
 * dropped, its reason; hop limit <= 1 -> passed for the stack's Time Exceeded; an
 * ICMPv6 error -> its quote translated too (outbound the quoted destination, inbound
 * the quoted source; it must be in the same pair's prefix, else dropped
 * icmp-error-unmatched; a quote shorter than an IPv6 header or one that cannot be
 * translated: icmp-error-quote-bad); then the address: the prefix written, one 16-bit
 * word adjusted (checksum-neutral: no checksum changes anywhere):
 * - /48 or shorter: the subnet word (bits 48..63); 0xFFFF there has no mapping
 *   (RFC 6296 sec. 3.2, sec. 4.2): dropped, npt-no-mapping;
 * - longer: the first interface-identifier word that is not 0xFFFF (sec. 3.5); none:
 *   dropped, npt-no-adjustable-word.
 * The core answers those two with an ICMPv6 error; the program drops them (counted).
 * The hop limit is decremented, the MACs swapped: XDP_TX, counted tx-npt.
 */
#ifndef V6LB_NPT_H
#define V6LB_NPT_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "counters.h"
#include "maps.h"
#include "parse.h"

#define V6LB_R_HOP_LIMIT_EXCEEDED 21
#define V6LB_R_NPT_NO_MAPPING 22
#define V6LB_R_NPT_NO_ADJUSTABLE_WORD 23
#define V6LB_R_ICMP_ERROR_UNMATCHED 24
#define V6LB_R_ICMP_ERROR_QUOTE_BAD 25

#define V6LB_NPT_NONE 0xff

static __always_inline __u64 v6lb_first8(const __u8 *a)
{
	__u64 x;

	__builtin_memcpy(&x, a, 8);
	return x;
}

/* The word of address ``a`` (16 bytes, checked by the caller) to adjust and its new
 * value: 0, or the Reason the core drops for. */
static __always_inline int v6lb_npt_word(const __u8 *a, int subnet, __u32 adj, __u32 *off,
					 __u32 *val)
{
	__u32 o, w;

	if (subnet) {
		o = 6;
		w = ((__u32)a[6] << 8) | a[7];
		if (w == 0xffff)
			return V6LB_R_NPT_NO_MAPPING;
	} else {
		if (a[8] != 0xff || a[9] != 0xff)
			o = 8;
		else if (a[10] != 0xff || a[11] != 0xff)
			o = 10;
		else if (a[12] != 0xff || a[13] != 0xff)
			o = 12;
		else if (a[14] != 0xff || a[15] != 0xff)
			o = 14;
		else
			return V6LB_R_NPT_NO_ADJUSTABLE_WORD;
		w = ((__u32)a[o] << 8) | a[o + 1];
	}
	/* one's-complement add; 0xFFFF cannot result (w < 0xFFFF, adj <= 0xFFFF) */
	w += adj;
	if (w >= 0xffff)
		w -= 0xffff;
	*off = o;
	*val = w;
	return 0;
}

static __always_inline void v6lb_npt_write(__u8 *a, __u64 mask, __u64 pfx, __u32 off, __u32 val)
{
	__u64 x = (v6lb_first8(a) & ~mask) | pfx;

	__builtin_memcpy(a, &x, 8);
	off &= 14;
	a[off] = val >> 8;
	a[off + 1] = val & 0xff;
}

/* rc: the core's drop reason from the header walk (0: parsed), l4_off/proto/later
 * from it. Returns an XDP verdict; the frame is changed only on XDP_TX. A global
 * function: the verifier checks it once, not at each place the entry calls it (every
 * place where a packet turns out not to be a VIP's). */
__noinline int v6lb_npt(struct xdp_md *ctx, int rc, __u32 l4_off, __u32 proto,
			       __u32 later)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u8 *ip6 = data + sizeof(struct ethhdr);
	__u32 zero = 0, i, n, idx = V6LB_NPT_NONE, inbound = 0;
	__u32 off, val, qoff = 0, qval = 0, len;
	struct v6lb_conf *c = bpf_map_lookup_elem(&v6lb_conf, &zero);
	struct npt_map *m;
	__u64 src, dst, mask, pfx;
	__u8 *addr, *qa = 0, tmp[ETH_ALEN];
	int err, is_error = 0;

	if (!c || !c->npt_count || (void *)(ip6 + V6LB_IP6_LEN) > data_end)
		goto not_ours;
	n = c->npt_count;
	src = v6lb_first8(ip6 + 8);
	dst = v6lb_first8(ip6 + 24);
	for (i = 0; i < V6LB_MAX_NPT && i < n; i++) {
		__u32 k = i;

		m = bpf_map_lookup_elem(&v6lb_npt_pairs, &k);
		if (!m)
			break;
		if ((dst & m->mask) == m->out_pfx) {
			idx = i;
			inbound = 1;
			break;
		}
		if ((dst & m->mask) == m->in_pfx)
			goto not_ours; /* between inside hosts: the kernel routes it */
		if (idx == V6LB_NPT_NONE && (src & m->mask) == m->in_pfx)
			idx = i;
	}
	if (idx == V6LB_NPT_NONE)
		goto not_ours;
	if (rc) {
		v6lb_count(rc);
		return XDP_DROP;
	}
	m = bpf_map_lookup_elem(&v6lb_npt_pairs, &idx);
	if (!m)
		goto not_ours;
	if (ip6[7] <= 1) {
		v6lb_count(V6LB_CNT_PASS_HOP_LIMIT);
		return XDP_PASS;
	}
	addr = inbound ? ip6 + 24 : ip6 + 8;
	mask = m->mask;
	pfx = inbound ? m->in_pfx : m->out_pfx;
	err = v6lb_npt_word(addr, m->subnet, inbound ? m->adj_in : m->adj_out, &off, &val);
	if (proto == 58 && !later) {
		__u8 *l4;

		if (l4_off > V6LB_IP6_LEN + V6LB_MAX_EXT_BYTES + 8)
			goto not_ours; /* cannot happen: parsed */
		l4 = ip6 + l4_off;
		if ((void *)(l4 + 1) > data_end)
			goto not_ours; /* cannot happen: parsed */
		is_error = l4[0] < 128;
	}
	if (is_error) {
		__u64 qfirst;
		__u32 qerr;

		len = V6LB_IP6_LEN + (((__u32)ip6[4] << 8) | ip6[5]);
		if (len < l4_off + 8 + V6LB_IP6_LEN) {
			v6lb_count(V6LB_R_ICMP_ERROR_QUOTE_BAD);
			v6lb_icmp_count(V6LB_ICMP_NPT + 2 * (idx & (V6LB_MAX_NPT - 1)) + 1);
			return XDP_DROP;
		}
		/* the quote's destination (outbound) or source (inbound) */
		qa = ip6 + l4_off + 8 + (inbound ? 8 : 24);
		if ((void *)(qa + 16) > data_end)
			goto not_ours; /* cannot happen: the length was checked */
		qfirst = v6lb_first8(qa);
		if ((qfirst & mask) != (inbound ? m->out_pfx : m->in_pfx)) {
			v6lb_count(V6LB_R_ICMP_ERROR_UNMATCHED);
			v6lb_icmp_count(V6LB_ICMP_NPT + 2 * (idx & (V6LB_MAX_NPT - 1)) + 1);
			return XDP_DROP;
		}
		qerr = v6lb_npt_word(qa, m->subnet, inbound ? m->adj_in : m->adj_out, &qoff, &qval);
		if (qerr) {
			v6lb_count(V6LB_R_ICMP_ERROR_QUOTE_BAD);
			v6lb_icmp_count(V6LB_ICMP_NPT + 2 * (idx & (V6LB_MAX_NPT - 1)) + 1);
			return XDP_DROP;
		}
		/* translated (counted here: the core's order) */
		v6lb_icmp_count(V6LB_ICMP_NPT + 2 * (idx & (V6LB_MAX_NPT - 1)));
	}
	if (err) {
		v6lb_count(err);
		return XDP_DROP;
	}
	if (qa)
		v6lb_npt_write(qa, mask, pfx, qoff, qval);
	v6lb_npt_write(addr, mask, pfx, off, val);
	ip6[7] -= 1;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	v6lb_count(V6LB_CNT_TX_NPT);
	return XDP_TX;
not_ours:
	v6lb_count(V6LB_CNT_PASS_NOT_VIP);
	return XDP_PASS;
}

#endif
