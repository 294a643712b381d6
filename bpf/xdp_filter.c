// SPDX-License-Identifier: GPL-2.0
/*
 * xdp_filter.c - xdpfw data plane, compiled and loaded by bcc.
 *
 * For every frame: parse L2/L3/L4 into a small summary, look the summary up
 * in at most five tables (exact source, source prefixes, exact destination,
 * destination prefixes, address-less rules), keep the best-ranked matching
 * slot, credit that rule and leave through finish(), the only exit, which
 * records the global counters. An IPv4 prefix lookup is one or two array
 * loads (DIR-24-8, see xdpfw_abi.h), an IPv6 one a trie walk; crediting a
 * rule is one per-CPU array element (the slot carries its index) and a
 * coarse clock read.
 *
 * The rule contract (allow beats drop beats monitor, then most specific) is
 * encoded by the control plane in each slot's rank (see xdpfw_abi.h), so the
 * data plane never scans rules: each lookup is O(1) or one IPv6 trie walk, and each
 * entry holds at most 1 + XDPFW_SET_SLOTS slots.
 *
 * The program only returns XDP_PASS or XDP_DROP; it never aborts.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <linux/icmpv6.h>

#include "xdpfw_abi.h"

/* IPv4 fragment bits of frag_off (host order), from include/net/ip.h. */
#define XDPFW_IP_MF 0x2000
#define XDPFW_IP_OFFSET 0x1fff

/*
 * Fragment offset of an IPv6 fragment header's frag_off (host order): the top 13 bits,
 * in units of 8 bytes, above 2 reserved bits and the M flag (RFC 8200 4.5; IP6_OFFSET in
 * include/net/ipv6.h). Non-zero means a non-first fragment, whose bytes are payload: the
 * M flag alone (a first fragment) still carries the upper-layer header.
 */
#define XDPFW_IP6_OFFSET 0xfff8

#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif

/* Exact addresses: hash tables, O(1) however many rules there are. */
BPF_F_TABLE("hash", __u32, struct xdpfw_entry, xdpfw_src4, XDPFW_MAX_RULES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", __u32, struct xdpfw_entry, xdpfw_dst4, XDPFW_MAX_RULES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct xdpfw_addr6, struct xdpfw_entry, xdpfw_src6, XDPFW_MAX_RULES,
	    BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct xdpfw_addr6, struct xdpfw_entry, xdpfw_dst6, XDPFW_MAX_RULES,
	    BPF_F_NO_PREALLOC);
/*
 * IPv4 prefixes shorter than a host route: DIR-24-8 per direction (xdpfw_abi.h). The cells
 * name the entry of the longest covering prefix; entries carry covering prefixes' slots.
 */
BPF_F_TABLE("array", __u32, struct xdpfw_d248_row, xdpfw_src4_tbl24, XDPFW_D248_TBL24_ROWS,
	    BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct xdpfw_d248_row, xdpfw_src4_tbl8,
	    XDPFW_MAX_TBL8_GROUPS * (256 / XDPFW_D248_ROW), BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct xdpfw_pfx_entry, xdpfw_src4_pfx, 2 * XDPFW_MAX_PREFIXES + 1,
	    BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct xdpfw_d248_row, xdpfw_dst4_tbl24, XDPFW_D248_TBL24_ROWS,
	    BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct xdpfw_d248_row, xdpfw_dst4_tbl8,
	    XDPFW_MAX_TBL8_GROUPS * (256 / XDPFW_D248_ROW), BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct xdpfw_pfx_entry, xdpfw_dst4_pfx, 2 * XDPFW_MAX_PREFIXES + 1,
	    BPF_F_MMAPABLE);
