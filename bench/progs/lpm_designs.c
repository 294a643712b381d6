/*
 * Issue 18's measured designs: one small XDP program per design, selected at compile time
 * by -DDESIGN_* (integers only; bench/lpm_designs.py builds and fills them). Each reads the
 * Ethernet + IP header, looks the source address up, reads the entry's verdict and returns
 * XDP_DROP on a match, XDP_PASS otherwise. No counters, no ports, no rule sets: these are
 * the lookup structures alone, so their costs can be compared with one another and with the
 * reference programs (one lookup in one map of the same kind and size).
 *
 *   DESIGN_REF_HASH  one hash lookup of the IPv4 source           (reference, host)
 *   DESIGN_REF_LPM   one LPM trie lookup of the IPv4 source       (reference, prefix)
 *   DESIGN_TRIE      hash, then LPM trie: today's tables, unhinted
 *   DESIGN_D248      hash, then DIR-24-8 (DPDK rte_lpm's layout) in BPF arrays
 *   DESIGN_V6_LPM    one LPM trie lookup of the IPv6 source
 *   DESIGN_V6_LENHASH one hash per present prefix length (<= /64), longest first
 *
 * With -DRECORD=1 the program stores the matched entry's rule_id (0 = none) in `answer`,
 * which is how tests/test_bench_dataplane.py checks a design against the LPM trie.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#ifndef N_HOSTS
#define N_HOSTS 1024
#endif
#ifndef N_PREFIXES
#define N_PREFIXES 1024
#endif
#ifndef N_TBL8_ROWS
#define N_TBL8_ROWS 16          /* tbl8 groups * 16 rows of 16 entries */
#endif
#ifndef HASH_FLAGS
#define HASH_FLAGS BPF_F_NO_PREALLOC
#endif

/* Same size as struct xdpfw_entry (32 bytes): the value every table of xdpfw holds. */
struct entry {
	__u64 rank;
	__u32 rule_id;
	__u16 port_lo;
	__u16 port_hi;
	__u8 proto;
	__u8 verdict;
	__u8 has_ports;
	__u8 pad;
	__u32 counter;
	__u32 set_id;
	__u32 pad2;
};

struct lpm4_key {
	__u32 prefixlen;
	__u32 addr;             /* be */
};

struct lpm6_key {
	__u32 prefixlen;
	__u8 addr[16];          /* be */
};

/* 16 table entries per array element: one cache line, and no padding (an array element of
 * 4 bytes would be rounded up to 8 by the kernel, doubling the 2^24 table). */
struct row {
	__u32 e[16];
};

#ifdef RECORD
BPF_ARRAY(answer, __u32, 1);
static __always_inline int done(struct entry *e)
{
	__u32 zero = 0, id = e ? e->rule_id : 0;
	answer.update(&zero, &id);
	return e && e->verdict ? XDP_DROP : XDP_PASS;
}
#else
static __always_inline int done(struct entry *e)
{
	return e && e->verdict ? XDP_DROP : XDP_PASS;
}
#endif

#if defined(DESIGN_REF_HASH) || defined(DESIGN_TRIE) || defined(DESIGN_D248)
BPF_F_TABLE("hash", __u32, struct entry, hosts4, N_HOSTS, HASH_FLAGS);
#endif
#if defined(DESIGN_REF_LPM) || defined(DESIGN_TRIE)
BPF_LPM_TRIE(lpm4, struct lpm4_key, struct entry, N_PREFIXES);
#endif
#ifdef DESIGN_D248
/* tbl24[a >> 8]: 0 = no prefix covers this /24; bit 31 set = tbl8 group (bits 0-30) for a
 * /24 with longer prefixes in it; else the index in pfx4 of the longest covering prefix. */
BPF_F_TABLE("array", __u32, struct row, tbl24, 1 << 20, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct row, tbl8, N_TBL8_ROWS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct entry, pfx4, N_PREFIXES + 1, BPF_F_MMAPABLE);

static __always_inline struct entry *d248(__u32 addr_be)
{
	__u32 a = bpf_ntohl(addr_be);
	__u32 i = a >> 8, r = i >> 4;
	struct row *row = tbl24.lookup(&r);
	if (!row)
		return 0;
	__u32 v = row->e[i & 15];
	if (v & 0x80000000) {
		__u32 j = ((v & 0x7fffffff) << 8) | (a & 0xff);
		__u32 r8 = j >> 4;
		struct row *row8 = tbl8.lookup(&r8);
		if (!row8)
			return 0;
		v = row8->e[j & 15];
	}
	if (!v)
		return 0;
	return pfx4.lookup(&v);
}
#endif

#ifdef DESIGN_V6_LPM
BPF_LPM_TRIE(lpm6, struct lpm6_key, struct entry, N_PREFIXES);
#endif
#ifdef DESIGN_V6_LENHASH
/* One hash per present length L (<= 64): key = the top 64 bits of the address, host order,
 * masked to L bits. V6_L0 > V6_L1 > ...: the first hit is the longest match. */
#define V6H(n) BPF_F_TABLE("hash", __u64, struct entry, v6h##n, N_PREFIXES, HASH_FLAGS)
#define V6MASK(l) ((l) >= 64 ? ~0ULL : ~((1ULL << (64 - (l))) - 1))
#ifdef V6_L0
V6H(0);
#endif
#ifdef V6_L1
V6H(1);
#endif
#ifdef V6_L2
V6H(2);
#endif
#ifdef V6_L3
V6H(3);
#endif
#endif

int xdp_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct entry *e = 0;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
#if defined(DESIGN_V6_LPM) || defined(DESIGN_V6_LENHASH)
	if (eth->h_proto != htons(ETH_P_IPV6))
		return XDP_PASS;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > end)
		return XDP_PASS;
#ifdef DESIGN_V6_LPM
	struct lpm6_key k6 = { .prefixlen = 128 };
	__builtin_memcpy(k6.addr, &ip6->saddr, 16);
	e = lpm6.lookup(&k6);
#else
	__u64 hi;
	__builtin_memcpy(&hi, &ip6->saddr, 8);
	hi = __builtin_bswap64(hi);
	__u64 key;
#ifdef V6_L0
	key = hi & V6MASK(V6_L0);
	e = v6h0.lookup(&key);
#endif
#ifdef V6_L1
	if (!e) {
		key = hi & V6MASK(V6_L1);
		e = v6h1.lookup(&key);
	}
#endif
#ifdef V6_L2
	if (!e) {
		key = hi & V6MASK(V6_L2);
		e = v6h2.lookup(&key);
	}
#endif
#ifdef V6_L3
	if (!e) {
		key = hi & V6MASK(V6_L3);
		e = v6h3.lookup(&key);
	}
#endif
#endif
	return done(e);
#else
	if (eth->h_proto != htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return XDP_PASS;
	__u32 src = ip->saddr;
#if defined(DESIGN_REF_HASH) || defined(DESIGN_TRIE) || defined(DESIGN_D248)
	e = hosts4.lookup(&src);
#endif
#if defined(DESIGN_REF_LPM) || defined(DESIGN_TRIE)
	/* Like xdpfw: both tables are looked up (an allow prefix beats a drop host). */
	struct lpm4_key k = { .prefixlen = 32, .addr = src };
	struct entry *p = lpm4.lookup(&k);
	if (!e)
		e = p;
#endif
#ifdef DESIGN_D248
	struct entry *p = d248(src);
	if (!e)
		e = p;
#endif
	return done(e);
#endif
}
