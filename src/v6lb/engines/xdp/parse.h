/* v6lb XDP: the IPv6 extension-header walk of v6lb.wire.ipv6.parse, rule for rule.
 *
 * Offsets are from the start of the IPv6 header. The caller has checked that the
 * packet ends exactly where its payload length says (the core's strict length), so
 * "past the end" is "past data_end". Return 0 or a v6lb.wire.reasons.Reason code.
 * - Hop-by-Hop only right after the IPv6 header (RFC 8200 §4.1);
 * - generic headers (0, 43, 60, 135, 139, 140, 253, 254): (len + 1) * 8 bytes;
 *   AH (51): (len + 2) * 4; Fragment (44): 8, a later fragment ends the walk;
 * - at most 8 headers and 1024 bytes (MAX_EXT_HEADERS, MAX_EXT_BYTES): a bounded loop;
 * - anything else is the upper layer (RFC 7045), which must hold its minimal header
 *   (TCP 20, UDP 8, ICMPv6 4 bytes).
 */
#ifndef V6LB_PARSE_H
#define V6LB_PARSE_H

#include <linux/types.h>

#define V6LB_MAX_EXT_HEADERS 8
#define V6LB_MAX_EXT_BYTES 1024
#define V6LB_IP6_LEN 40

/* Reason codes (v6lb/wire/reasons.py) */
#define V6LB_R_EXT_TRUNCATED 4
#define V6LB_R_EXT_CHAIN_TOO_LONG 5
#define V6LB_R_HBH_NOT_FIRST 6
#define V6LB_R_INCOMPLETE_CHAIN 7
#define V6LB_R_L4_TRUNCATED 8

struct v6lb_pkt {
	__u32 l4_off;   /* upper-layer header (a later fragment: its data) */
	__s32 frag_off; /* Fragment header, or -1 */
	__u8 proto;     /* upper-layer protocol */
	__u8 later;     /* a later fragment: no upper-layer header here */
	__u8 more;      /* the M flag */
};

static __always_inline int v6lb_generic(__u8 nh)
{
	switch (nh) {
	case 0: case 43: case 60: case 135: case 139: case 140: case 253: case 254:
		return 1;
	}
	return 0;
}

static __always_inline int v6lb_l4_min(__u8 proto)
{
	switch (proto) {
	case 6: return 20;
	case 17: return 8;
	case 58: return 4;
	}
	return 0;
}

static __always_inline int v6lb_parse(__u8 *ip6, void *data_end, struct v6lb_pkt *p)
{
	__u8 nh = ip6[6];
	__u32 off = V6LB_IP6_LEN;
	__u32 hlen;
	int i, need;

	p->frag_off = -1;
	p->later = 0;
	p->more = 0;
#pragma unroll
	for (i = 0; i <= V6LB_MAX_EXT_HEADERS; i++) {
		__u8 *h;

		/* off never exceeds 40 + 1024 here: the chain limit checked below */
		if (off > V6LB_IP6_LEN + V6LB_MAX_EXT_BYTES)
			return V6LB_R_EXT_CHAIN_TOO_LONG;
		h = ip6 + off;
		if (v6lb_generic(nh)) {
			if (nh == 0 && i)
				return V6LB_R_HBH_NOT_FIRST;
			if ((void *)(h + 8) > data_end)
				return p->frag_off >= 0 ? V6LB_R_INCOMPLETE_CHAIN : V6LB_R_EXT_TRUNCATED;
			hlen = ((__u32)h[1] + 1) << 3;
		} else if (nh == 44) {
			__u16 fo;

			if ((void *)(h + 8) > data_end)
				return V6LB_R_EXT_TRUNCATED;
			fo = (((__u16)h[2] << 8) | h[3]) & 0xfff8;
			p->frag_off = off;
			p->more = h[3] & 1;
			hlen = 8;
			if (fo) {
				p->later = 1;
				p->proto = h[0];
				p->l4_off = off + 8;
				return 0;
			}
		} else if (nh == 51) {
			if ((void *)(h + 8) > data_end)
				return p->frag_off >= 0 ? V6LB_R_INCOMPLETE_CHAIN : V6LB_R_EXT_TRUNCATED;
			hlen = ((__u32)h[1] + 2) << 2;
		} else {
			goto upper;
		}
		if (i + 1 > V6LB_MAX_EXT_HEADERS ||
		    off + hlen - V6LB_IP6_LEN > V6LB_MAX_EXT_BYTES)
			return V6LB_R_EXT_CHAIN_TOO_LONG;
		if ((void *)(h + hlen) > data_end)
			return p->frag_off >= 0 ? V6LB_R_INCOMPLETE_CHAIN : V6LB_R_EXT_TRUNCATED;
		nh = h[0];
		off += hlen;
	}
	return V6LB_R_EXT_CHAIN_TOO_LONG;
upper:
	p->proto = nh;
	p->l4_off = off;
	need = v6lb_l4_min(nh);
	if (need && (void *)(ip6 + off + need) > data_end)
		return p->frag_off >= 0 && p->more ? V6LB_R_INCOMPLETE_CHAIN : V6LB_R_L4_TRUNCATED;
	return 0;
}

#endif