/* IPv6 prefixes: LPM tries. */
BPF_LPM_TRIE(xdpfw_src6_lpm, struct xdpfw_lpm6_key, struct xdpfw_entry, XDPFW_MAX_PREFIXES);
BPF_LPM_TRIE(xdpfw_dst6_lpm, struct xdpfw_lpm6_key, struct xdpfw_entry, XDPFW_MAX_PREFIXES);
/* Rules naming no address (protocol/port only): one entry, key 0; a hash so updates are atomic. */
BPF_F_TABLE("hash", __u32, struct xdpfw_entry, xdpfw_any, 1, BPF_F_NO_PREALLOC);
/* Overflow slots of entries holding more than one rule; index 0 is never used. */
BPF_ARRAY(xdpfw_sets, struct xdpfw_set, XDPFW_MAX_SETS);
/* Per-rule packets/bytes, per CPU, indexed by the slot's counter (0 unused). */
BPF_PERCPU_ARRAY(xdpfw_rule_stats, struct xdpfw_rule_stats, XDPFW_MAX_RULES + 1);
/* Per-rule last hit (coarse ns, 0 = never), same index, shared by the CPUs. */
BPF_F_TABLE("array", __u32, __u64, xdpfw_rule_seen, XDPFW_MAX_RULES + 1, BPF_F_MMAPABLE);
/* Global counters, per CPU, one element. */
BPF_PERCPU_ARRAY(xdpfw_stats, struct xdpfw_global_stats, 1);
/* ABI version, capacities and per-table entry counts, one element. */
BPF_ARRAY(xdpfw_config, struct xdpfw_config, 1);
/* X-ray: is anything sampled (and how), which rules, the cap, what was lost, the records. */
BPF_ARRAY(xdpfw_sample_ctl, struct xdpfw_sample_ctl, 1);
BPF_F_TABLE("hash", __u32, struct xdpfw_sample_rule, xdpfw_sample_rules, XDPFW_SAMPLE_MAX_RULES,
	    BPF_F_NO_PREALLOC);
BPF_ARRAY(xdpfw_sample_bucket, struct xdpfw_sample_bucket, 1);
BPF_PERCPU_ARRAY(xdpfw_sample_stats, struct xdpfw_sample_stats, 1);
BPF_RINGBUF_OUTPUT(xdpfw_samples, XDPFW_SAMPLE_RING_BYTES / 4096);

/* --- rate limits (issue 16); see the rate-limit section of xdpfw_abi.h --- */
/* Each limit rule's budget parameters, keyed by rule id. */
BPF_F_TABLE("hash", __u32, struct xdpfw_limit, xdpfw_limits, XDPFW_MAX_LIMITS, BPF_F_NO_PREALLOC);
/* Per limit rule, per CPU: passed / limited / banned frames. */
BPF_PERCPU_HASH(xdpfw_limit_stats, __u32, struct xdpfw_limit_stats, XDPFW_MAX_LIMITS);
/*
 * GCRA state per (rule, source) or per rule; LRU: a full map evicts the least recent.
 * Shared by the CPUs (the contract). XDPFW_PERCPU_BUCKETS builds the per-CPU variant the
 * benchmark compares it with (bench/floods.py); the product never sets it.
 */
#ifdef XDPFW_PERCPU_BUCKETS
BPF_F_TABLE("lru_percpu_hash", struct xdpfw_bucket_key, struct xdpfw_bucket, xdpfw_buckets,
	    XDPFW_MAX_BUCKETS, 0);
#else
BPF_F_TABLE("lru_hash", struct xdpfw_bucket_key, struct xdpfw_bucket, xdpfw_buckets,
	    XDPFW_MAX_BUCKETS, 0);
#endif
/* Banned (rule, source) pairs: the value is the CLOCK_MONOTONIC ns the ban ends. */
BPF_F_TABLE("lru_hash", struct xdpfw_bucket_key, __u64, xdpfw_bans, XDPFW_MAX_BANS, 0);

/* What the verdict needs to know about a frame. */
struct pkt {
	__u64 len;          /* frame bytes */
	__u32 saddr4;       /* be */
	__u32 daddr4;       /* be */
	struct xdpfw_addr6 saddr6;
	struct xdpfw_addr6 daddr6;
	__u16 dport;        /* host; valid when l4_ok */
	__u8 tcp_flags;     /* byte 13 of the TCP header; valid when l4_ok and proto TCP */
	__u8 family;        /* 4 or 6 */
	__u8 proto;         /* upper-layer protocol */
	__u8 l4_ok;         /* ports were read */
	__u8 malformed;
	__u8 fragment;
};

