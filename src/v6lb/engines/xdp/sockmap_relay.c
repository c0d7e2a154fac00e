/* v6lb proxy-l4 kernel relay: splice two TCP sockets with a sockmap stream verdict.
 *
 * The builtin proxy (v6lb/engines/proxy/kernel_relay.py) puts both sockets of a relayed
 * connection in v6lb_relay_peers (no program there: a socket in it is only a redirect
 * target), writes one struct relay_end per socket into v6lb_relay_ends, then puts both
 * in v6lb_relay_socks, whose stream verdict is this program: from then on every byte a
 * socket receives is sent out of its peer by the kernel. Two socket maps, so that data
 * is never redirected to a peer that is not yet a target.
 *
 * Backpressure: the kernel queues redirected data in front of the peer socket without a
 * bound of its own. The program counts what it redirected and reads the peer's
 * write_seq (the bytes that entered its send buffer): when more than `limit` bytes
 * would wait in front of it, the socket's data is passed to the socket itself from then
 * on (flag PASSED, for good), where it is charged to its receive buffer, so the TCP
 * window closes as in any relay; the proxy sees the flag and relays that connection in
 * user space. docs/proxy.md ("Kernel relay") has the whole protocol.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define V6LB_RELAY_MAX 65536 /* sockets relayed at once (two per connection) */
#define V6LB_RELAY_BASED 1   /* base holds the peer's write_seq when relaying began */
#define V6LB_RELAY_PASSED 2  /* the peer fell behind: pass to the socket itself, for good */

/* CO-RE: libbpf finds the field in the running kernel's BTF. */
struct tcp_sock {
	__u32 write_seq;
} __attribute__((preserve_access_index));

struct relay_end {
	__u64 peer;  /* the peer socket's cookie */
	__u64 bytes; /* bytes redirected to the peer */
	__u32 limit; /* most bytes waiting in front of the peer */
	__u32 base;  /* the peer's write_seq at the first redirect */
	__u32 flags; /* V6LB_RELAY_* */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, V6LB_RELAY_MAX);
	__type(key, __u64);   /* socket cookie */
	__type(value, __u32); /* socket fd, from user space */
} v6lb_relay_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, V6LB_RELAY_MAX);
	__type(key, __u64);
	__type(value, __u32);
} v6lb_relay_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, V6LB_RELAY_MAX);
	__type(key, __u64); /* a socket's cookie */
	__type(value, struct relay_end);
} v6lb_relay_ends SEC(".maps");

SEC("sk_skb/stream_verdict")
int v6lb_relay_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct relay_end *e = bpf_map_lookup_elem(&v6lb_relay_ends, &cookie);
	struct bpf_sock *peer;
	struct tcp_sock *tp;
	__u32 wseq, queued;

	if (!e) /* user space writes the end before the socket enters v6lb_relay_socks */
		return SK_DROP;
	if (!skb->len) /* a bare FIN: the proxy passes the EOF on (an empty send is an error) */
		return SK_DROP;
	if (e->flags & V6LB_RELAY_PASSED)
		return SK_PASS;
	peer = bpf_map_lookup_elem(&v6lb_relay_peers, &e->peer);
	if (!peer) /* the peer closed: nothing to relay to, as in user space */
		return SK_DROP;
	tp = bpf_skc_to_tcp_sock(peer);
	wseq = tp ? tp->write_seq : 0;
	bpf_sk_release(peer);
	if (!tp)
		return SK_DROP;
	if (!(e->flags & V6LB_RELAY_BASED)) {
		e->base = wseq;
		e->flags |= V6LB_RELAY_BASED;
	}
	queued = (__u32)e->bytes - (wseq - e->base);
	if (queued + skb->len > e->limit) {
		e->flags |= V6LB_RELAY_PASSED;
		return SK_PASS;
	}
	e->bytes += skb->len;
	return bpf_sk_redirect_hash(skb, &v6lb_relay_peers, &e->peer, 0);
}

char _license[] SEC("license") = "GPL";
