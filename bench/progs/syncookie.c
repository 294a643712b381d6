/*
 * Issue 16's SYN-cookie prototype: XDP answers a TCP SYN to a protected local port with a
 * SYN-ACK whose sequence number is the kernel's own SYN cookie, so a flood never reaches
 * the stack. Helpers only (bcc can call them); no conntrack, no kfuncs.
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
 * - By default the SYN-ACK carries one option, MSS (the cookie encodes one of 4 MSS values).
 *   Without a timestamp option there is nowhere to encode window scaling or SACK
 *   (cookie_init_timestamp() puts them in TSval), so the connection has none: a window of
 *   at most 64 KiB. This is what the stack's own cookies give a client without timestamps.
 * - With SC_F_TIMESTAMPS on a listener (needs net.ipv4.tcp_timestamps=2 in its namespace,
 *   and the window scale the listener will use, from user space), a SYN with a timestamp
 *   gets the stack's full answer: MSS, SACK permitted, timestamps with the options encoded
 *   in TSval, window scale. ECN is never offered.
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
#define SC_LET_THROUGH 2        /* SYN to a protected listener let through (one per interval) */
#define SC_UNANSWERABLE 3       /* SYN to a protected listener we cannot rewrite: passed */
#define SC_HELPER_ERROR 4       /* the helper or the rewrite failed: passed (dropped if cut) */
#define SC_DROPPED 5            /* SC_ANSWER=0: a SYN that would have been answered, dropped */
#define SC_OTHER 6              /* anything else: passed untouched */
#define SC_NSTATS 7

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

#define SYNACK_TCP_LEN 24       /* 20-byte header + MSS option */
#define SYNACK_TCP_TS_LEN 40    /* + SACK permitted, timestamps, window scale (as Linux) */

#define SC_F_TIMESTAMPS 1       /* sc_port.flags: encode options in TSval (see above) */
#define TS_OPT_WSCALE_MASK 0xf  /* include/net/tcp.h: the options in TSval's low bits */
#define TS_OPT_SACK 0x10
#define TSBITS 6

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
	__u32 flags;            /* SC_F_* */
	__u8 rcv_wscale;        /* with SC_F_TIMESTAMPS: the window scale the listener uses */
	__u8 pad[3];
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
	/* SC_F_TIMESTAMPS, and the SYN carried a timestamp: */
	__u8 ts_ok;
	__u8 sack_ok;           /* the SYN offered SACK */
	__u8 ws_ok;             /* the SYN offered window scaling, snd_wscale its shift */
	__u8 snd_wscale;
	__u8 rcv_wscale;        /* ours, from sc_port */
	__u8 flags;             /* sc_port.flags */
	__u32 tsval;            /* the SYN's TSval (host order), our TSecr */
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

/* The SYN-ACK's TCP header and options, checksum left to the caller. Without timestamps
 * only the first 24 bytes are sent; the rest stays zero, so summing all of it is the same. */
