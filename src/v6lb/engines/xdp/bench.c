// SPDX-License-Identifier: GPL-2.0
/* v6lb XDP, benchmark build only (benchmarks/bench_xdp.py; never attached).
 *
 * BPF_PROG_TEST_RUN with repeat runs the program again and again on one buffer: from
 * the second run on, v6lb_xdp would see its own output (an outer header to a backend,
 * a rewritten MAC, a translated address), and live-frames mode does not restore the
 * bytes either. This entry keeps the frame's first 54 bytes (Ethernet and IPv6
 * headers: all that dsr-l2 and npt change), runs the same code, then, if it sent the
 * frame, gives back the room an encapsulation took (bpf_xdp_adjust_head(+40 or +64),
 * by the change of bpf_xdp_get_buff_len) and writes the 54 bytes back, so every run
 * sees the original frame. The figure therefore includes the undo: it overstates the
 * program's cost a little.
 */
#define V6LB_NO_ENTRY
#include "v6lb_xdp.c"

#define V6LB_BENCH_KEEP (sizeof(struct ethhdr) + V6LB_IP6_LEN)

SEC("xdp")
int v6lb_xdp_bench(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u8 keep[V6LB_BENCH_KEEP];
	__u64 before = bpf_xdp_get_buff_len(ctx), grown;
	int rc;

	if (data + V6LB_BENCH_KEEP > data_end)
		return v6lb_xdp_main(ctx);
	__builtin_memcpy(keep, data, V6LB_BENCH_KEEP);
	rc = v6lb_xdp_main(ctx);
	if (rc != XDP_TX && rc != XDP_REDIRECT)
		return rc;
	grown = bpf_xdp_get_buff_len(ctx) - before;
	if (grown && bpf_xdp_adjust_head(ctx, (int)grown))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + V6LB_BENCH_KEEP > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, keep, V6LB_BENCH_KEEP);
	return rc;
}
