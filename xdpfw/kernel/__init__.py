"""The doors to the kernel. Nothing else in xdpfw talks to it directly.

- `loader`: the only module that imports bcc (compiles and loads bpf/xdp_filter.c).
- `bpfsys`: the only bpf(2) door (maps, pins, program info, test runs), through ctypes.
- `netlink`: the only module that imports pyroute2 (XDP attach/detach, links, namespaces).
- `kheaders`: finds or builds the kernel headers bcc compiles against.
- `privileges`: reports the capabilities and sysctls the service needs.

Kernel and netlink failures leave these modules as `xdpfw.errors` exceptions or as the
module's own error type carrying the errno (`bpfsys.BpfError`, `netlink.NetlinkOpError`).
"""
