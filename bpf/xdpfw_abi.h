/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpfw_abi.h - the contract between bpf/xdp_filter.c and the Python
 * control plane (mirrored once in xdpfw/abi.py; tests/test_abi.py compares
 * the mirror with the types bcc generates from this file).
 *
 * Rules never rename or renumber anything here. A retired code keeps its
 * number as a placeholder. Any change to a struct layout or to the meaning of
 * a map bumps XDPFW_ABI_VERSION: a running service refuses pinned maps whose
 * recorded ABI differs instead of misreading them.
 *
 * Byte order is written next to every field: "be" = network order (as read
 * from the packet), "host" = CPU order (written by the control plane).
 */
#ifndef XDPFW_ABI_H
#define XDPFW_ABI_H

/*
 * ABI history (pins of another version are refused, never misread):
 *   1  first release: xdpfw_rule_stats a per-CPU hash keyed by rule_id, 24-byte
 *      values with last_hit_ns.
 *   2  struct xdpfw_slot carries `counter`, the rule's index into xdpfw_rule_stats
 *      (now a per-CPU array; pad[5] became pad + counter); xdpfw_lpm4_hint added.
 *   3  struct xdpfw_rule_stats 24 -> 16 bytes: last_hit_ns moved to the shared,
 *      memory-mapped xdpfw_rule_seen (added).
 *   4  rate limits and TCP flags: struct xdpfw_slot 24 -> 32 bytes (tcp_mask in the old
 *      pad, tcp_want); verdicts LIMIT and LIMIT_MONITOR; the rank's top bits are the
 *      verdict class, no longer the verdict, and its id field is never 0;
 *      XDPFW_STAT_LIMITED; maps xdpfw_limits, xdpfw_limit_stats, xdpfw_buckets, xdpfw_bans.
 *      X-ray: xdpfw_sample_ctl, xdpfw_sample_rules, xdpfw_sample_bucket,
 *      xdpfw_sample_stats and the ring buffer xdpfw_samples (added).
 *   5  IPv4 prefixes in DIR-24-8 arrays (issue 18): maps xdpfw_{src,dst}4_tbl24, _tbl8 and
 *      _pfx (added, struct xdpfw_pfx_entry); the tries xdpfw_src4_lpm, xdpfw_dst4_lpm and the hint
 *      xdpfw_lpm4_hint retired (XDPFW_HINT_* kept as placeholders); struct xdpfw_config
 *      gains max_tbl8_groups. ABI 4 pins are adopted by an upgrade (rules, counters, limits
 *      and samples carried across, the attachment swapped atomically), never misread.
 */
#define XDPFW_ABI_VERSION 5

/* Bounds of the parser. */
#define XDPFW_MAX_VLAN 2        /* 802.1Q / 802.1ad tags we look through */
#define XDPFW_MAX_IPV6_EXT 8    /* IPv6 extension headers we walk before giving up */

/* Slots a rule set (see struct xdpfw_set) holds besides the entry's own. */
#define XDPFW_SET_SLOTS 31

/*
 * Verdict of a slot. The rank's top bits hold its class (see below), not this number:
 * allow > drop > limit > monitor (limit-monitor is in the monitor class).
 */
#define XDPFW_VERDICT_NONE 0
#define XDPFW_VERDICT_MONITOR 1       /* drop rule in monitor mode: pass, count */
#define XDPFW_VERDICT_DROP 2          /* drop rule in enforce mode */
#define XDPFW_VERDICT_ALLOW 3         /* allow rule: pass, beats every drop */
#define XDPFW_VERDICT_LIMIT_MONITOR 5 /* limit rule in monitor mode: pass, count would-limit */
#define XDPFW_VERDICT_LIMIT 6         /* limit rule: pass within the budget, drop the rest */

/* Index of the global per-CPU counters in struct xdpfw_global_stats. */
#define XDPFW_STAT_PACKETS 0    /* every frame the program saw */
#define XDPFW_STAT_PASSED 1     /* returned XDP_PASS (includes monitored) */
#define XDPFW_STAT_DROPPED 2    /* returned XDP_DROP */
#define XDPFW_STAT_MONITORED 3  /* passed, credited to a monitor rule */
#define XDPFW_STAT_MALFORMED 4  /* unparsable L2/L3, or truncated L4 */
#define XDPFW_STAT_NON_IP 5     /* ARP and every other non-IP ethertype */
#define XDPFW_STAT_FRAGMENTS 6  /* IPv4/IPv6 fragments, first or not */
#define XDPFW_STAT_BYTES 7      /* bytes of every frame */
#define XDPFW_STAT_LIMITED 8    /* dropped by a limit rule (over its budget, or banned) */
#define XDPFW_STAT_MAX 9

