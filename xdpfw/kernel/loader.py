"""The only module that imports bcc: compile bpf/xdp_filter.c, load it, hand back file descriptors.

bcc compiles the C source at run time with the kernel headers that xdpfw.kernel.kheaders finds (or
builds). Capacities reach the C code as validated integer -D flags; nothing a user typed is ever
spliced into the source. The loader duplicates the program and map file descriptors it needs and
then releases bcc's module, so the rest of xdpfw works with plain fds (xdpfw.kernel.bpfsys)
whether the program was just loaded or adopted from pins.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xdpfw import abi
from xdpfw.compiler import Capacities
from xdpfw.errors import CompileError, HeadersMissing
from xdpfw.kernel.kheaders import KernelHeadersMissing, ensure_kernel_headers
from xdpfw.kernel.ringbuf import xray_supported

__all__ = [
    "MAP_NAMES",
    "LoadedProgram",
    "build_id",
    "cflags",
    "compile_types",
    "load",
    "load_isolated",
    "load_source",
]

MAP_NAMES = (
    *(t.map_name for t in abi.Table if t.is_map),
    # IPv4 prefixes: DIR-24-8 (issue 18, ABI 5)
    *abi.d248_maps(abi.Table.SRC4_LPM),
    *abi.d248_maps(abi.Table.DST4_LPM),
    "xdpfw_sets",
    "xdpfw_rule_stats",
    "xdpfw_rule_seen",
    "xdpfw_stats",
    "xdpfw_config",
    # X-ray (issue 17)
    "xdpfw_sample_ctl",
    "xdpfw_sample_rules",
    "xdpfw_sample_bucket",
    "xdpfw_sample_stats",
    "xdpfw_samples",
    # rate limits (issue 16)
    "xdpfw_limits",
    "xdpfw_limit_stats",
    "xdpfw_buckets",
    "xdpfw_bans",
)


@dataclass
class LoadedProgram:
    """Owned file descriptors of a freshly loaded program and its maps."""

    prog_fd: int
    map_fds: dict[str, int]

    def close(self) -> None:
        for fd in (self.prog_fd, *self.map_fds.values()):
            with contextlib.suppress(OSError):
                os.close(fd)


def cflags(caps: Capacities) -> list[str]:
    for name, value in (
        ("max_rules", caps.max_rules),
        ("max_prefixes", caps.max_prefixes),
        ("max_sets", caps.max_sets),
        ("max_tbl8_groups", caps.max_tbl8_groups),
    ):
        if not isinstance(value, int) or not 1 <= value <= 1 << 26:
            raise ValueError(f"{name} must be an integer between 1 and {1 << 26}, got {value!r}")
    if caps.max_sets < 2:
        raise ValueError("max_sets must be at least 2 (set 0 is reserved)")
    return [
        f"-I{abi.BPF_DIR}",
        f"-DXDPFW_MAX_RULES={caps.max_rules}",
        f"-DXDPFW_MAX_PREFIXES={caps.max_prefixes}",
        f"-DXDPFW_MAX_SETS={caps.max_sets}",
        f"-DXDPFW_MAX_TBL8_GROUPS={caps.max_tbl8_groups}",
        f"-DXDPFW_XRAY={int(xray_supported())}",  # X-ray: sampling needs 5.18
        "-Wno-unused-function",
    ]


def build_id(caps: Capacities) -> bytes:
    """8 bytes that change whenever the program bcc would build changes (source or flags)."""
    h = hashlib.sha256()
    for part in (abi.PROGRAM.read_bytes(), abi.HEADER.read_bytes(), *map(str.encode, cflags(caps))):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()[:8]


# Build variants a benchmark may ask for (never the product): name -> what it changes.
VARIANTS = {"XDPFW_PERCPU_BUCKETS": "rate-limit buckets per CPU instead of shared (issue 16)"}


@contextlib.contextmanager
def _bcc_module(caps: Capacities, variants: tuple[str, ...] = ()) -> Iterator[object]:
    try:
        ensure_kernel_headers()
    except KernelHeadersMissing as exc:
        raise HeadersMissing(str(exc)) from exc
    from bcc import BPF  # the one import of bcc in xdpfw

    # bcc prints compiler diagnostics on stderr; keep them for the error message.
    captured = io.StringIO()
    try:
        with _capture_fd2(captured):
            flags = cflags(caps) + [f"-D{v}" for v in variants if v in VARIANTS]
            module = BPF(src_file=str(abi.PROGRAM).encode(), cflags=flags)
    except Exception as exc:
        raise CompileError(
            f"bcc could not compile {abi.PROGRAM}: {exc}\n{captured.getvalue()[-4000:]}"
        ) from exc
    try:
        yield module
    finally:
        module.cleanup()


@contextlib.contextmanager
def _capture_fd2(sink: io.StringIO) -> Iterator[None]:
    """Collect what the C++ side of bcc writes to fd 2 (compiler diagnostics)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            sink.write(tmp.read().decode(errors="replace"))