struct synack_tcp {
	struct tcphdr th;
	__u8 opt_kind;
	__u8 opt_len;
	__be16 opt_mss;
	__u8 sack_or_nop[2];    /* SACK permitted (4, 2) or two NOPs */
	__u8 ts_kind;           /* 8 */
	__u8 ts_len;            /* 10 */
	__be32 tsval;
	__be32 tsecr;
	__u8 ws_or_nop[4];      /* NOP, window scale (3, 3, shift) or four NOPs */
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
	if (!s->ts_ok)
		return;
	/* cookie_init_timestamp(): the options the connection keeps go in TSval's low 6 bits,
	 * TSval = the stack's TCP clock (ms of CLOCK_MONOTONIC) rounded down to carry them, so
	 * that it never runs ahead of the timestamps the connection sends later. The stack
	 * reads them back in cookie_timestamp_decode() after subtracting its per-connection
	 * TS offset, which is 0 only with net.ipv4.tcp_timestamps=2: the condition of this
	 * mode (the offset is a secret XDP cannot compute). */
	__u32 options = s->ws_ok ? s->snd_wscale : TS_OPT_WSCALE_MASK;
	if (s->sack_ok)
		options |= TS_OPT_SACK;
	__u32 now = (__u32)(bpf_ktime_get_ns() / 1000000);
	__u32 ts = ((now >> TSBITS) << TSBITS) | options;
	if (ts > now)
		ts -= 1 << TSBITS;
	t->th.doff = SYNACK_TCP_TS_LEN / 4;
	t->sack_or_nop[0] = s->sack_ok ? 4 : 1;
	t->sack_or_nop[1] = s->sack_ok ? 2 : 1;
	t->ts_kind = 8;
	t->ts_len = 10;
	t->tsval = bpf_htonl(ts);
	t->tsecr = bpf_htonl(s->tsval);
	t->ws_or_nop[0] = 1;
	t->ws_or_nop[1] = s->ws_ok ? 3 : 1;
	t->ws_or_nop[2] = s->ws_ok ? 3 : 1;
	t->ws_or_nop[3] = s->ws_ok ? s->rcv_wscale : 1;
}

/* With SC_F_TIMESTAMPS: the SYN's timestamp, SACK permitted and window scale options.
 * Walked byte by byte with constant indices (the loop is unrolled): `next`, where the next
 * option starts, is only compared, never used as an index, so the verifier need not tell
 * its values apart and the paths stay few. `buf` has 8 spare bytes after the 60. */
static __always_inline void parse_options(const __u8 *buf, __u32 len, struct syn_info *s)
{
	__u32 next = 20;

#pragma clang loop unroll(full)
	for (int i = 20; i < 60; i++) {
		if (i >= len || i != next)
			continue;  /* past the header, or inside an option */
		__u8 kind = buf[i];
		if (kind == 1) {  /* NOP */
			next = i + 1;
			continue;
		}
		__u8 olen = buf[i + 1];
		if (kind == 0 || olen < 2) {  /* end of options, or malformed: stop */
			next = 60;
			continue;
		}
		if (kind == 3 && olen == 3) {
			s->ws_ok = 1;
			s->snd_wscale = buf[i + 2] > 14 ? 14 : buf[i + 2];  /* as tcp_parse_options() */
		} else if (kind == 4 && olen == 2) {
			s->sack_ok = 1;
		} else if (kind == 8 && olen == 10) {
			s->ts_ok = 1;
			s->tsval = ((__u32)buf[i + 2] << 24) | ((__u32)buf[i + 3] << 16) |
				   ((__u32)buf[i + 4] << 8) | buf[i + 5];
		}
		next = i + olen;
	}
	if (!s->ts_ok) {  /* no timestamp, nowhere to encode the rest: MSS only */
		s->sack_ok = 0;
		s->ws_ok = 0;
	}
}

/* The frame's length now. The empty asm pins the subtraction to data_end - data: clang
 * would otherwise fold it into `n - data_end + data`, pointer arithmetic the verifier refuses. */
static __always_inline int frame_len(struct xdp_md *ctx)
{
	long n = (long)ctx->data_end - (long)ctx->data;

	asm volatile("" : "+r"(n));
	return n;
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
	__u32 tcp_len = s->ts_ok ? SYNACK_TCP_TS_LEN : SYNACK_TCP_LEN;
	int delta = ETH_HLEN + 20 + tcp_len - frame_len(ctx);

	if (bpf_xdp_adjust_tail(ctx, delta))
		return count(SC_HELPER_ERROR, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN + 20 + tcp_len > data_end || data + ETH_HLEN + 20 + SYNACK_TCP_LEN > data_end)
		return count(SC_HELPER_ERROR, XDP_DROP);  /* the SYN is gone already */

	struct ethhdr *eth = data;
	__builtin_memcpy(eth->h_dest, s->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->dmac, ETH_ALEN);
	struct iphdr *ip = data + ETH_HLEN;
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(20 + tcp_len);
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
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(tcp_len);
	sum = sc_csum_add16(sum, (__u16 *)&t, sizeof(t) / 2);
	t.th.check = sc_csum_fold(sum);
	if (s->ts_ok) {
		if (data + ETH_HLEN + 20 + SYNACK_TCP_TS_LEN > data_end)
			return count(SC_HELPER_ERROR, XDP_DROP);
		__builtin_memcpy(data + ETH_HLEN + 20, &t, SYNACK_TCP_TS_LEN);
	} else {
		__builtin_memcpy(data + ETH_HLEN + 20, &t, SYNACK_TCP_LEN);
	}
	return count(SC_COOKIE4, XDP_TX);
}