/* Index of the lookup tables in struct xdpfw_config.n_entries. */
#define XDPFW_TBL_SRC4 0        /* xdpfw_src4: exact IPv4 source */
#define XDPFW_TBL_DST4 1        /* xdpfw_dst4: exact IPv4 destination */
#define XDPFW_TBL_SRC6 2        /* xdpfw_src6: exact IPv6 source */
#define XDPFW_TBL_DST6 3        /* xdpfw_dst6: exact IPv6 destination */
#define XDPFW_TBL_SRC4_LPM 4    /* IPv4 source prefixes (DIR-24-8: xdpfw_src4_tbl24 ...) */
#define XDPFW_TBL_DST4_LPM 5    /* IPv4 destination prefixes (xdpfw_dst4_tbl24 ...) */
#define XDPFW_TBL_SRC6_LPM 6    /* xdpfw_src6_lpm: IPv6 source prefixes */
#define XDPFW_TBL_DST6_LPM 7    /* xdpfw_dst6_lpm: IPv6 destination prefixes */
#define XDPFW_TBL_ANY 8         /* xdpfw_any: rules with no address */
#define XDPFW_TBL_MAX 9

/* Default capacities; the loader overrides them with -D from configuration. */
#ifndef XDPFW_MAX_RULES
#define XDPFW_MAX_RULES 1048576 /* exact tables and per-rule counters */
#endif
#ifndef XDPFW_MAX_PREFIXES
#define XDPFW_MAX_PREFIXES 262144 /* each prefix table (IPv4: entries, IPv6: LPM trie) */
#endif
#ifndef XDPFW_MAX_TBL8_GROUPS
#define XDPFW_MAX_TBL8_GROUPS 16384 /* per direction: /24s holding prefixes longer than /24 */
#endif
#ifndef XDPFW_MAX_SETS
#define XDPFW_MAX_SETS 16384    /* overflow rule sets, index 0 unused */
#endif

/*
 * One rule as the data plane sees it, inside a lookup entry. The control
 * plane precomputes `rank` so that the data plane compares one integer:
 *   bits 62-63 verdict class (allow 3 > drop 2 > limit 1 > monitor 0)
 *   bits 54-61 source prefix length (0 when the rule names no source)
 *   bits 46-53 destination prefix length
 *   bit  45    protocol named
 *   bits 29-44 port narrowness: 65536 - (port_hi - port_lo + 1), 0 = no ports
 *   bits 0-28  XDPFW_RANK_ID_MASK - rule_id + 1 (lower id wins a tie; never 0)
 * This is exactly the "most specific" order of the rule contract, with the
 * verdict class first (TCP flags add no specificity). rank 0 marks an empty slot;
 * no rule's rank is 0, not even a monitor rule's (class 0), as the id field is not.
 */
#define XDPFW_RANK_ID_MASK 0x1fffffffULL

struct xdpfw_slot {
	__u64 rank;      /* host; 0 = empty */
	__u32 rule_id;   /* host; the rule's id (the data plane does not read it) */
	__u16 port_lo;   /* host; only when has_ports */
	__u16 port_hi;   /* host; inclusive */
	__u8 proto;      /* IPPROTO_*; 0 = any protocol */
	__u8 verdict;    /* XDPFW_VERDICT_* */
	__u8 has_ports;  /* 1: needs an L4 header with dport in range */
	__u8 tcp_mask;   /* TCP flags looked at (FIN 0x01 .. CWR 0x80); 0 = no flag match */
	__u32 counter;   /* host; the rule's index in xdpfw_rule_stats, 1..max_rules */
	__u8 tcp_want;   /* (flags & tcp_mask) == tcp_want; needs a TCP header (never a
			  * non-first fragment or a truncated header) */
	__u8 pad[7];
};

/*
 * Value of every lookup table. Slots are kept sorted by rank, highest first:
 * `first` holds the best one, the set (when set_id != 0) the rest, so the
 * first slot that matches the packet is this entry's answer. An LPM entry
 * also carries the slots of every shorter prefix that covers it (a trie
 * lookup returns only the longest match).
 */
