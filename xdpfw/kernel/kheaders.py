"""Locate (or assemble) the kernel headers that bcc needs to compile the XDP program.

bcc compiles our C source at load time and looks for kernel headers at
``/lib/modules/$(uname -r)/build`` (plus ``/source``) or at ``$BCC_KERNEL_SOURCE``
(a single tree).  When the running kernel has no headers package (a custom or
host-provided kernel), Debian's ``linux-headers-<arch>`` for another version is
good enough: the program only uses stable UAPI structs.  Debian splits those
headers into two directories (``-common`` and the arch flavour, which holds
``.config`` and ``include/generated``), so we merge them into one symlink farm
under a cache directory and point ``BCC_KERNEL_SOURCE`` at it.

Resolution order (:func:`find_kernel_headers`):

1. ``$BCC_KERNEL_SOURCE`` already set to a directory: use it as is.
2. ``/lib/modules/$(uname -r)/build`` exists: bcc finds it by itself.
3. ``/usr/src/linux-headers-*-common`` (newest) + the matching arch flavour
   directory: merged tree under ``$XDPFW_KHEADERS_CACHE`` (default
   ``/var/cache/xdpfw/kernel-headers``), built on demand, atomically.
4. Otherwise :class:`KernelHeadersMissing` says what to install.

This module must not import bcc: it has to run before bcc is imported.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE_DIR",
    "ENV_VAR",
    "LIB_MODULES",
    "USR_SRC",
    "HeaderChoice",
    "KernelHeadersMissing",
    "build_merged_tree",
    "ensure_kernel_headers",
    "find_kernel_headers",
    "headers_package",
    "main",
]

# Module-level paths so tests can point them at fake trees.
USR_SRC = "/usr/src"
LIB_MODULES = "/lib/modules"
DPKG_INFO = "/var/lib/dpkg/info"
DEFAULT_CACHE_DIR = "/var/cache/xdpfw/kernel-headers"
ENV_VAR = "BCC_KERNEL_SOURCE"
CACHE_ENV = "XDPFW_KHEADERS_CACHE"

_MARKER = ".xdpfw-kheaders.json"
_MARKER_FORMAT = 1
_TMP_PREFIX = ".tmp-"
_STALE_PREFIX = ".stale-"
_LEFTOVER_AGE_S = 3600.0

# platform.machine() -> Debian architecture (flavour suffix of linux-headers-*).
_DEB_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "i686": "686",
    "i386": "686",
    "riscv64": "riscv64",
}


class KernelHeadersMissing(RuntimeError):
    """No usable kernel headers: bcc cannot compile the XDP program."""


@dataclass(frozen=True)
class HeaderChoice:
    """Where bcc will find kernel headers and which environment makes it so.

    ``path`` is the header tree (``None`` only if unknown); ``how`` explains the choice
    to a human; ``env`` must be set in ``os.environ`` before bcc compiles anything and
    ``unset`` lists variables to remove (a stale ``BCC_KERNEL_SOURCE``).
    """

    path: str | None
    how: str
    env: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()


def kernel_release() -> str:
    """``uname -r`` of the running kernel."""
    return os.uname().release


def deb_arch() -> str:
    """Debian architecture name of this machine (``amd64`` on x86_64)."""
    machine = platform.machine()
    return _DEB_ARCH.get(machine, machine or "amd64")


def headers_package() -> str:
    """The Debian meta-package that installs headers for this architecture."""
    return f"linux-headers-{deb_arch()}"


def _version_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Natural sort key: ``6.1.0-10`` sorts after ``6.1.0-9``."""
    parts = re.findall(r"\d+|[^\d]+", text)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _flavour_rank(flavour: str, arch: str) -> int | None:
    """Preference of an arch flavour directory for a ``-common`` tree (lower is better)."""
    if flavour.startswith("rt-") or flavour.startswith("common"):
        return None  # rt flavours pair with -common-rt, not -common
    if flavour == arch:
        return 0
    if flavour.endswith("-" + arch):
        return 1
    return 2


def _find_pair() -> tuple[str, str] | None:
    """Newest ``(common_dir, arch_dir)`` pair under :data:`USR_SRC`, or ``None``."""
    arch = deb_arch()
    commons = [
        p for p in glob.glob(os.path.join(USR_SRC, "linux-headers-*-common")) if os.path.isdir(p)
    ]
    prefix = "linux-headers-"
    commons.sort(key=lambda p: _version_key(os.path.basename(p)), reverse=True)
    for common in commons:
        version = os.path.basename(common)[len(prefix) : -len("-common")]
        ranked: list[tuple[int, str]] = []
        for cand in glob.glob(os.path.join(USR_SRC, f"{prefix}{version}-*")):
            flavour = os.path.basename(cand)[len(prefix) + len(version) + 1 :]
            rank = _flavour_rank(flavour, arch)
            if rank is None or not os.path.isdir(os.path.join(cand, "include", "generated")):
                continue
            ranked.append((rank, cand))
        if ranked:
            ranked.sort()
            return common, ranked[0][1]
    return None


