/* v6lb XDP: the maps, filled by v6lb/engines/xdp/maps.py from the core's pools. */
#ifndef V6LB_MAPS_H
#define V6LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "counters.h"

#define V6LB_MAX_VIPS 256
#define V6LB_MAX_BACKENDS 4096
#define V6LB_TABLE_ENTRIES (16 * 65537) /* the Maglev tables' slots, all VIPs together */
#define V6LB_NONE 0xFFFFFFFFu

#define V6LB_MODE_IP6IP6 1
#define V6LB_MODE_SRV6 2

/* (address, port, protocol) -> VIP index. Port 0 entries are the core's defaults:
 * proto 0 = the address's first DSR VIP (services[0]: any address known to v6lb);
 * proto 6/17 = its first VIP of that protocol (_default: fragments). */
struct vip_key {
	__u8 addr[16];
	__u16 port; /* network order */
	__u8 proto;
	__u8 pad;
};

struct vip_val {
	__u32 index; /* into v6lb_vip_info, or V6LB_NONE */
};

struct vip_info {
	__u32 mode;       /* V6LB_MODE_* (0: a DSR mode this program does not serve) */
	__u32 seed;       /* lb.flow_hash_seed */
	__u32 table_off;  /* the loader's: where the table starts in map_entries' list */
	__u32 table_size; /* the pool's Maglev table size M (prime) */
	__u32 limit;      /* largest inner packet: mtu - overhead */
	__u32 pad;
};

struct backend {
	__u8 src[16]; /* the VIP's tunnel source */
	__u8 dst[16]; /* outer destination: the backend (its SID for dsr-srv6) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4 * V6LB_MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, struct vip_val);
} v6lb_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, V6LB_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct vip_info);
} v6lb_vip_info SEC(".maps");

/* VIP index -> that VIP's Maglev table, an array of table_size slots (map in map).
 * A health or `ctl` change builds a whole new table and swaps it in with one update
 * of this array (an atomic pointer exchange in the kernel): a packet sees the old
 * table or the new one, never a mix (docs/dataplane-xdp.md, "Atomic table updates").
 * BPF_F_INNER_MAP: the tables may differ in size. */
struct v6lb_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32); /* global backend index, or V6LB_NONE (no eligible backend) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, V6LB_MAX_VIPS);
	__type(key, __u32);
	__array(values, struct v6lb_table);
} v6lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, V6LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} v6lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V6LB_CNT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} v6lb_counters SEC(".maps");

static __always_inline void v6lb_count(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&v6lb_counters, &slot);

	if (c)
		*c += 1;
}

/* --- dsr-l2, npt (l2.h, npt.h) ----------------------------------------------------- */

#define V6LB_MODE_L2 3
#define V6LB_MAX_NPT 16

/* backend index -> its MAC for dsr-l2 (known 0: no MAC learned, the frame is passed) */
struct l2_mac {
	__u8 mac[6];
	__u8 known;
	__u8 pad;
};

/* one inside/outside pair (RFC 6296), as v6lb.core.nptv6.NptMapping: the first 8 bytes
 * of each prefix (zero-extended to the pair's length) and the mask of that length, all
 * in packet byte order; the adjustment added outbound and inbound (one's complement). */
struct npt_map {
	__u64 in_pfx;
	__u64 out_pfx;
	__u64 mask;
	__u16 adj_out;
	__u16 adj_in;
	__u8 subnet;  /* /48 or shorter: the subnet word (bits 48..63) is adjusted */
	__u8 pad[3];
};

/* the program's settings (one entry) */
struct v6lb_conf {
	__u32 npt_count;  /* v6lb_npt entries in use */
	__u32 l2_ifindex; /* dsr-l2 egress link (0: back out of the ingress link, XDP_TX) */
	__u8 l2_mac[6];   /* its MAC: the rewritten frames' source */
	__u16 pad;
	__u8 icmp_src[16]; /* the source of the Packet Too Big the program sends (ptb.h) */
	__u32 icmp_rate;   /* lb.icmp_error_rate: tokens per second, per CPU */
	__u32 icmp_burst;  /* lb.icmp_error_burst */
};

/* per CPU: the Packet Too Big token bucket (RFC 4443 sec. 2.4 f) */
struct icmp_bucket {
	__u64 tokens; /* in 1e-9 tokens */
	__u64 last;   /* bpf_ktime_get_ns of the last refill; 0: full */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, V6LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct l2_mac);
} v6lb_l2_macs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, V6LB_MAX_NPT);
	__type(key, __u32);
	__type(value, struct npt_map);
} v6lb_npt_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct v6lb_conf);
} v6lb_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct icmp_bucket);
} v6lb_icmp_bucket SEC(".maps");

/* ICMPv6 errors per VIP and per npt pair, as the core's IcmpErrors (v6lb status):
 * slot 2 * vip: forwarded to the quoted flow's owner, 2 * vip + 1: unmatched (on the
 * address's first VIP); V6LB_ICMP_NPT + 2 * pair: translated, + 1: unmatched. */
#define V6LB_ICMP_NPT (2 * V6LB_MAX_VIPS)
#define V6LB_ICMP_SLOTS (V6LB_ICMP_NPT + 2 * V6LB_MAX_NPT)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, V6LB_ICMP_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} v6lb_icmp_counts SEC(".maps");

static __always_inline void v6lb_icmp_count(__u32 slot)
{
	__u64 *c = bpf_map_lookup_elem(&v6lb_icmp_counts, &slot);

	if (c)
		*c += 1;
}

#endif