/* Best slot so far. */
struct best {
	__u64 rank;
	__u32 counter;
	__u32 rule_id;  /* the winning rule: limit state and X-ray's samples are under it */
	__u8 verdict;
};

/* Parser return codes. */
#define PARSE_OK 0
#define PARSE_MALFORMED 1 /* pass, counted; no rule applies */
#define PARSE_NON_IP 2    /* pass, counted */

struct cursor {
	void *pos;
	void *end;
};

static __always_inline int parse_eth(struct cursor *c, __u16 *ethertype)
{
	struct ethhdr *eth = c->pos;
	struct vlan_tag {
		__be16 tci;
		__be16 proto;
	} *vlan;
	__u16 type;

	if ((void *)(eth + 1) > c->end)
		return PARSE_MALFORMED;
	c->pos = eth + 1;
	type = eth->h_proto;

	/* Look through up to two tags (QinQ). A third tag is not IP to us. */
#pragma unroll
	for (int i = 0; i < XDPFW_MAX_VLAN; i++) {
		if (type != bpf_htons(ETH_P_8021Q) && type != bpf_htons(ETH_P_8021AD))
			break;
		vlan = c->pos;
		if ((void *)(vlan + 1) > c->end)
			return PARSE_MALFORMED;
		c->pos = vlan + 1;
		type = vlan->proto;
	}
	*ethertype = type;
	return PARSE_OK;
}

/*
 * The L4 header: ports for TCP/UDP. A first fragment or an unfragmented packet
 * whose L4 header is cut short is judged like a non-first fragment: address and
 * protocol rules apply, port rules cannot, and it counts as malformed.
 */
static __always_inline void parse_l4(struct cursor *c, struct pkt *p)
{
	void *l4 = c->pos;
	__u32 need;

	switch (p->proto) {
	case IPPROTO_TCP:
		need = sizeof(struct tcphdr);
		break;
	case IPPROTO_UDP:
		need = sizeof(struct udphdr);
		break;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		need = 4; /* type, code, checksum */
		break;
	default:
		return; /* nothing we read */
	}
	if (l4 + need > c->end) {
		p->malformed = 1;
		return;
	}
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		/* dest port sits at offset 2 in both headers */
		p->dport = bpf_ntohs(((struct udphdr *)l4)->dest);
		p->l4_ok = 1;
	}
	if (p->proto == IPPROTO_TCP)
		p->tcp_flags = ((__u8 *)l4)[13]; /* CWR ECE URG ACK PSH RST SYN FIN */
}

static __always_inline int parse_ipv4(struct cursor *c, struct pkt *p)
{
	struct iphdr *ip = c->pos;
	__u32 hlen;
	__u16 frag;

	if ((void *)(ip + 1) > c->end)
		return PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_MALFORMED;
	hlen = ip->ihl * 4; /* options are skipped, never interpreted */
	if (c->pos + hlen > c->end)
		return PARSE_MALFORMED;
	c->pos += hlen;

	p->family = 4;
	p->saddr4 = ip->saddr;
	p->daddr4 = ip->daddr;
	p->proto = ip->protocol;

	frag = bpf_ntohs(ip->frag_off);
	if (frag & (XDPFW_IP_MF | XDPFW_IP_OFFSET))
		p->fragment = 1;
	/* A non-first fragment carries no L4 header: its first bytes are payload. */
	if (frag & XDPFW_IP_OFFSET)
		return PARSE_OK;
	parse_l4(c, p);
	return PARSE_OK;
}

struct ipv6_opt_hdr_min {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off; /* only meaningful in a fragment header */
};

/*
 * The extension headers the parser walks (hop-by-hop, routing, destination options,
 * AH, fragment); any other next header is the upper layer (TCP, UDP, ICMPv6, ESP,
 * no next header...), whose rules apply from here.
 */
static __always_inline int ipv6_is_ext(__u8 nexthdr)
{
	return nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
	       nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH || nexthdr == IPPROTO_FRAGMENT;
}

