/* v6lb XDP: an ICMPv6 error for a DSR VIP goes to the backend that owns the quoted flow,
 * as v6lb.core.dsr.DsrForwarder._icmp_error (and Katran) does.
 *
 * The quote is a packet the backend sent as the VIP (src = VIP, dst = client);
 * reversed, it names the client's flow, hashed as that flow's packets are. It is read
 * in the core's four shapes (docs/dsr.md), at the offsets the kernel plane reads:
 * TCP/UDP right after the quoted header (the reversed 4-tuple); after a Fragment header
 * with offset 0 (the 4-tuple) or a later one (the 3-tuple, the address's first VIP of
 * that protocol); after one 8-byte Hop-by-Hop or Destination Options header. Anything
 * else is dropped: icmp-error-unmatched (another source, protocol or port, a longer
 * option header), icmp-error-quote-bad (a quote cut short). The error then takes the
 * flow's path (v6lb_steer): its encapsulation or MAC rewrite, hop limit and MTU rules;
 * forwarded, it is counted icmp-forwarded too (as the core's per-VIP count).
 */
#ifndef V6LB_ICMP_H
#define V6LB_ICMP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "counters.h"
#include "maps.h"
#include "parse.h"

#define V6LB_R_ICMP_ERROR_UNMATCHED 24
#define V6LB_R_ICMP_ERROR_QUOTE_BAD 25

static __always_inline struct vip_val *v6lb_icmp_vip(const __u8 *addr, __u16 port, __u8 proto)
{
	struct vip_key k = {};

	__builtin_memcpy(k.addr, addr, 16);
	k.port = port;
	k.proto = proto;
	return bpf_map_lookup_elem(&v6lb_vips, &k);
}

/* The quoted flow's VIP (or 0: dropped, counted) and its hash key in ``key``. */
static __always_inline struct vip_val *v6lb_icmp_quote(__u8 *ip6, void *data_end, __u32 l4_off,
						       __u32 len, __u32 *key, __u32 *nwords)
{
	struct vip_val *svc;
	__u8 *q, *ql4, nh, qp;

	if (len < l4_off + 8 + V6LB_IP6_LEN || l4_off > V6LB_IP6_LEN + V6LB_MAX_EXT_BYTES + 8)
		goto bad;
	q = ip6 + l4_off + 8;
	if ((void *)(q + V6LB_IP6_LEN) > data_end)
		goto bad; /* cannot happen: the length was checked */
	if (*(__u64 *)(q + 8) != *(__u64 *)(ip6 + 24) ||
	    *(__u64 *)(q + 16) != *(__u64 *)(ip6 + 32))
		goto unmatched; /* not a packet the VIP sent */
	__builtin_memcpy(key, q + 24, 16); /* the client */
	__builtin_memcpy(key + 4, ip6 + 24, 16);
	nh = q[6];
	ql4 = q + V6LB_IP6_LEN;
	if (nh == 44 || nh == 0 || nh == 60) {
		if ((void *)(ql4 + 8) > data_end)
			goto bad;
		qp = ql4[0];
		if (nh == 44) {
			if ((((__u32)ql4[2] << 8) | ql4[3]) >> 3) {
				/* a later fragment: no ports, the 3-tuple */
				if (qp != 6 && qp != 17)
					goto unmatched;
				svc = v6lb_icmp_vip(ip6 + 24, 0, qp);
				if (!svc)
					goto unmatched;
				key[8] = qp;
				*nwords = 9;
				return svc;
			}
		} else if (ql4[1]) {
			goto unmatched; /* options longer than 8 bytes */
		}
		ql4 += 8;
	} else {
		qp = nh;
	}
	if (qp != 6 && qp != 17)
		goto unmatched;
	if ((void *)(ql4 + 4) > data_end)
		goto bad;
	/* quoted: VIP port, client port; the flow's key: client port, VIP port */
	if (!*(__u16 *)ql4)
		goto unmatched; /* port 0 keys are the defaults: no VIP serves port 0 */
	svc = v6lb_icmp_vip(ip6 + 24, *(__u16 *)ql4, qp);
	if (!svc)
		goto unmatched;
	key[8] = *(__u16 *)(ql4 + 2);
	key[9] = *(__u16 *)ql4;
	*nwords = 10;
	return svc;
unmatched:
	v6lb_count(V6LB_R_ICMP_ERROR_UNMATCHED);
	return 0;
bad:
	v6lb_count(V6LB_R_ICMP_ERROR_QUOTE_BAD);
	return 0;
}

#endif