def _fingerprint(sources: list[str]) -> dict[str, object]:
    """What the merged tree was built from; a change means rebuild."""
    stamps: dict[str, int | None] = {}
    for src in sources:
        listing = os.path.join(DPKG_INFO, os.path.basename(src) + ".list")
        try:
            stamps[src] = os.stat(listing).st_mtime_ns
        except OSError:
            stamps[src] = None
    return {"format": _MARKER_FORMAT, "sources": sources, "dpkg_list_mtime_ns": stamps}


def _tree_is_valid(dest: str, sources: list[str]) -> bool:
    """``dest`` is a complete merged tree of ``sources`` that still resolves."""
    try:
        with open(os.path.join(dest, _MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return False
    if marker != _fingerprint(sources):
        return False
    # Both halves must still resolve (the packages may have been removed).
    return os.path.isdir(os.path.join(dest, "include", "generated")) and os.path.isdir(
        os.path.join(dest, "include", "linux")
    )


def _overlay(src_root: str, dest_root: str) -> None:
    """Mirror ``src_root`` into ``dest_root`` as a symlink farm, replacing what is there.

    Directories become real directories; files and symlinks (including symlinks to
    directories, which are not descended into) become absolute symlinks to the source
    entry, so relative links inside the source keep resolving.
    """
    for dirpath, dirnames, filenames in os.walk(src_root, followlinks=False):
        rel = os.path.relpath(dirpath, src_root)
        out_dir = dest_root if rel == "." else os.path.join(dest_root, rel)
        leaves = list(filenames)
        keep: list[str] = []
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                leaves.append(name)
                continue
            keep.append(name)
            target = os.path.join(out_dir, name)
            if os.path.islink(target):
                # An earlier layer linked this whole directory: expand it so both merge.
                previous = os.readlink(target)
                os.unlink(target)
                os.mkdir(target)
                if os.path.isdir(previous):
                    _overlay(previous, target)
            elif os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)
                os.mkdir(target)
            elif not os.path.lexists(target):
                os.mkdir(target)
        dirnames[:] = keep
        for name in leaves:
            target = os.path.join(out_dir, name)
            if os.path.islink(target) or os.path.isfile(target):
                os.unlink(target)
            elif os.path.isdir(target):
                shutil.rmtree(target)
            os.symlink(os.path.join(dirpath, name), target)


def build_merged_tree(sources: list[str], dest: str) -> bool:
    """Make ``dest`` a symlink farm of ``sources`` (later ones win), atomically.

    Returns ``True`` if this call built the tree, ``False`` if a valid one was already
    there (possibly built concurrently by another process).
    """
    sources = [os.path.abspath(s) for s in sources]
    if _tree_is_valid(dest, sources):
        return False
    parent = os.path.dirname(dest)
    name = os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(parent)
    tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=parent)
    try:
        for src in sources:
            _overlay(src, tmp)
        with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as fh:
            json.dump(_fingerprint(sources), fh, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; others (non-root tools) may read it
        _install(tmp, dest, sources)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def _install(tmp: str, dest: str, sources: list[str]) -> None:
    """Rename the finished ``tmp`` tree to ``dest``, coping with concurrent builders."""
    for _ in range(3):
        try:
            os.rename(tmp, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
        if _tree_is_valid(dest, sources):
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
            return
        # A stale tree (other sources or a removed package): move it aside, then retry.
        aside = tempfile.mkdtemp(
            prefix=f"{_STALE_PREFIX}{os.path.basename(dest)}-", dir=os.path.dirname(dest)
        )
        with contextlib.suppress(FileNotFoundError):
            os.rename(dest, os.path.join(aside, "tree"))
        shutil.rmtree(aside, ignore_errors=True)
    raise OSError(errno.EBUSY, f"could not install kernel header tree at {dest}")


def _clean_leftovers(parent: str) -> None:
    """Remove temp/stale trees that crashed builders left behind (older than an hour)."""
    now = time.time()
    for prefix in (_TMP_PREFIX, _STALE_PREFIX):
        for path in glob.glob(os.path.join(glob.escape(parent), prefix + "*")):
            try:
                if now - os.lstat(path).st_mtime > _LEFTOVER_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _cache_dirs() -> list[str]:
    """Cache directories to try, in order."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return [explicit]
    dirs = [DEFAULT_CACHE_DIR]
    if os.geteuid() != 0:  # cannot write /var/cache: fall back to the user's cache
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        dirs.append(os.path.join(base, "xdpfw", "kernel-headers"))
    return dirs


def _missing_message(release: str, env_value: str | None, build: str) -> str:
    pkg = headers_package()
    partial = sorted(glob.glob(os.path.join(USR_SRC, "linux-headers-*")))
    lines = [
        f"No kernel headers found for the running kernel {release}.",
        "bcc compiles the XDP program when it loads it and needs a kernel header tree;",
        "any recent Debian headers package works (the program only uses stable UAPI structs).",
        "Looked at:",
        f"  ${ENV_VAR}: "
        + ("not set" if env_value is None else f"{env_value!r} is not a directory"),
        f"  {build}: missing",
        f"  {USR_SRC}/linux-headers-*-common with a matching {deb_arch()} flavour directory"
        " (containing include/generated): "
        + ("none" if not partial else "incomplete: " + ", ".join(partial)),
        f"Fix: run `make setup`, or as root: apt-get install {pkg}",
    ]
    return "\n".join(lines)


def find_kernel_headers() -> HeaderChoice:
    """Decide where bcc gets kernel headers from, building the merged tree if needed.

    Raises :class:`KernelHeadersMissing` if there is nothing usable.
    """
    env_value = os.environ.get(ENV_VAR)
    if env_value and os.path.isdir(env_value):
        return HeaderChoice(
            path=env_value, how=f"${ENV_VAR} is set to {env_value}; bcc uses it as is", env={}
        )
    stale: tuple[str, ...] = (ENV_VAR,) if env_value is not None else ()

    release = kernel_release()
    build = os.path.join(LIB_MODULES, release, "build")
    if os.path.isdir(build):
        return HeaderChoice(
            path=build,
            how=f"headers for the running kernel at {build}; bcc finds them by itself",
            env={},
            unset=stale,
        )

    pair = _find_pair()
    if pair is not None:
        common, arch_dir = pair
        name = os.path.basename(arch_dir)[len("linux-headers-") :]
        errors: list[str] = []
        for cache in _cache_dirs():
            dest = os.path.join(cache, name)
            try:
                built = build_merged_tree([common, arch_dir], dest)
            except OSError as exc:
                errors.append(f"{dest}: {exc}")
                continue
            verb = "built" if built else "reusing"
            how = (
                f"no headers for the running kernel {release}; {verb} a merged tree of "
                f"{common} + {arch_dir} at {dest} and set ${ENV_VAR} to it "
                "(the program only uses stable UAPI structs, so other versions' headers work)"
            )
            return HeaderChoice(path=dest, how=how, env={ENV_VAR: dest})
        raise KernelHeadersMissing(
            f"Found {common} + {arch_dir} but could not build the merged header tree: "
            + "; ".join(errors)
            + f"\nFix: run `make setup` as root, or set {CACHE_ENV} to a writable directory."
        )

    raise KernelHeadersMissing(_missing_message(release, env_value, build))


_applied: HeaderChoice | None = None


def _is_applied(choice: HeaderChoice) -> bool:
    return all(os.environ.get(k) == v for k, v in choice.env.items()) and not any(
        k in os.environ for k in choice.unset
    )


def ensure_kernel_headers() -> HeaderChoice:
    """Find kernel headers and export the environment bcc needs; call before importing bcc.

    Idempotent: once applied (and still in effect) the same choice is returned without
    looking again.
    """
    global _applied
    if (
        _applied is not None
        and _applied.path is not None
        and _is_applied(_applied)
        and os.path.isdir(_applied.path)
    ):
        return _applied
    choice = find_kernel_headers()
    for key in choice.unset:
        os.environ.pop(key, None)
    os.environ.update(choice.env)
    _applied = choice
    return choice


def main(argv: list[str] | None = None) -> int:
    """``python -m xdpfw.kernel.kheaders``: print the choice (exit 0) or the error (exit 1)."""
    del argv
    try:
        choice = find_kernel_headers()
    except KernelHeadersMissing as exc:
        print(f"kheaders: ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"kernel headers: {choice.path}")
    print(f"  how: {choice.how}")
    for key, value in choice.env.items():
        print(f"  export {key}={value}")
    for key in choice.unset:
        print(f"  unset {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