static __always_inline int parse_ipv6(struct cursor *c, struct pkt *p)
{
	struct ipv6hdr *ip6 = c->pos;
	struct ipv6_opt_hdr_min *eh;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > c->end)
		return PARSE_MALFORMED;
	if (ip6->version != 6)
		return PARSE_MALFORMED;
	c->pos = ip6 + 1;
	p->family = 6;
	__builtin_memcpy(p->saddr6.addr, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(p->daddr6.addr, ip6->daddr.in6_u.u6_addr8, 16);
	nexthdr = ip6->nexthdr;

	/*
	 * Walk a bounded chain of extension headers. A chain longer than the
	 * bound, or one cut short, cannot be judged: malformed, pass.
	 */
#pragma unroll
	for (int i = 0; i < XDPFW_MAX_IPV6_EXT; i++) {
		__u32 len;

		if (!ipv6_is_ext(nexthdr))
			goto upper;
		eh = c->pos;
		if ((void *)(eh + 1) > c->end)
			return PARSE_MALFORMED;
		if (nexthdr == IPPROTO_FRAGMENT) {
			len = 8;
			p->fragment = 1;
			/* Non-first fragment: what follows is payload, not a header. */
			if (bpf_ntohs(eh->frag_off) & XDPFW_IP6_OFFSET) {
				if (c->pos + len > c->end)
					return PARSE_MALFORMED;
				p->proto = eh->nexthdr;
				return PARSE_OK;
			}
		} else if (nexthdr == IPPROTO_AH) {
			len = ((__u32)eh->hdrlen + 2) * 4;
		} else {
			len = ((__u32)eh->hdrlen + 1) * 8;
		}
		if (c->pos + len > c->end)
			return PARSE_MALFORMED;
		nexthdr = eh->nexthdr;
		c->pos += len;
	}
	if (ipv6_is_ext(nexthdr))
		return PARSE_MALFORMED; /* still a header after the bound: cannot be judged */
upper:
	p->proto = nexthdr;
	parse_l4(c, p);
	return PARSE_OK;
}

static __always_inline int slot_matches(const struct xdpfw_slot *s, const struct pkt *p)
{
	if (s->proto && s->proto != p->proto)
		return 0;
	if (s->has_ports) {
		/* Non-first fragments and truncated L4 headers have no ports. */
		if (!p->l4_ok)
			return 0;
		if (p->dport < s->port_lo || p->dport > s->port_hi)
			return 0;
	}
	if (s->tcp_mask) {
		/* Flags need a whole TCP header: never a non-first fragment, nor a cut one. */
		if (!p->l4_ok || p->proto != IPPROTO_TCP)
			return 0;
		if ((p->tcp_flags & s->tcp_mask) != s->tcp_want)
			return 0;
	}
	return 1;
}

static __always_inline void take(struct best *b, const struct xdpfw_slot *s)
{
	if (s->rank > b->rank) {
		b->rank = s->rank;
		b->counter = s->counter;
		b->rule_id = s->rule_id;
		b->verdict = s->verdict;
	}
}

/* Slots are sorted by rank: the first match is the entry's best. */
static __always_inline void eval_entry(const struct xdpfw_entry *e, const struct pkt *p,
				       struct best *b)
{
	struct xdpfw_set *set;
	__u32 set_id;

	if (!e || e->first.rank <= b->rank)
		return; /* nothing in it can beat what we have */
	if (slot_matches(&e->first, p)) {
		take(b, &e->first);
		return;
	}
	set_id = e->set_id;
	if (!set_id)
		return;
	set = xdpfw_sets.lookup(&set_id);
	if (!set)
		return;
	for (int i = 0; i < XDPFW_SET_SLOTS; i++) {
		const struct xdpfw_slot *s = &set->slot[i];

		if (s->rank <= b->rank)
			return; /* sorted: the rest rank lower, or the set has ended */
		if (slot_matches(s, p)) {
			take(b, s);
			return;
		}
	}
}

/* Cell i (mod 16) of a DIR-24-8 row; 0 (no prefix) when the row is out of range. */
static __always_inline __u32 d248_cell(const struct xdpfw_d248_row *row, __u32 i)
{
	return row ? row->cell[i & (XDPFW_D248_ROW - 1)] : 0;
}

/*
 * The row of tbl8 holding address a's cell in group g (cell (g << 8) | (a & 0xff)), as an
 * element index of the tbl8 array.
 */
