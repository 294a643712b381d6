"""The lab: throw-away network namespaces and veth pairs to run real packets through.

A tool for proving the product (tests, benchmarks, the demo of `xdpfw serve` without an
interface), not part of the firewall itself. Built only on the public functions of
xdpfw.kernel.netlink; it never imports pyroute2.

- `veth`: `veth_lab()` (a configured veth pair into a fresh namespace, removed on exit),
  `VethLab` (what it yields) and `cleanup_stale()` (what killed runs left behind).
"""

from xdpfw.lab.veth import VethLab, cleanup_stale, pid_alive, veth_lab

__all__ = ["VethLab", "cleanup_stale", "pid_alive", "veth_lab"]
