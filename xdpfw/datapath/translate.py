"""Kernel errors into the xdpfw.errors tree, at the datapath's door.

Every datapath call that reaches bpf(2) or netlink runs inside `kernel_door(op)`, so an OSError
(bpfsys.BpfError is one) or a netlink.NetlinkOpError leaves as a KernelError naming the
operation and carrying the errno: the service and the API never see a bare OSError.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from xdpfw.errors import KernelError
from xdpfw.kernel import netlink

__all__ = ["kernel_door", "kernel_error"]


def kernel_error(op: str, exc: OSError | netlink.NetlinkOpError) -> KernelError:
    """The KernelError for a failed bpf(2)/netlink call during `op`."""
    if isinstance(exc, netlink.NetlinkOpError):
        return KernelError(op, exc.errno, str(exc))
    code = exc.errno or 0
    return KernelError(op, code, os.strerror(code) + f" ({exc})")


@contextmanager
def kernel_door(op: str) -> Iterator[None]:
    """Translate OSError / NetlinkOpError raised inside into KernelError(op, errno)."""
    try:
        yield
    except (OSError, netlink.NetlinkOpError) as exc:
        raise kernel_error(op, exc) from exc