static __always_inline __u32 d248_row8(__u32 cell, __u32 a)
{
	return ((cell & ~XDPFW_D248_GROUP) << 4) | ((a & 0xff) >> 4);
}

/* The entry of the longest IPv4 source prefix covering addr_be (be), or NULL. */
static __always_inline struct xdpfw_entry *src4_prefix(__u32 addr_be)
{
	__u32 a = bpf_ntohl(addr_be), row = a >> 12, v;
	struct xdpfw_pfx_entry *pfx;

	v = d248_cell(xdpfw_src4_tbl24.lookup(&row), a >> 8);
	if (v & XDPFW_D248_GROUP) {
		row = d248_row8(v, a);
		v = d248_cell(xdpfw_src4_tbl8.lookup(&row), a);
	}
	pfx = v ? xdpfw_src4_pfx.lookup(&v) : 0;
	return pfx ? &pfx->entry : 0;
}

/* The same for destinations (its own arrays). */
static __always_inline struct xdpfw_entry *dst4_prefix(__u32 addr_be)
{
	__u32 a = bpf_ntohl(addr_be), row = a >> 12, v;
	struct xdpfw_pfx_entry *pfx;

	v = d248_cell(xdpfw_dst4_tbl24.lookup(&row), a >> 8);
	if (v & XDPFW_D248_GROUP) {
		row = d248_row8(v, a);
		v = d248_cell(xdpfw_dst4_tbl8.lookup(&row), a);
	}
	pfx = v ? xdpfw_dst4_pfx.lookup(&v) : 0;
	return pfx ? &pfx->entry : 0;
}

static __always_inline void lookup_v4(const struct xdpfw_config *cfg, const struct pkt *p,
				      struct best *b)
{
	__u32 addr;

	if (cfg->n_entries[XDPFW_TBL_SRC4]) {
		addr = p->saddr4;
		eval_entry(xdpfw_src4.lookup(&addr), p, b);
	}
	if (cfg->n_entries[XDPFW_TBL_SRC4_LPM])
		eval_entry(src4_prefix(p->saddr4), p, b);
	if (cfg->n_entries[XDPFW_TBL_DST4]) {
		addr = p->daddr4;
		eval_entry(xdpfw_dst4.lookup(&addr), p, b);
	}
	if (cfg->n_entries[XDPFW_TBL_DST4_LPM])
		eval_entry(dst4_prefix(p->daddr4), p, b);
}

static __always_inline void lookup_v6(const struct xdpfw_config *cfg, struct pkt *p,
				      struct best *b)
{
	struct xdpfw_lpm6_key k = { .prefixlen = 128 };

	if (cfg->n_entries[XDPFW_TBL_SRC6])
		eval_entry(xdpfw_src6.lookup(&p->saddr6), p, b);
	if (cfg->n_entries[XDPFW_TBL_SRC6_LPM]) {
		__builtin_memcpy(k.addr, p->saddr6.addr, 16);
		eval_entry(xdpfw_src6_lpm.lookup(&k), p, b);
	}
	if (cfg->n_entries[XDPFW_TBL_DST6])
		eval_entry(xdpfw_dst6.lookup(&p->daddr6), p, b);
	if (cfg->n_entries[XDPFW_TBL_DST6_LPM]) {
		__builtin_memcpy(k.addr, p->daddr6.addr, 16);
		eval_entry(xdpfw_dst6_lpm.lookup(&k), p, b);
	}
}

/* --- rate limits (issue 16) ------------------------------------------------------------ */

/* What a limit rule's budget said about a frame. */
#define LIMIT_PASS 0    /* within the budget */
#define LIMIT_OVER 1    /* over it: dropped (a monitor rule passes it) */
#define LIMIT_BANNED 2  /* the source is banned for this rule: dropped */

/*
 * One GCRA step (xdpfw_abi.h): may a packet of `cost` ns pass the bucket whose arrival
 * time is *tat? Writes the new time to *next (charged only if the caller stores it).
 */
static __always_inline int gcra(__u64 tat, __u64 cost, __u64 window, __u64 now, __u64 *next)
{
	__u64 base = tat > now ? tat : now;

	*next = base + cost;
	return *next - now <= window;
}

