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
#define V6LB_CNT_PASS_NOT_VIP 66  /* IPv6, neither a VIP's nor npt's: the host's own */
#define V6LB_CNT_PASS_ICMP_ERROR 67 /* unused since icmp.h steers ICMPv6 errors */
#define V6LB_CNT_PASS_HOP_LIMIT 68  /* inner hop limit <= 1: the stack sends Time Exceeded */
#define V6LB_CNT_PASS_TOO_BIG 69    /* longer than the tunnel MTU: left to the stack */
#define V6LB_CNT_PASS_MODE 70       /* the VIP's mode is not one this program serves */
#define V6LB_CNT_PASS_ADJUST 71     /* bpf_xdp_adjust_head refused the room */
/* dsr-l2, npt, ICMPv6 errors (l2.h, npt.h, icmp.h) */
#define V6LB_CNT_TX_L2 75          /* dsr-l2: MACs rewritten, XDP_TX or redirected */
#define V6LB_CNT_TX_NPT 76         /* npt: translated, sent back out (XDP_TX) */
#define V6LB_CNT_ICMP_FORWARDED 77 /* of tx and tx-l2: an ICMPv6 error sent to its flow's owner */
#define V6LB_CNT_PASS_NO_MAC 78    /* dsr-l2: the chosen backend has no MAC in the map */
#define V6LB_CNT_TX_TOO_BIG 79     /* a Packet Too Big sent back to the client (ptb.h) */
#define V6LB_CNT_SLOTS 80

#endif