def load(caps: Capacities, variants: tuple[str, ...] = ()) -> LoadedProgram:
    """Compile, verify and load the program; return duplicated fds of it and all its maps.
    `variants`: names from VARIANTS (benchmarks only)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown build variants {unknown}; known: {sorted(VARIANTS)}")
    with _bcc_module(caps, variants) as module:
        bpf = module
        try:
            fn = bpf.load_func(abi.PROG_NAME.encode(), bpf.XDP)  # type: ignore[attr-defined]
        except Exception as exc:
            raise CompileError(f"the kernel refused {abi.PROG_NAME}: {exc}") from exc
        prog_fd = os.dup(fn.fd)
        map_fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                map_fds[name] = os.dup(bpf[name.encode()].map_fd)  # type: ignore[index]
        except Exception:
            LoadedProgram(prog_fd, map_fds).close()
            raise
        return LoadedProgram(prog_fd, map_fds)


def load_source(
    src: Path, func: str, flags: Sequence[str] = (), maps: Sequence[str] = ()
) -> LoadedProgram:
    """Compile another XDP program (a bench prototype, an older release of ours) and load its
    function `func`; the fds of the maps named in `maps` that it has (others are skipped).

    The same door as `load`: headers found or built, compiler errors kept, bcc released."""
    try:
        ensure_kernel_headers()
    except KernelHeadersMissing as exc:
        raise HeadersMissing(str(exc)) from exc
    from bcc import BPF

    captured = io.StringIO()
    try:
        with _capture_fd2(captured):
            module = BPF(src_file=str(src).encode(), cflags=list(flags))
    except Exception as exc:
        raise CompileError(f"bcc could not compile {src}: {exc}\n{captured.getvalue()[-4000:]}") \
            from exc
    map_fds: dict[str, int] = {}
    prog_fd = -1
    try:
        try:
            fn = module.load_func(func.encode(), BPF.XDP)
        except Exception as exc:
            raise CompileError(f"the kernel refused {func} of {src}: {exc}") from exc
        prog_fd = os.dup(fn.fd)
        for name in maps:
            try:
                table = module.get_table(name.encode())
            except KeyError:
                continue  # not in this build of the program
            map_fds[name] = os.dup(table.map_fd)
    except BaseException:
        LoadedProgram(prog_fd, map_fds).close()
        raise
    finally:
        module.cleanup()
    return LoadedProgram(prog_fd, map_fds)


def load_isolated(caps: Capacities, staging: Path, timeout: float = 300.0) -> LoadedProgram:
    """`load`, but compiled in a child process so LLVM never enters this one.

    bcc links LLVM and clang: importing it costs a long-running service ~180 MB of resident
    memory for a compile it does once. The child compiles, loads and pins the program and
    maps under `staging` (on bpffs); this process opens the pins and removes them.
    """
    from xdpfw.kernel import bpfsys

    cmd = [
        sys.executable, "-m", "xdpfw.kernel.loader", "--pin-dir", str(staging),
        "--max-rules", str(caps.max_rules), "--max-prefixes", str(caps.max_prefixes),
        "--max-sets", str(caps.max_sets), "--max-tbl8-groups", str(caps.max_tbl8_groups),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        if proc.returncode == 3:
            raise HeadersMissing(proc.stderr.strip())
        if proc.returncode != 0:
            raise CompileError(
                f"compiling {abi.PROGRAM.name} failed (exit {proc.returncode}):\n"
                + proc.stderr[-4000:]
            )
        prog_fd = bpfsys.obj_get(str(staging / "prog"))
        map_fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                map_fds[name] = bpfsys.obj_get(str(staging / name))
        except BaseException:
            LoadedProgram(prog_fd, map_fds).close()
            raise
        return LoadedProgram(prog_fd, map_fds)
    finally:
        if staging.is_dir():
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()


def _child_main(argv: list[str] | None = None) -> int:
    """python -m xdpfw.kernel.loader --pin-dir DIR [--max-...]: compile, load, pin, exit."""
    import argparse

    from xdpfw.kernel import bpfsys

    ap = argparse.ArgumentParser(prog="python -m xdpfw.kernel.loader")
    ap.add_argument("--pin-dir", type=Path, required=True)
    ap.add_argument("--max-rules", type=int, required=True)
    ap.add_argument("--max-prefixes", type=int, required=True)
    ap.add_argument("--max-sets", type=int, required=True)
    ap.add_argument("--max-tbl8-groups", type=int, default=abi.MAX_TBL8_GROUPS)
    args = ap.parse_args(argv)
    caps = Capacities(args.max_rules, args.max_prefixes, args.max_sets, args.max_tbl8_groups)
    try:
        loaded = load(caps)
    except HeadersMissing as exc:
        print(exc, file=sys.stderr)
        return 3
    except CompileError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        args.pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in loaded.map_fds.items():
            bpfsys.obj_pin(fd, str(args.pin_dir / name))
        bpfsys.obj_pin(loaded.prog_fd, str(args.pin_dir / "prog"))
    except OSError as exc:
        print(f"pinning under {args.pin_dir}: {exc}", file=sys.stderr)
        return 1
    finally:
        loaded.close()
    return 0


def compile_types(caps: Capacities) -> dict[str, tuple[type[ctypes._CData], type[ctypes._CData]]]:
    """bcc's generated (Key, Leaf) ctypes per map, for the ABI mirror test."""
    with _bcc_module(caps) as module:
        out: dict[str, tuple[type[ctypes._CData], type[ctypes._CData]]] = {}
        for name in MAP_NAMES:
            table = module[name.encode()]  # type: ignore[index]
            out[name] = (table.Key, table.Leaf)
        return out


if __name__ == "__main__":
    sys.exit(_child_main())