/* The budget of the limit rule credited in `b` for this frame. */
static __always_inline int limit_check(const struct pkt *p, const struct best *b)
{
	struct xdpfw_bucket_key key = { .rule_id = b->rule_id };
	struct xdpfw_bucket fresh = {}, *bk;
	struct xdpfw_limit *lim;
	__u64 *until, now, pkt_next = 0, byte_next = 0;
	__u32 rule_id = b->rule_id;
	int ok = 1;

	lim = xdpfw_limits.lookup(&rule_id);
	if (!lim)
		return LIMIT_PASS; /* not configured yet (the rule is being added): no budget */
	if (lim->per == XDPFW_PER_SOURCE) {
		key.family = p->family;
		if (p->family == 4)
			__builtin_memcpy(key.addr, &p->saddr4, 4);
		else
			__builtin_memcpy(key.addr, p->saddr6.addr, 16);
	}
	now = bpf_ktime_get_ns();
	if (lim->ban_ns && b->verdict == XDPFW_VERDICT_LIMIT) {
		until = xdpfw_bans.lookup(&key);
		if (until) {
			if (*until > now)
				return LIMIT_BANNED;
			xdpfw_bans.delete(&key); /* served: the budget decides again */
		}
	}
	bk = xdpfw_buckets.lookup(&key);
	if (!bk)
		bk = &fresh; /* new, or evicted: a full budget (tat 0) */
	if (lim->pkt_cost_ns)
		ok = gcra(bk->pkt_tat, lim->pkt_cost_ns, lim->pkt_window_ns, now, &pkt_next);
	if (ok && lim->byte_rate) {
		__u64 cost = p->len * 1000000000ULL / lim->byte_rate;

		ok = gcra(bk->byte_tat, cost, lim->byte_window_ns, now, &byte_next);
	}
	if (!ok) {
		if (lim->ban_ns && b->verdict == XDPFW_VERDICT_LIMIT) {
			__u64 end = now + lim->ban_ns;

			xdpfw_bans.update(&key, &end);
		}
		return LIMIT_OVER;
	}
	if (bk == &fresh) {
		fresh.pkt_tat = pkt_next;
		fresh.byte_tat = byte_next;
		xdpfw_buckets.update(&key, &fresh);
	} else {
		if (lim->pkt_cost_ns)
			bk->pkt_tat = pkt_next;
		if (lim->byte_rate)
			bk->byte_tat = byte_next;
	}
	return LIMIT_PASS;
}

/* Count a limit rule's outcome in xdpfw_limit_stats. */
static __always_inline void limit_count(__u32 rule_id, int outcome)
{
	struct xdpfw_limit_stats *ls = xdpfw_limit_stats.lookup(&rule_id);

	if (!ls)
		return;
	if (outcome == LIMIT_PASS)
		ls->passed++;
	else if (outcome == LIMIT_OVER)
		ls->limited++;
	else
		ls->banned++;
}

/*
 * A limit rule's budget decides the frame it won (other verdicts: nothing to do). Counts the
 * outcome; returns 1 when the frame is dropped for it (over the budget, or banned).
 */
static __always_inline int limit_apply(const struct pkt *p, const struct best *b)
{
	int outcome;

	if (b->verdict != XDPFW_VERDICT_LIMIT && b->verdict != XDPFW_VERDICT_LIMIT_MONITOR)
		return 0;
	outcome = limit_check(p, b);
	limit_count(b->rule_id, outcome);
	return outcome != LIMIT_PASS && b->verdict == XDPFW_VERDICT_LIMIT;
}

/*
 * The only exit: credit the rule, count the frame, return the action. `limited`: what
 * limit_apply() said (0 on the exits before a lookup).
 */