static __always_inline int answer6(struct xdp_md *ctx, struct syn_info *s,
				   const struct in6_addr *saddr, const struct in6_addr *daddr)
{
	struct in6_addr src = *daddr, dst = *saddr;  /* copied: the rewrite overlaps them */
	__u32 tcp_len = s->ts_ok ? SYNACK_TCP_TS_LEN : SYNACK_TCP_LEN;
	int delta = ETH_HLEN + 40 + tcp_len - frame_len(ctx);

	if (bpf_xdp_adjust_tail(ctx, delta))
		return count(SC_HELPER_ERROR, XDP_PASS);
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	if (data + ETH_HLEN + 40 + SYNACK_TCP_LEN > data_end)
		return count(SC_HELPER_ERROR, XDP_DROP);

	struct ethhdr *eth = data;
	__builtin_memcpy(eth->h_dest, s->smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->dmac, ETH_ALEN);
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	*(__be32 *)ip6 = bpf_htonl(0x60000000);  /* version 6, no traffic class, no flow label */
	ip6->payload_len = bpf_htons(tcp_len);
	ip6->nexthdr = IPPROTO_TCP;
	ip6->hop_limit = 64;
	ip6->saddr = src;
	ip6->daddr = dst;

	struct synack_tcp t;
	fill_synack(&t, s);
	__u32 sum = sc_csum_add16(0, (__u16 *)&src, 8);
	sum = sc_csum_add16(sum, (__u16 *)&dst, 8);
	sum += bpf_htons(tcp_len) + bpf_htons(IPPROTO_TCP);
	sum = sc_csum_add16(sum, (__u16 *)&t, sizeof(t) / 2);
	t.th.check = sc_csum_fold(sum);
	if (s->ts_ok) {
		if (data + ETH_HLEN + 40 + SYNACK_TCP_TS_LEN > data_end)
			return count(SC_HELPER_ERROR, XDP_DROP);
		__builtin_memcpy(data + ETH_HLEN + 40, &t, SYNACK_TCP_TS_LEN);
	} else {
		__builtin_memcpy(data + ETH_HLEN + 40, &t, SYNACK_TCP_LEN);
	}
	return count(SC_COOKIE6, XDP_TX);
}

/* A plain SYN to a protected listener? Then let it through (once per interval: returns
 * XDP_PASS, counted) or answer it (returns 0); -1 when the segment is not one to act on. */
static __always_inline int syn_to_protected(struct tcphdr *th, struct sc_key *key,
					    struct syn_info *s)
{
	__u8 flags = ((__u8 *)th)[13];

	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)) != TCP_FLAG_SYN)
		return -1;
	key->port = bpf_ntohs(th->dest);
	struct sc_port *p = sc_ports.lookup(key);
	if (!p)
		return -1;
	s->flags = p->flags;
	s->rcv_wscale = p->rcv_wscale;
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
	__u8 tcpbuf[68] = {};
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
		r = syn_to_protected(th, &key, &s);
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
		if (s.flags & SC_F_TIMESTAMPS)
			parse_options(tcpbuf, len, &s);
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
		r = syn_to_protected(th, &key, &s);
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
		if (s.flags & SC_F_TIMESTAMPS)
			parse_options(tcpbuf, len, &s);
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