struct xdpfw_entry {
	struct xdpfw_slot first;
	__u32 set_id;    /* host; index into xdpfw_sets, 0 = none */
	__u32 pad;
};

struct xdpfw_set {
	struct xdpfw_slot slot[XDPFW_SET_SLOTS]; /* sorted, rank 0 ends */
};

/* LPM trie keys: prefixlen counts bits of addr, host order. */
struct xdpfw_lpm4_key {
	__u32 prefixlen; /* host */
	__u8 addr[4];    /* be */
};

struct xdpfw_lpm6_key {
	__u32 prefixlen; /* host */
	__u8 addr[16];   /* be */
};

struct xdpfw_addr6 {
	__u8 addr[16];   /* be */
};

/*
 * Per-rule, per-CPU counters: element `counter` of a per-CPU array, so crediting a
 * rule costs no second hash lookup. The control plane hands out the indices (0 is
 * never used) and zeroes an element before a new rule gets it. The reader sums the CPUs.
 */
struct xdpfw_rule_stats {
	__u64 packets;   /* host */
	__u64 bytes;     /* host; whole frame, L2 header included */
};

/*
 * Last hit of each counter index, shared by the CPUs: element `counter` of
 * xdpfw_rule_seen (a memory-mapped __u64 array, BPF_F_MMAPABLE) holds the
 * bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC, jiffy resolution) of the rule's latest
 * packet, 0 = none since the rule got the index. Stored only when it changes (once a
 * jiffy at most), so a flood on one rule does not bounce the line between CPUs. Readers
 * skip the per-CPU counters of every rule whose element is 0: they are zero.
 */
/*
 * IPv4 prefixes: DIR-24-8 (the layout of DPDK's rte_lpm), one set of arrays per direction.
 * A frame's address a (host order) picks cell a >> 8 of tbl24: 0 = no prefix covers that
 * /24; XDPFW_D248_GROUP | g = the /24 holds prefixes longer than /24, look at cell
 * (g << 8) | (a & 0xff) of tbl8 (same meaning, never a group); any other value = the index in
 * pfx of the entry of the longest prefix covering the address (its slots carry the covering
 * prefixes' rules, as a trie entry did). One array load for a /24 or shorter, two for
 * /25-/32, whatever the number of prefixes. Cells are stored 16 to an array element
 * (struct xdpfw_d248_row: one cache line, no per-element padding) and written in place
 * through a memory mapping (BPF_F_MMAPABLE): each store is one aligned __u32, so a packet
 * sees the old or the new longest match, never a torn one. An entry is never rewritten in
 * place: a changed entry goes to a fresh pfx index, the cells flip to it, and the old index
 * is reused only from the next change on (a packet that read the old cell is long gone).
 */
#define XDPFW_D248_ROW 16               /* cells per array element */
#define XDPFW_D248_TBL24_ROWS 1048576   /* 2^24 cells: one per /24 */
#define XDPFW_D248_GROUP 0x80000000     /* cell flag: the rest is a tbl8 group */
/*
 * Each pfx array holds 2 * XDPFW_MAX_PREFIXES + 1 elements (abi.pfx_entries): index 0 = none,
 * and room for a change of every prefix while the old indices rest.
 */

struct xdpfw_d248_row {
	__u32 cell[XDPFW_D248_ROW]; /* host */
};

/* Which prefix a pfx element is (what adoption reads back; the program does not read it). */
struct xdpfw_pfx_key {
	__u8 addr[4];   /* be; the network address */
	__u8 plen;      /* 0..32 */
	__u8 live;      /* 1: this element is the prefix's entry (or is being replaced by a newer one) */
	__u8 pad[2];
};

/* Element of xdpfw_{src,dst}4_pfx: the entry, then its key. */
struct xdpfw_pfx_entry {
	struct xdpfw_entry entry;
	struct xdpfw_pfx_key key;
};

/* Retired with ABI 5 (the /24 hint of the tries); the numbers are placeholders. */
#define XDPFW_HINT_WORDS 262144
#define XDPFW_HINT_SRC 0
#define XDPFW_HINT_DST 1

/* Single element of xdpfw_stats (per CPU); the reader sums the CPUs. */
struct xdpfw_global_stats {
	__u64 counter[XDPFW_STAT_MAX]; /* host; indexed by XDPFW_STAT_* */
};

