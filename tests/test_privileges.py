"""xdpfw.kernel.privileges: parsing /proc, naming what is missing; and against the real kernel.

The pure tests feed fake /proc files. The root ones drop capabilities with setpriv(1) and look
at what a child process reports, and run deploy/prove-capabilities.sh, the experiment behind
the capability list in the deployment files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xdpfw.kernel.privileges import (
    CAP_BPF_SINCE,
    REQUIREMENTS,
    Capability,
    PrivilegeReport,
    check,
    format_report,
    kernel_version,
    parse_capmask,
    parse_status,
    report_lines,
)

ROOT = Path(__file__).resolve().parent.parent
FULL = "000001ffffffffff"  # all 41 capabilities of a 6.x kernel
THREE = "000000c000001000"  # CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF (as seen in the experiment)


def status_text(capeff: str, uid: int = 0, nnp: int = 0) -> str:
    return (
        "Name:\tpython3\nUmask:\t0022\nState:\tR (running)\n"
        f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"
        "CapInh:\t0000000000000000\nCapPrm:\t{capeff}\nCapEff:\t{capeff}\n"
        "CapBnd:\t{capeff}\nCapAmb:\t0000000000000000\n"
        f"NoNewPrivs:\t{nnp}\nSeccomp:\t0\n"
    ).replace("{capeff}", capeff)


def fake_check(
    tmp_path: Path, capeff: str, *, unpriv: str | None = "2", release: str = "6.1.0-9-amd64"
) -> PrivilegeReport:
    status = tmp_path / "status"
    status.write_text(status_text(capeff))
    sysctl = tmp_path / "unprivileged_bpf_disabled"
    if unpriv is not None:
        sysctl.write_text(unpriv + "\n")
    return check(status_path=status, sysctl_path=sysctl, release=release)


def caps_mask(*caps: Capability) -> str:
    return f"{sum(1 << c for c in caps):016x}"


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000000000000000", set()),
        ("0000000000001000", {12}),
        ("0000008000000000", {39}),
        (THREE, {12, 38, 39}),
        ("000001ffffffffff\n", set(range(41))),
        ("000001fffeffffff", set(range(41)) - {24}),  # this machine: no CAP_SYS_RESOURCE
    ],
)
def test_parse_capmask(text: str, expected: set[int]) -> None:
    assert parse_capmask(text) == frozenset(expected)


@pytest.mark.pure
@pytest.mark.parametrize("bad", ["", "xyz", "-1"])
def test_parse_capmask_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_capmask(bad)


@pytest.mark.pure
def test_parse_status_fields() -> None:
    fields = parse_status(status_text(THREE, uid=995, nnp=1))
    assert fields["CapEff"] == THREE
    assert fields["Uid"].split() == ["995"] * 4
    assert fields["NoNewPrivs"] == "1"


@pytest.mark.pure
@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v657", (6, 18)),
        ("5.4.0-150-generic", (5, 4)),
        ("5.10.0-28-amd64", (5, 10)),
        ("4.19.0-27-amd64", (4, 19)),
        ("weird", None),
    ],
)
def test_kernel_version(release: str, expected: tuple[int, int] | None) -> None:
    assert kernel_version(release) == expected


@pytest.mark.pure
def test_capability_numbers_match_the_uapi_header() -> None:
    # include/uapi/linux/capability.h
    assert (Capability.NET_ADMIN, Capability.SYS_ADMIN) == (12, 21)
    assert (Capability.PERFMON, Capability.BPF) == (38, 39)
    assert Capability.BPF.cap_name == "CAP_BPF"
    assert CAP_BPF_SINCE == (5, 8)


# -- what is missing -------------------------------------------------------------------------


@pytest.mark.pure
def test_the_three_capabilities_are_enough(tmp_path: Path) -> None:
    report = fake_check(tmp_path, THREE)
    assert report.ok
    assert report.missing == ()
    assert report.effective == frozenset({12, 38, 39})
    assert report.notes == ()
    text = format_report(report)
    assert "ok: CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON" in text
    assert report.log_level == 20  # logging.INFO


@pytest.mark.pure
@pytest.mark.parametrize(
    ("have", "missing"),
    [
        ((Capability.NET_ADMIN, Capability.PERFMON), ["CAP_BPF"]),
        ((Capability.BPF, Capability.PERFMON), ["CAP_NET_ADMIN"]),
        ((Capability.BPF, Capability.NET_ADMIN), ["CAP_PERFMON"]),
        ((), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]),
        # CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, never for CAP_NET_ADMIN.
        ((Capability.SYS_ADMIN, Capability.NET_ADMIN), []),
        ((Capability.SYS_ADMIN,), ["CAP_NET_ADMIN"]),
    ],
)
def test_missing_capabilities_are_named(
    tmp_path: Path, have: tuple[Capability, ...], missing: list[str]
) -> None:
    report = fake_check(tmp_path, caps_mask(*have))
    assert list(report.missing_names) == missing
    assert report.ok is (not missing)
    text = format_report(report)
    for name in missing:
        line = next(x for x in text.splitlines() if f"missing {name}," in x)
        short = name.removeprefix("CAP_")
        assert f"cap_add: [{short}]" in line, line
        assert f"AmbientCapabilities={name}" in line, line
        why = next(r.why for r in REQUIREMENTS if r.cap.cap_name == name)
        assert why in line
    if missing:
        assert report.log_level == 40  # logging.ERROR


@pytest.mark.pure
def test_sys_admin_fallback_is_reported_as_such(tmp_path: Path) -> None:
    report = fake_check(tmp_path, caps_mask(Capability.SYS_ADMIN, Capability.NET_ADMIN))
    text = format_report(report)
    assert "CAP_BPF (through CAP_SYS_ADMIN)" in text
    assert "CAP_PERFMON (through CAP_SYS_ADMIN)" in text
    # On a kernel that has CAP_BPF, CAP_SYS_ADMIN is more than needed: say so.
    assert any("including CAP_SYS_ADMIN" in n for n in report.notes)


@pytest.mark.pure
def test_kernels_before_5_8_need_sys_admin(tmp_path: Path) -> None:
    old = "5.4.0-150-generic"
    report = fake_check(tmp_path, caps_mask(Capability.NET_ADMIN), release=old)
    assert report.missing_names == ("CAP_SYS_ADMIN",)
    assert "older than 5.8" in format_report(report)
    # CAP_BPF on such a kernel does not exist, so it cannot satisfy anything.
    report = fake_check(tmp_path, caps_mask(Capability.BPF, Capability.NET_ADMIN), release=old)
    assert report.missing_names == ("CAP_SYS_ADMIN",)
    ok = fake_check(tmp_path, caps_mask(Capability.SYS_ADMIN, Capability.NET_ADMIN), release=old)
    assert ok.ok
    assert ok.notes == ()


@pytest.mark.pure
def test_full_root_is_ok_with_a_note(tmp_path: Path) -> None:
    report = fake_check(tmp_path, FULL)
    assert report.ok
    assert "and 37 others" in format_report(report)
    assert any("38 capabilities beyond the needed ones" in n for n in report.notes)


@pytest.mark.pure
def test_report_lines_carry_log_levels(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    report = fake_check(tmp_path, caps_mask(Capability.NET_ADMIN), unpriv="0")
    lines = report_lines(report)
    assert "\n".join(t for _, t in lines) == format_report(report)
    by_level = {level: [t for lv, t in lines if lv == level] for level, _ in lines}
    assert [t.split(",")[0] for t in by_level[logging.ERROR]] == [
        "privileges: missing CAP_BPF",
        "privileges: missing CAP_PERFMON",
    ]
    assert all("warning:" in t for t in by_level[logging.WARNING])
    # What serve() does with it (the lines handed over for api/server.py).
    log = logging.getLogger("xdpfw.server")
    with caplog.at_level(logging.INFO, logger="xdpfw.server"):
        for level, line in report_lines(report):
            log.log(level, "%s", line)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "CAP_BPF" in errors[0]


# -- the sysctl ------------------------------------------------------------------------------


@pytest.mark.pure
@pytest.mark.parametrize("value", ["1", "2"])
def test_unprivileged_bpf_disabled_is_fine(tmp_path: Path, value: str) -> None:
    report = fake_check(tmp_path, THREE, unpriv=value)
    assert report.unprivileged_bpf_disabled == int(value)
    assert report.warnings == ()


@pytest.mark.pure
def test_unprivileged_bpf_enabled_warns(tmp_path: Path) -> None:
    report = fake_check(tmp_path, THREE, unpriv="0")
    assert report.ok  # a warning, not a missing privilege
    assert report.log_level == 30  # logging.WARNING
    (warning,) = report.warnings
    assert "kernel.unprivileged_bpf_disabled is 0" in warning
    assert "sysctl -w kernel.unprivileged_bpf_disabled=2" in warning
    assert "warning: kernel.unprivileged_bpf_disabled is 0" in format_report(report)


@pytest.mark.pure
def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    report = check(
        status_path=tmp_path / "absent-status",
        sysctl_path=tmp_path / "absent-sysctl",
        release="6.1.0",
    )
    assert report.effective is None
    assert report.ok  # nothing known to be missing
    assert report.unprivileged_bpf_disabled is None
    text = format_report(report)
    assert "effective capabilities: unknown" in text
    assert "cannot read the effective capabilities" in text
    assert "cannot read" in " ".join(report.notes)


@pytest.mark.pure
def test_this_process_can_be_checked() -> None:
    report = check()
    assert report.effective is not None
    assert report.kernel_release == os.uname().release
    assert format_report(report).startswith("privileges: uid ")


# -- against the kernel ----------------------------------------------------------------------

SETPRIV = shutil.which("setpriv")
CHILD = (
    "import json; from xdpfw.kernel.privileges import check, format_report; r = check(); "
    "print(json.dumps({'missing': list(r.missing_names), 'ok': r.ok, "
    "'effective': sorted(r.effective or ()), 'text': format_report(r)}))"
)


def run_with_caps(caps: str) -> dict[str, object]:
    """Run CHILD as uid 0 with exactly ``caps`` (setpriv names, comma separated)."""
    assert SETPRIV is not None
    spec = "-all" + "".join(f",+{c}" for c in caps.split(",") if c)
    proc = subprocess.run(
        [SETPRIV, "--reuid=0", f"--inh-caps={spec}", f"--bounding-set={spec}", "--",
         sys.executable, "-c", CHILD],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


# setpriv changes the bounding set, which needs root; the kernel layer is skipped without it.
needs_setpriv = pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is missing")


@pytest.mark.kernel
@needs_setpriv
def test_dropping_cap_bpf_is_reported() -> None:
    out = run_with_caps("net_admin,perfmon")
    assert out["missing"] == ["CAP_BPF"]
    assert out["effective"] == [12, 38]
    assert "missing CAP_BPF, needed for" in str(out["text"])


@pytest.mark.kernel
@needs_setpriv
def test_dropping_cap_net_admin_is_reported() -> None:
    out = run_with_caps("bpf,perfmon")
    assert out["missing"] == ["CAP_NET_ADMIN"]


@pytest.mark.kernel
@needs_setpriv
def test_the_deployed_set_reports_ok() -> None:
    out = run_with_caps("bpf,net_admin,perfmon")
    assert out["ok"] is True
    assert out["effective"] == [12, 38, 39]


PROVE = ROOT / "deploy" / "prove-capabilities.sh"
CORE_CASES = ["bpf+net_admin+perfmon", "no-perfmon", "no-bpf", "no-net_admin"]


@pytest.mark.e2e
@needs_setpriv
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
def test_the_deployed_capability_set_is_necessary_and_sufficient() -> None:
    """`xdpfw serve` starts with CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON and fails without any one.

    If the no-perfmon case starts passing, the program no longer needs CAP_PERFMON: drop it
    from docker-compose.yml, deploy/systemd and deploy/kubernetes (tests/test_deploy.py keeps
    them in step) and from xdpfw.kernel.privileges.
    """
    env = {**os.environ, "XDPFW": str(Path(sys.executable).with_name("xdpfw"))}
    proc = subprocess.run(
        ["bash", str(PROVE), *CORE_CASES],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for case in CORE_CASES:
        assert f"PASS {case} " in proc.stdout, proc.stdout
