/*
 * Issue 16's SYN-cookie prototype: XDP answers a TCP SYN to a protected local port with a
 * SYN-ACK whose sequence number is the kernel's own SYN cookie, so a flood never reaches
 * the listener's SYN queue. Helpers only (bcc can call them); no conntrack, no kfuncs.
 * bench/syncookie.py builds, fills and reads it; docs/benchmarks.md ("SYN cookies at XDP")
 * has the design, its conditions and the figures.
 *
 * The protocol decisions:
 * - The cookie is bpf_tcp_raw_gen_syncookie_ipv4/6(), i.e. __cookie_v4/v6_init_sequence(),
 *   the same function and per-boot secret the stack uses for its own cookies. The client's
 *   ACK therefore goes to the stack (XDP_PASS), whose cookie_v4/v6_check() accepts it and
 *   creates the connection: no state here, no state to forge.
 * - The stack checks a cookie ACK only while the listener is "in cookie mode"
 *   (tcp_synq_no_recent_overflow(): it sent a cookie itself in the last
 *   TCP_SYNCOOKIE_VALID = 2 min). With net.ipv4.tcp_syncookies=2 it answers every SYN it
 *   sees with a cookie and refreshes that stamp, so this program lets one SYN per protected
 *   listener (address, port) per `interval_ns` through to the stack instead of answering it.
 * - Only listed (address, port) pairs are answered: the program protects local listeners,
 *   it must not answer for addresses it forwards to.
 * - The SYN-ACK carries one option, MSS (the cookie encodes one of 4 MSS values). Without
 *   a timestamp option there is nowhere to encode window scaling, SACK or ECN
 *   (cookie_init_timestamp() puts them in TSval), so the connection has none: a window of
 *   at most 64 KiB. This is what the stack's own cookies give a client without timestamps.
 * - Only a plain SYN (SYN set; ACK, RST, FIN clear) is answered: the listener would drop
 *   SYN+RST and SYN+FIN anyway. IPv4 with options, IPv6 with extension headers, fragments
 *   and VLAN-tagged frames go to the stack unanswered (counted): the prototype keeps the
 *   rewrite to fixed offsets.
 * - A SYN's payload (TCP Fast Open data) is dropped with the SYN; the client resends it.
 *
 * -DSC_ANSWER=0 builds the comparison program: same parsing and port lookup, but a SYN that
 * would be answered is dropped instead (the cost of a plain drop, for the bench).
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#ifndef SC_ANSWER
#define SC_ANSWER 1
#endif

/* sc_stats slots (per CPU; bench/syncookie.py STATS names them in this order). */
#define SC_COOKIE4 0            /* SYN-ACK with a cookie sent back (XDP_TX), IPv4 */
#define SC_COOKIE6 1            /* the same, IPv6 */
#define SC_LET_THROUGH 2        /* SYN to a protected listener passed to the stack (one per interval) */
#define SC_UNANSWERABLE 3       /* SYN to a protected listener the prototype cannot rewrite: passed */
#define SC_HELPER_ERROR 4       /* the cookie helper refused the header: passed */
#define SC_DROPPED 5            /* SC_ANSWER=0: a SYN that would have been answered, dropped */
#define SC_OTHER 6              /* anything else: passed untouched */
#define SC_NSTATS 7

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define SYNACK_TCP_LEN 24       /* 20-byte header + MSS option */
#define SYNACK4_LEN (ETH_HLEN + 20 + SYNACK_TCP_LEN)
#define SYNACK6_LEN (ETH_HLEN + 40 + SYNACK_TCP_LEN)

/* A protected listener: a local address and port. The stack keeps its cookie-mode stamp
 * per listening socket, so the let-through state is per (address, port): a SYN let through
 * to one listener does not put another (other address, other family) in cookie mode. */
struct sc_key {
	__u8 family;            /* 4 or 6 */
	__u8 pad;
	__u16 port;             /* host order */
	__u8 addr[16];          /* be; IPv4 in the first 4 bytes, the rest zero */
};

struct sc_port {
	__u64 interval_ns;      /* let one SYN through per this many ns (0: every SYN) */
	__u64 last_pass_ns;     /* bpf_ktime_get_ns() of the last one let through */
};

/* sc_ports: protected listeners -> their state. */
BPF_HASH(sc_ports, struct sc_key, struct sc_port, 1024);
/* sc_stats: the counters above, per CPU. */
BPF_PERCPU_ARRAY(sc_stats, __u64, SC_NSTATS);

/* What the SYN-ACK needs from the SYN, saved before the frame is rewritten. */
struct syn_info {
	__u8 smac[ETH_ALEN];
	__u8 dmac[ETH_ALEN];
	__be16 sport;
	__be16 dport;
	__u32 seq;              /* host order */
	__u32 cookie;
	__u16 mss;
};

