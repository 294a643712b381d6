"""The xdpfw exception tree. Every error the core raises is one of these.

    XdpfwError                      base; never raised itself
    ├── InvalidRule                 a rule or request field is wrong     (HTTP 422)
    ├── RuleNotFound                no rule with that id                 (HTTP 404)
    ├── SourceNotFound              no source with that name             (HTTP 404)
    ├── InterfaceNotFound           no such interface / not attached      (HTTP 404)
    ├── RuleConflict                duplicate / protected prefix          (HTTP 409)
    ├── CapacityExceeded            a map or rule set is full             (HTTP 507)
    ├── StorageError                the rule database failed             (HTTP 503)
    │   ├── StorageFull             its disk is full; nothing was changed (HTTP 507)
    │   └── DatabaseCorrupt         unreadable, or not an xdpfw database  (HTTP 503)
    └── DatapathError               the kernel side failed               (HTTP 500/503)
        ├── KernelError             a bpf(2) or netlink call failed; carries errno
        ├── HeadersMissing          bcc cannot find kernel headers
        ├── CompileError            bcc could not compile or load the program
        ├── AbiMismatch             pinned maps were made by another ABI version
        └── ForeignProgram          an XDP program we did not attach is in the way

Kernel and netlink errors are translated into this tree at the door (users of
xdpfw.kernel.bpfsys and xdpfw.kernel.netlink, xdpfw.kernel.loader), so callers above never see
OSError or NetlinkError.
"""

from __future__ import annotations

__all__ = [
    "AbiMismatch",
    "CapacityExceeded",
    "CompileError",
    "DatabaseCorrupt",
    "DatapathError",
    "ForeignProgram",
    "HeadersMissing",
    "InterfaceNotFound",
    "InvalidRule",
    "KernelError",
    "RuleConflict",
    "RuleNotFound",
    "SourceNotFound",
    "StorageError",
    "StorageFull",
    "XdpfwError",
]


class XdpfwError(Exception):
    """Base of every xdpfw error."""


class InvalidRule(XdpfwError):
    """A field of a rule is invalid. `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class RuleNotFound(XdpfwError):
    def __init__(self, rule_id: int) -> None:
        super().__init__(f"no rule with id {rule_id}")
        self.rule_id = rule_id


class SourceNotFound(XdpfwError):
    """No source with that name (xdpfw/sources.py)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"no source named {name!r}: `xdpfw source ls` (GET /v1/sources) lists them"
        )
        self.name = name


class InterfaceNotFound(XdpfwError):
    def __init__(self, ifname: str, detail: str = "no such network interface") -> None:
        super().__init__(f"{ifname}: {detail}")
        self.ifname = ifname


class RuleConflict(XdpfwError):
    """The rule conflicts with an existing rule or a protected prefix."""

    def __init__(self, message: str, existing_id: int | None = None) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class CapacityExceeded(XdpfwError):
    """A table is full. Nothing was evicted and nothing was changed."""

    def __init__(self, what: str, limit: int, hint: str = "") -> None:
        msg = f"{what} is full (limit {limit})"
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)
        self.what = what
        self.limit = limit


class StorageError(XdpfwError):
    """The rule database (SQLite in the state dir) could not be read or written.

    Raised only after the maps were put back as they were: the database and the maps agree.
    `path` is the database file."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class StorageFull(StorageError):
    """The disk holding the state dir is full (SQLITE_FULL, ENOSPC, or an I/O error on a
    full filesystem). Nothing was changed."""


class DatabaseCorrupt(StorageError):
    """The database file is unreadable, garbage, or has a schema that is not xdpfw's.
    The service refuses to start on it (the pinned program keeps filtering meanwhile)."""


class DatapathError(XdpfwError):
    """The kernel side of the firewall failed."""


class KernelError(DatapathError):
    """A bpf(2) or netlink call failed. `errno` is the kernel's errno."""

    def __init__(self, op: str, errno: int, message: str) -> None:
        super().__init__(f"{op}: {message} (errno {errno})")
        self.op = op
        self.errno = errno


class HeadersMissing(DatapathError):
    pass


class CompileError(DatapathError):
    pass


class AbiMismatch(DatapathError):
    pass


class ForeignProgram(DatapathError):
    """Another XDP program is attached where we would attach ours."""

    def __init__(self, ifname: str, prog_id: int, prog_name: str = "") -> None:
        named = f" ({prog_name})" if prog_name else ""
        super().__init__(
            f"interface {ifname} already runs XDP program id {prog_id}{named} that xdpfw did not "
            f"attach; refusing to replace it. Remove it yourself (e.g. `ip link set dev {ifname} "
            f"xdp off`) if it is not needed."
        )
        self.ifname = ifname
        self.prog_id = prog_id
        self.prog_name = prog_name