/* Single element of xdpfw_config, written by the control plane. */
struct xdpfw_config {
	__u32 abi_version;               /* host; XDPFW_ABI_VERSION at load */
	__u32 n_entries[XDPFW_TBL_MAX];  /* host; entries per table, 0 = skip lookup */
	__u32 max_rules;                 /* host; capacities the maps were made with */
	__u32 max_prefixes;              /* host */
	__u32 max_sets;                  /* host */
	__u32 max_tbl8_groups;           /* host; tbl8 groups per direction (ABI 5) */
	__u8 build_id[8];                /* hash of the source and flags the program was built from */
};

/* --- X-ray (issue 17): sampled frames of chosen rules, through a ring buffer ------------- */
/*
 * A rule is sampled when xdpfw_sample_rules holds its id: 1 in `every` of the frames the rule
 * decides is copied (a header and the first snaplen bytes) into the ring buffer xdpfw_samples,
 * under a global cap (a token bucket, xdpfw_sample_bucket, shared by the CPUs). The program
 * looks at any of this only when a rule decided the frame and xdpfw_sample_ctl.rules != 0, so
 * with no rule sampled the cost is one array read on a hit and nothing on a miss. Turning
 * sampling on or off is a map write, never a program reload.
 */
#ifndef XDPFW_SAMPLE_RING_BYTES
#define XDPFW_SAMPLE_RING_BYTES 1048576 /* ring buffer size: a power of 2, pages */
#endif
#define XDPFW_SAMPLE_SNAP_SMALL 128     /* records come in three sizes: the smallest */
#define XDPFW_SAMPLE_SNAP_MEDIUM 512    /* that holds snaplen bytes is reserved */
#define XDPFW_SAMPLE_SNAP_MAX 2048      /* the largest snap length */
#define XDPFW_SAMPLE_MAX_RULES 65536    /* rules that may be sampled at once */

/* What the rule did with a sampled frame (struct xdpfw_sample_hdr.verdict). */
#define XDPFW_SAMPLED_PASS 1            /* an allow rule, or a limit rule within budget */
#define XDPFW_SAMPLED_DROP 2            /* a drop rule in enforce mode: dropped */
#define XDPFW_SAMPLED_MONITOR 3         /* a monitor-mode rule (drop or limit): passed */
#define XDPFW_SAMPLED_LIMITED 4         /* a limit rule: over the budget or banned, dropped */

/* Index of the per-CPU sampling counters in struct xdpfw_sample_stats. */
#define XDPFW_SSTAT_SENT 0              /* records submitted to the ring */
#define XDPFW_SSTAT_LOST_RING 1         /* chosen, but the ring was full (reader too slow) */
#define XDPFW_SSTAT_LOST_CAP 2          /* chosen, but over the cap (--sample-max-pps) */
#define XDPFW_SSTAT_MAX 3

/* Single element of xdpfw_sample_ctl, written by the control plane. */
struct xdpfw_sample_ctl {
	__u32 rules;       /* host; entries in xdpfw_sample_rules, 0 = sampling off */
	__u32 snaplen;     /* host; bytes copied per frame, 1..XDPFW_SAMPLE_SNAP_MAX */
	__u64 interval_ns; /* host; 1e9 / cap: one token per interval */
	__u64 burst_ns;    /* host; the bucket holds burst_ns / interval_ns tokens */
};

/* Value of xdpfw_sample_rules (key: the rule id, __u32 host). */
struct xdpfw_sample_rule {
	__u32 every;       /* host; sample 1 in `every` frames the rule decides, >= 1 */
	__u32 pad;
	__u64 matched;     /* host; frames the rule decided since the entry was written (atomic) */
};

/*
 * Single element of xdpfw_sample_bucket: the cap as a GCRA (the token bucket's equivalent in
 * one word): a sample is allowed when tat - now <= burst_ns, and moves tat on by interval_ns
 * (compare-and-swap, so the CPUs share one bucket and never exceed it).
 */
struct xdpfw_sample_bucket {
	__u64 tat;         /* host; theoretical arrival time, bpf_ktime_get_ns() */
};

/* Single element of xdpfw_sample_stats (per CPU); the reader sums the CPUs. */
struct xdpfw_sample_stats {
	__u64 counter[XDPFW_SSTAT_MAX]; /* host; indexed by XDPFW_SSTAT_* */
};

/*
 * A record of xdpfw_samples: this header, then cap_len bytes of the frame from its first
 * (Ethernet) byte. The record is reserved at 24 + XDPFW_SAMPLE_SNAP_{SMALL,MEDIUM,MAX} bytes.
 */