static __always_inline int finish(const struct pkt *p, const struct best *b, int parse,
				  int limited)
{
	struct xdpfw_global_stats *g;
	struct xdpfw_rule_stats *rs;
	__u64 *seen;
	__u32 zero = 0;
	__u32 counter = b->counter;
	int action = b->verdict == XDPFW_VERDICT_DROP || limited ? XDP_DROP : XDP_PASS;

	if (b->verdict != XDPFW_VERDICT_NONE) {
		/* An array element, no hash walk; a coarse clock, no clocksource read. */
		rs = xdpfw_rule_stats.lookup(&counter);
		if (rs) {
			rs->packets++;
			rs->bytes += p->len;
		}
		seen = xdpfw_rule_seen.lookup(&counter);
		if (seen) {
			__u64 now = bpf_ktime_get_coarse_ns();

			if (*seen != now)
				*seen = now;
		}
	}
	g = xdpfw_stats.lookup(&zero);
	if (g) {
		g->counter[XDPFW_STAT_PACKETS]++;
		g->counter[XDPFW_STAT_BYTES] += p->len;
		if (action == XDP_DROP)
			g->counter[XDPFW_STAT_DROPPED]++;
		else
			g->counter[XDPFW_STAT_PASSED]++;
		if (b->verdict == XDPFW_VERDICT_MONITOR ||
		    b->verdict == XDPFW_VERDICT_LIMIT_MONITOR)
			g->counter[XDPFW_STAT_MONITORED]++;
		if (limited)
			g->counter[XDPFW_STAT_LIMITED]++;
		if (parse == PARSE_NON_IP)
			g->counter[XDPFW_STAT_NON_IP]++;
		if (parse == PARSE_MALFORMED || p->malformed)
			g->counter[XDPFW_STAT_MALFORMED]++;
		if (p->fragment)
			g->counter[XDPFW_STAT_FRAGMENTS]++;
	}
	return action;
}

/* --- X-ray (issue 17): sampling a decided frame into xdpfw_samples --------------------------- */

/*
 * XDPFW_XRAY=0 (the loader's choice on kernels before 5.18, which lack bpf_xdp_load_bytes and
 * the BPF atomics with fetch) builds the program without sampling: the maps are the same, so
 * the ABI is too, and xray_sample() is empty.
 */
#ifndef XDPFW_XRAY
#define XDPFW_XRAY 1
#endif
#if XDPFW_XRAY

static __always_inline void xray_count(__u32 which)
{
	__u32 zero = 0;
	struct xdpfw_sample_stats *st = xdpfw_sample_stats.lookup(&zero);

	if (st && which < XDPFW_SSTAT_MAX)
		st->counter[which]++;
}

/*
 * One token of the shared bucket (GCRA, see struct xdpfw_sample_bucket). A compare-and-swap
 * lost to another CPU is tried once more; losing twice counts as over the cap, so the cap is
 * never exceeded, only (under contention) not quite reached.
 */
static __always_inline int xray_token(const struct xdpfw_sample_ctl *ctl)
{
	__u32 zero = 0;
	struct xdpfw_sample_bucket *bk = xdpfw_sample_bucket.lookup(&zero);
	__u64 now, old, tat;

	if (!bk)
		return 0;
	now = bpf_ktime_get_ns();
#pragma unroll
	for (int i = 0; i < 2; i++) {
		old = bk->tat;
		tat = old > now ? old : now;
		if (tat - now > ctl->burst_ns)
			return 0; /* the bucket is empty */
		if (__sync_val_compare_and_swap(&bk->tat, old, tat + ctl->interval_ns) == old)
			return 1;
	}
	return 0;
}

/*
 * Reserve a record of `room` data bytes (a constant: the ring's verifier wants one), fill it
 * and submit it. Returns 0 when the ring is full.
 */
static __always_inline int xray_emit(struct xdp_md *ctx, const struct pkt *p, const struct best *b,
				     int limited, __u32 snaplen, const __u32 room)
{
	struct xdpfw_sample_hdr *h;
	__u64 n = p->len < snaplen ? p->len : snaplen;

	h = xdpfw_samples.ringbuf_reserve(sizeof(*h) + room);
	if (!h)
		return 0;
	/* The verifier must see the bound on the register passed to the helper: keep clang from
	 * moving the comparison onto another copy of n. */
	asm volatile("" : "+r"(n));
	if (n > room)
		n = room;
	asm volatile("" : "+r"(n));
	h->ktime_ns = bpf_ktime_get_ns();
	h->rule_id = b->rule_id;
	h->ifindex = ctx->ingress_ifindex;
	h->frame_len = p->len;
	h->verdict = limited ? XDPFW_SAMPLED_LIMITED :
		     b->verdict == XDPFW_VERDICT_DROP ? XDPFW_SAMPLED_DROP :
		     b->verdict == XDPFW_VERDICT_MONITOR ||
				     b->verdict == XDPFW_VERDICT_LIMIT_MONITOR ? XDPFW_SAMPLED_MONITOR :
										 XDPFW_SAMPLED_PASS;
	h->pad = 0;
	if (n < 1 || bpf_xdp_load_bytes(ctx, 0, (void *)(h + 1), n) < 0)
		n = 0; /* the header alone still says what happened */
	h->cap_len = n;
	xdpfw_samples.ringbuf_submit(h, 0);
	return 1;
}

