// SPDX-License-Identifier: GPL-2.0
/* v6lb XDP, benchmark build only (benchmarks/bench_xdp.py; never attached).
 *
 * BPF_PROG_TEST_RUN with repeat runs the program again and again on one buffer: from
 * the second run on, v6lb_xdp would see its own output (an outer header to a backend,
 * not a VIP packet), and live-frames mode does not restore the bytes either. This
 * entry runs the same code, then undoes an encapsulation (the inner hop limit, the
 * MAC swap, bpf_xdp_adjust_head(+40 or +64)), so every run sees the original frame. The
 * figure therefore includes the undo: it overstates the program's cost a little.
 */
#define V6LB_NO_ENTRY
#include "v6lb_xdp.c"

SEC("xdp")
int v6lb_xdp_bench(struct xdp_md *ctx)
{
	int rc = v6lb_xdp_main(ctx);
	void *data, *data_end;
	struct ethhdr *eth, *old;
	__u8 *inner;
	int room;

	if (rc != XDP_TX)
		return rc;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(struct ethhdr) + 2 * V6LB_IP6_LEN > data_end)
		return XDP_ABORTED;
	eth = data;
	/* the outer next header says which: 43 (SRH follows) or 41 */
	if (((__u8 *)data)[sizeof(struct ethhdr) + 6] == 43) {
		if (data + sizeof(struct ethhdr) + 2 * V6LB_IP6_LEN + V6LB_SRH_LEN > data_end)
			return XDP_ABORTED;
		room = V6LB_IP6_LEN + V6LB_SRH_LEN;
		old = data + V6LB_IP6_LEN + V6LB_SRH_LEN;
		inner = data + sizeof(struct ethhdr) + V6LB_IP6_LEN + V6LB_SRH_LEN;
	} else {
		room = V6LB_IP6_LEN;
		old = data + V6LB_IP6_LEN;
		inner = data + sizeof(struct ethhdr) + V6LB_IP6_LEN;
	}
	inner[7] += 1;
	__builtin_memcpy(old->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(old->h_source, eth->h_dest, ETH_ALEN);
	old->h_proto = eth->h_proto;
	if (bpf_xdp_adjust_head(ctx, room))
		return XDP_ABORTED;
	return rc;
}
