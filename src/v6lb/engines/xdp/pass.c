// SPDX-License-Identifier: GPL-2.0
/* v6lb XDP: a program that passes every frame to the stack, for the PEER of a veth the
 * v6lb program is attached to. A native XDP_TX on a veth hands the frame to the peer's
 * XDP receive path, which exists only while the peer has an XDP program: without one
 * the frame is dropped (docs/dataplane-xdp.md, "veth"). `v6lb lab up --dataplane xdp`
 * attaches this to the switch ports of the LB's links; the tests do the same. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int v6lb_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char _license[] SEC("license") = "GPL";