static __always_inline int count(int slot, int verdict)
{
	__u32 key = slot;
	__u64 *n = sc_stats.lookup(&key);

	if (n)
		*n += 1;
	return verdict;
}

static __always_inline __u32 sc_csum_add16(__u32 sum, const __u16 *w, int words)
{
#pragma unroll
	for (int i = 0; i < words; i++)
		sum += w[i];
	return sum;
}

static __always_inline __u16 sc_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* The SYN-ACK's TCP header and MSS option, checksum left to the caller. */
struct synack_tcp {
	struct tcphdr th;
	__u8 opt_kind;
	__u8 opt_len;
	__be16 opt_mss;
};

static __always_inline void fill_synack(struct synack_tcp *t, const struct syn_info *s)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->th.source = s->dport;
	t->th.dest = s->sport;
	t->th.seq = bpf_htonl(s->cookie);
	t->th.ack_seq = bpf_htonl(s->seq + 1);
	t->th.doff = SYNACK_TCP_LEN / 4;
	t->th.syn = 1;
	t->th.ack = 1;
	/* The stack's unscaled initial window: the largest multiple of the MSS <= 65535
	 * (tcp_select_initial_window() with no window scaling), which the connection the
	 * stack builds from the cookie will also use. */
	t->th.window = bpf_htons(65535 - 65535 % s->mss);
	t->opt_kind = 2;        /* TCPOPT_MSS */
	t->opt_len = 4;
	t->opt_mss = bpf_htons(s->mss);
}

/* Read the SYN's TCP header (with its options) onto the stack for the cookie helper:
 * its length is variable, which the verifier accepts for a stack buffer. */
static __always_inline int load_tcp(struct xdp_md *ctx, __u32 off, __u8 *buf, __u32 len)
{
	if (len < sizeof(struct tcphdr) || len > 60)
		return -1;
	return bpf_xdp_load_bytes(ctx, off, buf, len);
}

static __always_inline int answer4(struct xdp_md *ctx, struct syn_info *s, __be32 saddr,
				   __be32 daddr)
{
	int delta = SYNACK4_LEN - (int)(ctx->data_end - ctx->data);

	if (bpf_xdp_adjust_tail(ctx, delta))
		return count(SC_HELPER_ERROR, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + SYNACK4_LEN > data_end)
		return count(SC_HELPER_ERROR, XDP_DROP);  /* the SYN is gone already */

	struct ethhdr *eth = data;
	__builtin_memcpy(eth->h_dest, s->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->dmac, ETH_ALEN);
	struct iphdr *ip = data + ETH_HLEN;
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(20 + SYNACK_TCP_LEN);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000);  /* DF */
	ip->ttl = 64;
	ip->protocol = IPPROTO_TCP;
	ip->check = 0;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = sc_csum_fold(sc_csum_add16(0, (__u16 *)ip, 10));

	struct synack_tcp t;
	fill_synack(&t, s);
	__u32 sum = sc_csum_add16(0, (__u16 *)&ip->saddr, 4);  /* pseudo header: addresses */
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(SYNACK_TCP_LEN);
	sum = sc_csum_add16(sum, (__u16 *)&t, SYNACK_TCP_LEN / 2);
	t.th.check = sc_csum_fold(sum);
	__builtin_memcpy(data + ETH_HLEN + 20, &t, sizeof(t));
	return count(SC_COOKIE4, XDP_TX);
}

static __always_inline int answer6(struct xdp_md *ctx, struct syn_info *s,
				   const struct in6_addr *saddr, const struct in6_addr *daddr)
{
	struct in6_addr src = *daddr, dst = *saddr;  /* copied: the rewrite overlaps them */
	int delta = SYNACK6_LEN - (int)(ctx->data_end - ctx->data);

	if (bpf_xdp_adjust_tail(ctx, delta))
		return count(SC_HELPER_ERROR, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + SYNACK6_LEN > data_end)
		return count(SC_HELPER_ERROR, XDP_DROP);

	struct ethhdr *eth = data;
	__builtin_memcpy(eth->h_dest, s->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->dmac, ETH_ALEN);
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	*(__be32 *)ip6 = bpf_htonl(0x60000000);  /* version 6, no traffic class, no flow label */
	ip6->payload_len = bpf_htons(SYNACK_TCP_LEN);
	ip6->nexthdr = IPPROTO_TCP;
	ip6->hop_limit = 64;
	ip6->saddr = src;
	ip6->daddr = dst;

	struct synack_tcp t;
	fill_synack(&t, s);
	__u32 sum = sc_csum_add16(0, (__u16 *)&src, 8);
	sum = sc_csum_add16(sum, (__u16 *)&dst, 8);
	sum += bpf_htons(SYNACK_TCP_LEN) + bpf_htons(IPPROTO_TCP);
	sum = sc_csum_add16(sum, (__u16 *)&t, SYNACK_TCP_LEN / 2);
	t.th.check = sc_csum_fold(sum);
	__builtin_memcpy(data + ETH_HLEN + 40, &t, sizeof(t));
	return count(SC_COOKIE6, XDP_TX);
}