struct xdpfw_sample_hdr {
	__u64 ktime_ns;    /* host; bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 rule_id;     /* host; the rule that decided the frame */
	__u32 ifindex;     /* host; the interface it arrived on */
	__u32 frame_len;   /* host; bytes of the frame */
	__u16 cap_len;     /* host; bytes that follow: min(frame_len, snaplen) */
	__u8 verdict;      /* XDPFW_SAMPLED_* */
	__u8 pad;
};
/* --- end of X-ray ------------------------------------------------------------------------ */
/*
 * --- Rate limits (issue 16) -----------------------------------------------------------
 * A limit rule (slot verdict LIMIT or LIMIT_MONITOR) has its parameters in xdpfw_limits,
 * keyed by rule id. Only a frame whose best slot is a limit rule touches the maps below:
 * allow and drop rules (blocklists) rank above every limit rule and are decided first.
 *
 * Budgets are GCRA (a token bucket written as a "theoretical arrival time"): a packet of
 * cost c ns passes when max(tat, now) + c - now <= window, and then tat = max(tat, now) + c;
 * a packet over the budget leaves tat unchanged. Packets: c = pkt_cost_ns = 10^9 / pps
 * (floored), window = burst * c, so `burst` packets pass at once after an idle period and
 * pps per second after that. Bytes: c = len * 10^9 / byte_rate (floored), window =
 * burst_bytes * 10^9 / byte_rate (floored). With both, a packet passes when both pass, and
 * only then are both charged. now = bpf_ktime_get_ns() (CLOCK_MONOTONIC).
 *
 * Buckets are shared by the CPUs (one LRU hash, no per-CPU copies): the budget is the
 * source's, whichever CPUs receive it. Updates are plain stores: two CPUs racing on the
 * same bucket can each pass a packet the other already counted (a lost update admits at
 * most one extra packet per racing CPU per race), never drop one the budget allows.
 */
#define XDPFW_PER_SOURCE 0      /* one bucket per (rule, source address) */
#define XDPFW_PER_RULE 1        /* one bucket per rule (family 0, address 0) */

#ifndef XDPFW_MAX_LIMITS
#define XDPFW_MAX_LIMITS 4096   /* limit rules */
#endif
#ifndef XDPFW_MAX_BUCKETS
#define XDPFW_MAX_BUCKETS 131072 /* live buckets (LRU: the least recent is evicted) */
#endif
#ifndef XDPFW_MAX_BANS
#define XDPFW_MAX_BANS 65536    /* live bans (LRU) */
#endif

/* Value of xdpfw_limits (key: __u32 rule id, host), written by the control plane. */
struct xdpfw_limit {
	__u64 pkt_cost_ns;     /* host; 10^9 / pps, 0 = no packet rate */
	__u64 pkt_window_ns;   /* host; burst * pkt_cost_ns */
	__u64 byte_rate;       /* host; bytes per second, 0 = no byte rate */
	__u64 byte_window_ns;  /* host; burst_bytes * 10^9 / byte_rate */
	__u64 ban_ns;          /* host; ban length after going over, 0 = no ban */
	__u32 per;             /* host; XDPFW_PER_* */
	__u32 pad;
};

/* Key of xdpfw_buckets and xdpfw_bans. */
struct xdpfw_bucket_key {
	__u32 rule_id;         /* host */
	__u32 family;          /* host; 4 or 6, 0 for a per-rule bucket */
	__u8 addr[16];         /* be; an IPv4 source in the first 4 bytes; zero per rule */
};

/* Value of xdpfw_buckets: the GCRA state. */
struct xdpfw_bucket {
	__u64 pkt_tat;         /* host; ns, CLOCK_MONOTONIC */
	__u64 byte_tat;        /* host */
};

/*
 * Value of xdpfw_limit_stats (per CPU, key: __u32 rule id): the frames credited to a limit
 * rule, split by what the budget said. A monitor-mode rule counts "would limit" in limited
 * and passes the frame. The control plane creates the zeroed element with the rule.
 */
struct xdpfw_limit_stats {
	__u64 passed;          /* host; within the budget */
	__u64 limited;         /* host; over the budget (dropped unless monitor) */
	__u64 banned;          /* host; dropped while the source was banned */
};

/* xdpfw_bans: key struct xdpfw_bucket_key, value __u64 host: banned until (ns, CLOCK_MONOTONIC). */

#endif /* XDPFW_ABI_H */
