"""Which privileges `xdpfw serve` has, which it needs, and a report for the start-up log.

What the service needs was established by running it under reduced capability sets
(``deploy/prove-capabilities.sh``; the results are in docs/deployment.md). On kernels since 5.8:

* ``CAP_BPF``: every bpf(2) call (maps, program load, pins) while
  ``kernel.unprivileged_bpf_disabled`` is set, and always for an XDP program and an LPM trie;
* ``CAP_NET_ADMIN``: the kernel loads an XDP program only with it, and attaching one to an
  interface is an RTM_SETLINK netlink request;
* ``CAP_PERFMON``: the verifier accepts the packet parser's variable-offset pointer arithmetic
  (IPv4 options, IPv6 extension headers) only from a caller it trusts to bypass the Spectre v1
  hardening, that is with ``CAP_PERFMON``. Only a fresh load needs it; adopting pinned maps
  and program after a restart does not.

``CAP_SYS_ADMIN`` stands in for ``CAP_BPF`` and ``CAP_PERFMON`` (the kernel accepts either), and
before 5.8, which has neither, it is the only way; ``CAP_NET_ADMIN`` is needed in both cases.

Nothing here changes privileges or refuses to run: :func:`check` reads ``/proc`` and says what
is missing, and the kernel stays the judge.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

__all__ = [
    "CAP_BPF_SINCE",
    "REQUIREMENTS",
    "Capability",
    "PrivilegeReport",
    "Requirement",
    "check",
    "format_report",
    "kernel_version",
    "parse_capmask",
    "parse_status",
    "report_lines",
]

STATUS_PATH = Path("/proc/self/status")
UNPRIV_BPF_SYSCTL = Path("/proc/sys/kernel/unprivileged_bpf_disabled")

CAP_BPF_SINCE = (5, 8)
"""The kernel release that split CAP_BPF and CAP_PERFMON out of CAP_SYS_ADMIN."""


class Capability(IntEnum):
    """Capability numbers from ``include/uapi/linux/capability.h`` (only those we talk about)."""

    NET_ADMIN = 12
    SYS_ADMIN = 21
    PERFMON = 38
    BPF = 39

    @property
    def cap_name(self) -> str:
        return f"CAP_{self.name}"


@dataclass(frozen=True)
class Requirement:
    """A capability the service needs and why; ``covered_by_sys_admin`` per the kernel."""

    cap: Capability
    why: str
    covered_by_sys_admin: bool


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        Capability.BPF,
        "creating the maps, loading the program and pinning them (bpf(2))",
        covered_by_sys_admin=True,
    ),
    Requirement(
        Capability.NET_ADMIN,
        "loading an XDP program and attaching it to an interface (netlink)",
        covered_by_sys_admin=False,
    ),
    Requirement(
        Capability.PERFMON,
        "loading the program: the verifier allows the packet parser's variable-offset pointer "
        "arithmetic only with it (adopting an already pinned program works without)",
        covered_by_sys_admin=True,
    ),
)

_SYS_ADMIN_BEFORE_5_8 = Requirement(
    Capability.SYS_ADMIN,
    "bpf(2) on kernels older than 5.8, which have no CAP_BPF or CAP_PERFMON",
    covered_by_sys_admin=True,
)

_GRANT_HINT = (
    'grant it: compose `cap_add: [{short}]`, Kubernetes `capabilities.add: ["{short}"]`, '
    "systemd `AmbientCapabilities={name}` (and in CapabilityBoundingSet=)"
)

_UNPRIV_WARNING = (
    "kernel.unprivileged_bpf_disabled is 0: any local user may load BPF socket filters and "
    "create maps, which has been the entry point of verifier and Spectre exploits. xdpfw does "
    "not need this. Set it to 2 (or 1, which cannot be undone until reboot): "
    "`sysctl -w kernel.unprivileged_bpf_disabled=2` and persist it in /etc/sysctl.d/."
)


def parse_capmask(text: str) -> frozenset[int]:
    """The capability numbers set in a hex mask such as ``000001ffffffffff``."""
    value = int(text.strip(), 16)
    if value < 0:
        raise ValueError(f"capability mask {text!r} is negative")
    return frozenset(bit for bit in range(value.bit_length()) if value >> bit & 1)


def parse_status(text: str) -> dict[str, str]:
    """``/proc/<pid>/status`` as a mapping of field name to (stripped) value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def kernel_version(release: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a ``uname -r`` string, or ``None`` if it does not start with one."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


_KNOWN = frozenset(c.value for c in Capability)


def _cap_label(bit: int) -> str:
    try:
        return Capability(bit).cap_name
    except ValueError:
        return f"cap_{bit}"


@dataclass(frozen=True)
class PrivilegeReport:
    """What :func:`check` found. ``effective`` is ``None`` when /proc could not be read."""

    effective: frozenset[int] | None
    uid: int | None
    kernel_release: str
    missing: tuple[Requirement, ...] = ()
    unprivileged_bpf_disabled: int | None = None
    no_new_privs: bool | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Every needed capability is in the effective set (or could not be checked)."""
        return not self.missing

    @property
    def missing_names(self) -> tuple[str, ...]:
        return tuple(r.cap.cap_name for r in self.missing)

    @property
    def log_level(self) -> int:
        """ERROR when a capability is missing, WARNING on warnings, INFO otherwise."""
        if self.missing:
            return logging.ERROR
        return logging.WARNING if self.warnings else logging.INFO


def _needed(kernel: tuple[int, int] | None) -> tuple[Requirement, ...]:
    if kernel is not None and kernel < CAP_BPF_SINCE:
        net_admin = [r for r in REQUIREMENTS if r.cap is Capability.NET_ADMIN]
        return (_SYS_ADMIN_BEFORE_5_8, *net_admin)
    return REQUIREMENTS


def check(
    *,
    status_path: Path = STATUS_PATH,
    sysctl_path: Path = UNPRIV_BPF_SYSCTL,
    release: str | None = None,
) -> PrivilegeReport:
    """Read this process's effective capabilities and the BPF sysctl; name what is missing.

    The paths and kernel release are parameters so tests can feed in other machines.
    """
    release = release if release is not None else os.uname().release
    kernel = kernel_version(release)
    warnings: list[str] = []
    notes: list[str] = []

    effective: frozenset[int] | None = None
    uid: int | None = None
    no_new_privs: bool | None = None
    try:
        status = parse_status(status_path.read_text())
        effective = parse_capmask(status["CapEff"])
        uid_field = status.get("Uid", "").split()
        uid = int(uid_field[1]) if len(uid_field) > 1 else None
        if "NoNewPrivs" in status:
            no_new_privs = status["NoNewPrivs"] == "1"
    except (OSError, KeyError, ValueError) as exc:
        warnings.append(f"cannot read the effective capabilities from {status_path}: {exc}")

    missing: list[Requirement] = []
    if effective is not None:
        sys_admin = Capability.SYS_ADMIN in effective
        for req in _needed(kernel):
            if req.cap in effective or (req.covered_by_sys_admin and sys_admin):
                continue
            missing.append(req)
        wanted = {r.cap.value for r in _needed(kernel)}
        extra = sorted(effective - wanted)
        if extra and (kernel is None or kernel >= CAP_BPF_SINCE):
            named = ", ".join(_cap_label(b) for b in extra if b == Capability.SYS_ADMIN)
            notes.append(
                f"{len(extra)} {'capability' if len(extra) == 1 else 'capabilities'} beyond "
                "the needed ones"
                + (f" (including {named})" if named else "")
                + ": docs/deployment.md shows how to run with only CAP_BPF, CAP_NET_ADMIN "
                "and CAP_PERFMON"
            )

    unpriv: int | None = None
    try:
        unpriv = int(sysctl_path.read_text().strip())
    except (OSError, ValueError) as exc:
        notes.append(f"cannot read {sysctl_path}: {exc}")
    if unpriv == 0:
        warnings.append(_UNPRIV_WARNING)

    return PrivilegeReport(
        effective=effective,
        uid=uid,
        kernel_release=release,
        missing=tuple(missing),
        unprivileged_bpf_disabled=unpriv,
        no_new_privs=no_new_privs,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def report_lines(report: PrivilegeReport) -> list[tuple[int, str]]:
    """The report as (logging level, line) pairs: a missing capability is an ERROR line."""
    if report.effective is None:
        caps = "unknown"
    else:
        known = [_cap_label(b) for b in sorted(report.effective) if b in _KNOWN]
        others = len(report.effective) - len(known)
        caps = ", ".join(known) or "none of CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN"
        if others:
            caps += f" and {others} other{'s' if others != 1 else ''}"
    head = [f"uid {report.uid if report.uid is not None else '?'}"]
    head.append(f"kernel {report.kernel_release}")
    if report.no_new_privs is not None:
        head.append(f"no_new_privs {int(report.no_new_privs)}")
    if report.unprivileged_bpf_disabled is not None:
        head.append(f"unprivileged_bpf_disabled {report.unprivileged_bpf_disabled}")
    lines = [(logging.INFO, f"privileges: {', '.join(head)}; effective capabilities: {caps}")]
    for req in report.missing:
        hint = _GRANT_HINT.format(short=req.cap.name, name=req.cap.cap_name)
        text = f"privileges: missing {req.cap.cap_name}, needed for {req.why}; {hint}"
        lines.append((logging.ERROR, text))
    if report.effective is not None and not report.missing:
        have = []
        for req in _needed(kernel_version(report.kernel_release)):
            via = req.cap not in report.effective
            have.append(req.cap.cap_name + (" (through CAP_SYS_ADMIN)" if via else ""))
        lines.append((logging.INFO, f"privileges: ok: {', '.join(have)}"))
    lines.extend((logging.WARNING, f"privileges: warning: {w}") for w in report.warnings)
    lines.extend((logging.INFO, f"privileges: note: {n}") for n in report.notes)
    return lines


def format_report(report: PrivilegeReport) -> str:
    """A few lines for the log: what we run with, what is missing and why, warnings."""
    return "\n".join(text for _, text in report_lines(report))


if __name__ == "__main__":
    _report = check()
    print(format_report(_report))
    raise SystemExit(0 if _report.ok else 1)