/*
 * The X-ray call site, once the verdict is decided: with no rule sampled this is one array
 * read for a frame a rule decided, and nothing for the rest.
 */
static __always_inline void xray_sample(struct xdp_md *ctx, const struct pkt *p,
					const struct best *b, int limited)
{
	struct xdpfw_sample_ctl *ctl;
	struct xdpfw_sample_rule *r;
	__u32 zero = 0, rule_id = b->rule_id, snaplen;
	__u64 n;
	int sent;

	if (b->verdict == XDPFW_VERDICT_NONE)
		return;
	ctl = xdpfw_sample_ctl.lookup(&zero);
	if (!ctl || !ctl->rules)
		return;
	r = xdpfw_sample_rules.lookup(&rule_id);
	if (!r)
		return;
	n = __sync_fetch_and_add(&r->matched, 1);
	if (r->every > 1 && n % r->every)
		return;
	if (!xray_token(ctl)) {
		xray_count(XDPFW_SSTAT_LOST_CAP);
		return;
	}
	snaplen = ctl->snaplen;
	if (snaplen <= XDPFW_SAMPLE_SNAP_SMALL)
		sent = xray_emit(ctx, p, b, limited, snaplen, XDPFW_SAMPLE_SNAP_SMALL);
	else if (snaplen <= XDPFW_SAMPLE_SNAP_MEDIUM)
		sent = xray_emit(ctx, p, b, limited, snaplen, XDPFW_SAMPLE_SNAP_MEDIUM);
	else
		sent = xray_emit(ctx, p, b, limited, snaplen, XDPFW_SAMPLE_SNAP_MAX);
	xray_count(sent ? XDPFW_SSTAT_SENT : XDPFW_SSTAT_LOST_RING);
}
#else
static __always_inline void xray_sample(struct xdp_md *ctx, const struct pkt *p,
					const struct best *b, int limited)
{
}
#endif /* XDPFW_XRAY */
/* --- end of X-ray --------------------------------------------------------------------------- */

int xdpfw_prog(struct xdp_md *ctx)
{
	struct cursor c = { .pos = (void *)(long)ctx->data, .end = (void *)(long)ctx->data_end };
	struct pkt p = {};
	struct best b = {};
	struct xdpfw_config *cfg;
	__u32 zero = 0;
	__u16 ethertype = 0;
	int parse, limited;

	p.len = c.end - c.pos;

	parse = parse_eth(&c, &ethertype);
	if (parse != PARSE_OK)
		return finish(&p, &b, parse, 0);

	/* ARP and every other non-IP frame always passes: we filter IP only. */
	if (ethertype == bpf_htons(ETH_P_IP))
		parse = parse_ipv4(&c, &p);
	else if (ethertype == bpf_htons(ETH_P_IPV6))
		parse = parse_ipv6(&c, &p);
	else
		parse = PARSE_NON_IP;
	if (parse != PARSE_OK)
		return finish(&p, &b, parse, 0);

	cfg = xdpfw_config.lookup(&zero);
	if (!cfg)
		return finish(&p, &b, parse, 0);

	if (p.family == 4)
		lookup_v4(cfg, &p, &b);
	else
		lookup_v6(cfg, &p, &b);
	if (cfg->n_entries[XDPFW_TBL_ANY]) {
		__u32 key = 0;

		eval_entry(xdpfw_any.lookup(&key), &p, &b);
	}
	limited = limit_apply(&p, &b);
	xray_sample(ctx, &p, &b, limited); /* X-ray: the one call site, after the verdict */
	return finish(&p, &b, parse, limited);
}
