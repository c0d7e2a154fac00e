/* v6lb XDP: the per-CPU counter slots (array map "v6lb_counters").
 *
 * Slots 0..63 are v6lb.wire.reasons.Reason codes: a packet for a VIP address that the
 * Python core drops for that reason is dropped (XDP_DROP) and counted there.
 * Slots from 64 are the program's own outcomes. v6lb/engines/xdp/maps.py reads this
 * file for the names, so the two never disagree.
 */
#ifndef V6LB_COUNTERS_H
#define V6LB_COUNTERS_H

#define V6LB_CNT_TX 64            /* encapsulated and sent back out (XDP_TX) */
#define V6LB_CNT_PASS_NOT_IPV6 65 /* not an IPv6 frame, or shorter than its header */
#define V6LB_CNT_PASS_NOT_VIP 66  /* IPv6, but not to a VIP address: the host's own */
#define V6LB_CNT_PASS_ICMP_ERROR 67 /* an ICMPv6 error for a VIP: left to the stack */
#define V6LB_CNT_PASS_HOP_LIMIT 68  /* inner hop limit <= 1: the stack sends Time Exceeded */
#define V6LB_CNT_PASS_TOO_BIG 69    /* longer than the tunnel MTU: left to the stack */
#define V6LB_CNT_PASS_MODE 70       /* the VIP's mode is not one this program serves */
#define V6LB_CNT_PASS_ADJUST 71     /* bpf_xdp_adjust_head refused the room */
#define V6LB_CNT_SLOTS 80

#endif