/* A plain SYN to a protected listener? Then let it through (once per interval: returns
 * XDP_PASS, counted) or answer it (returns 0); -1 when the segment is not one to act on. */
static __always_inline int syn_to_protected(struct tcphdr *th, struct sc_key *key)
{
	__u8 flags = ((__u8 *)th)[13];

	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)) != TCP_FLAG_SYN)
		return -1;
	key->port = bpf_ntohs(th->dest);
	struct sc_port *p = sc_ports.lookup(key);
	if (!p)
		return -1;
	__u64 now = bpf_ktime_get_ns();
	if (now - p->last_pass_ns >= p->interval_ns) {
		/* Racy across CPUs by design: two SYNs let through instead of one is harmless. */
		p->last_pass_ns = now;
		return count(SC_LET_THROUGH, XDP_PASS);
	}
	return 0;
}

int xdp_syncookie(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct syn_info s = {};
	struct sc_key key = {};
	__u8 tcpbuf[60] = {};
	int r;

	if ((void *)(eth + 1) > data_end)
		return count(SC_OTHER, XDP_PASS);
	__builtin_memcpy(s.smac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(s.dmac, eth->h_dest, ETH_ALEN);

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
			return count(SC_OTHER, XDP_PASS);
		if (ip->frag_off & bpf_htons(0x3fff))  /* MF or an offset: not a whole SYN */
			return count(SC_OTHER, XDP_PASS);
		struct tcphdr *th = (void *)ip + ip->ihl * 4;
		if (ip->ihl < 5 || (void *)(th + 1) > data_end)
			return count(SC_OTHER, XDP_PASS);
		key.family = 4;
		__builtin_memcpy(key.addr, &ip->daddr, 4);
		r = syn_to_protected(th, &key);
		if (r < 0)
			return count(SC_OTHER, XDP_PASS);
		if (r > 0)
			return r;  /* let through, counted */
		if (ip->ihl != 5)
			return count(SC_UNANSWERABLE, XDP_PASS);
#if !SC_ANSWER
		return count(SC_DROPPED, XDP_DROP);
#endif
		__u32 len = th->doff * 4;
		if (load_tcp(ctx, ETH_HLEN + 20, tcpbuf, len) < 0)
			return count(SC_OTHER, XDP_PASS);
		__s64 ret = bpf_tcp_raw_gen_syncookie_ipv4(ip, (struct tcphdr *)tcpbuf, len);
		if (ret < 0)
			return count(SC_HELPER_ERROR, XDP_PASS);
		s.cookie = (__u32)ret;
		s.mss = (__u16)(ret >> 32);
		s.sport = th->source;
		s.dport = th->dest;
		s.seq = bpf_ntohl(th->seq);
		return answer4(ctx, &s, ip->saddr, ip->daddr);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return count(SC_OTHER, XDP_PASS);  /* extension headers included */
		struct tcphdr *th = (void *)(ip6 + 1);
		if ((void *)(th + 1) > data_end)
			return count(SC_OTHER, XDP_PASS);
		key.family = 6;
		__builtin_memcpy(key.addr, &ip6->daddr, 16);
		r = syn_to_protected(th, &key);
		if (r < 0)
			return count(SC_OTHER, XDP_PASS);
		if (r > 0)
			return r;
#if !SC_ANSWER
		return count(SC_DROPPED, XDP_DROP);
#endif
		__u32 len = th->doff * 4;
		if (load_tcp(ctx, ETH_HLEN + 40, tcpbuf, len) < 0)
			return count(SC_OTHER, XDP_PASS);
		__s64 ret = bpf_tcp_raw_gen_syncookie_ipv6(ip6, (struct tcphdr *)tcpbuf, len);
		if (ret < 0)
			return count(SC_HELPER_ERROR, XDP_PASS);
		s.cookie = (__u32)ret;
		s.mss = (__u16)(ret >> 32);
		s.sport = th->source;
		s.dport = th->dest;
		s.seq = bpf_ntohl(th->seq);
		struct in6_addr saddr = ip6->saddr, daddr = ip6->daddr;
		return answer6(ctx, &s, &saddr, &daddr);
	}
	return count(SC_OTHER, XDP_PASS);
}
