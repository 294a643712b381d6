"""xdpfw against its rivals, side by side in one run: `python -m bench`.

Items (the numbering of the benchmark issue and of docs/benchmarks.md):

1. per-packet program cost with BPF_PROG_TEST_RUN, xdpfw vs xdp-filter, same frames;
2. per-packet cost under live traffic (bpf_stats run_time_ns / run_cnt), list sizes;
3. drop throughput on a veth pair: xdpfw native/generic, xdp-filter native/skb,
   nftables + set, iptables + ipset, no filter;
4. control plane: bulk load, single add, stats/metrics latency, RSS, start and restart;
5. the scale curve of 1 and 2, plotted to docs/bench-scale.png.

Modules: `lists` (the blocklists), `lab` (our namespaces), `ours` (xdpfw's Datapath),
`rivals` (xdp-filter, nftables, iptables+ipset), `progrun` (test runs), `traffic` (trafgen),
`dataplane` (items 1, 2, 3, 5), `control` (item 4), `report` (targets, tables, plot),
`cli` (the command). Apart from the items: `floods` (issue 16, `python -m bench.floods`:
rate limits under test runs), `floods_live` (the same limit live on the lab against
nftables, and on two CPUs) and `pacer` (the paced frame sender it runs in the tx namespace).
"""
