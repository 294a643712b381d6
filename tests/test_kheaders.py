"""Tests for xdpfw.kernel.kheaders: where bcc gets its kernel headers from.

The pure tests run against fake /usr/src and /lib/modules trees in tmp dirs (the
module's path constants are monkeypatched), so they do not depend on this machine.
The bpf test builds the real merged tree and compiles a tiny program with bcc.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xdpfw.kernel import kheaders as kh

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_headers(usr_src: Path, version: str, arch: str | None = "amd64") -> tuple[Path, Path]:
    """A fake Debian split header install: -common plus an arch flavour dir."""
    common = usr_src / f"linux-headers-{version}-common"
    _write(common / "include/linux/kernel.h", f"/* common {version} */\n")
    _write(common / "include/uapi/linux/bpf.h", "/* uapi */\n")
    _write(common / "arch/x86/include/asm/ptrace.h", "/* asm */\n")
    _write(common / "Makefile", "# common makefile\n")
    kbuild = usr_src.parent / "lib" / "kbuild" / "scripts"
    _write(kbuild / "mod.sh", "#!/bin/sh\n")
    if not (common / "scripts").is_symlink():
        (common / "scripts").symlink_to("../../lib/kbuild/scripts")  # relative, as in Debian
    arch_dir = usr_src / f"linux-headers-{version}-{arch}"
    if arch is not None:
        _write(arch_dir / ".config", "CONFIG_BPF=y\n")
        _write(arch_dir / "include/generated/autoconf.h", f"/* autoconf {version} */\n")
        _write(arch_dir / "arch/x86/include/generated/asm/foo.h", "/* gen asm */\n")
        _write(arch_dir / "Makefile", "# arch makefile\n")
        (arch_dir / "scripts").symlink_to("../../lib/kbuild/scripts")
    return common, arch_dir


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    usr_src = tmp_path / "usr" / "src"
    usr_src.mkdir(parents=True)
    lib_modules = tmp_path / "lib" / "modules"
    lib_modules.mkdir(parents=True)
    monkeypatch.setattr(kh, "USR_SRC", str(usr_src))
    monkeypatch.setattr(kh, "LIB_MODULES", str(lib_modules))
    monkeypatch.setattr(kh, "DPKG_INFO", str(tmp_path / "dpkg-info"))
    monkeypatch.setattr(kh, "DEFAULT_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr(kh, "kernel_release", lambda: "6.18.44-test")
    monkeypatch.setattr(kh, "deb_arch", lambda: "amd64")
    monkeypatch.setattr(kh, "_applied", None)
    monkeypatch.delenv(kh.ENV_VAR, raising=False)
    monkeypatch.setenv(kh.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


class TestOrder:
    pytestmark = pytest.mark.pure

    def test_env_var_wins(self, fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        make_headers(fake / "usr/src", "6.1.0-9")
        (fake / "lib/modules/6.18.44-test/build").mkdir(parents=True)
        mine = fake / "my-headers"
        mine.mkdir()
        monkeypatch.setenv(kh.ENV_VAR, str(mine))
        choice = kh.find_kernel_headers()
        assert choice.path == str(mine)
        assert choice.env == {}
        assert kh.ENV_VAR in choice.how
        assert not (fake / "cache").exists()

    def test_lib_modules_build_next(self, fake: Path) -> None:
        make_headers(fake / "usr/src", "6.1.0-9")
        build = fake / "lib/modules/6.18.44-test/build"
        build.mkdir(parents=True)
        choice = kh.find_kernel_headers()
        assert choice.path == str(build)
        assert choice.env == {}
        assert choice.unset == ()
        assert not (fake / "cache").exists()

    def test_bogus_env_var_is_ignored_and_unset(
        self, fake: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        build = fake / "lib/modules/6.18.44-test/build"
        build.mkdir(parents=True)
        monkeypatch.setenv(kh.ENV_VAR, str(fake / "nope"))
        choice = kh.find_kernel_headers()
        assert choice.path == str(build)
        assert choice.unset == (kh.ENV_VAR,)
        kh.ensure_kernel_headers()
        assert kh.ENV_VAR not in os.environ

    def test_merged_tree_built(self, fake: Path) -> None:
        common, _arch_dir = make_headers(fake / "usr/src", "6.1.0-9")
        choice = kh.find_kernel_headers()
        dest = fake / "cache" / "6.1.0-9-amd64"
        assert choice.path == str(dest)
        assert choice.env == {kh.ENV_VAR: str(dest)}
        assert "built" in choice.how
        # arch files and common files both visible through one tree
        assert (dest / "include/generated/autoconf.h").read_text() == "/* autoconf 6.1.0-9 */\n"
        assert (dest / "include/linux/kernel.h").read_text() == "/* common 6.1.0-9 */\n"
        assert (dest / "arch/x86/include/generated/asm/foo.h").is_file()
        assert (dest / "arch/x86/include/asm/ptrace.h").is_file()
        assert (dest / ".config").is_file()
        # the arch flavour overrides common where both have a file
        assert (dest / "Makefile").read_text() == "# arch makefile\n"
        # relative symlinks in the sources still resolve through the farm
        assert (dest / "scripts/mod.sh").is_file()
        # it is a symlink farm: real dirs, links for leaves
        assert (dest / "include").is_dir() and not (dest / "include").is_symlink()
        assert (dest / "include/linux/kernel.h").is_symlink()
        assert os.readlink(dest / "include/linux/kernel.h") == str(
            common / "include/linux/kernel.h"
        )
        # no temp dirs left next to it
        assert sorted(p.name for p in (fake / "cache").iterdir()) == ["6.1.0-9-amd64"]

    def test_newest_version_with_arch_dir(self, fake: Path) -> None:
        usr_src = fake / "usr/src"
        make_headers(usr_src, "6.1.0-9")
        make_headers(usr_src, "6.1.0-10")  # newer: 10 > 9 numerically
        make_headers(usr_src, "6.1.0-11", arch=None)  # incomplete: no arch flavour
        make_headers(usr_src, "6.1.0-10", arch="cloud-amd64")  # worse flavour
        choice = kh.find_kernel_headers()
        assert choice.path == str(fake / "cache" / "6.1.0-10-amd64")
        assert Path(choice.path, "include/linux/kernel.h").read_text() == "/* common 6.1.0-10 */\n"

    def test_default_cache_dir(self, fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(kh.CACHE_ENV)
        make_headers(fake / "usr/src", "6.1.0-9")
        choice = kh.find_kernel_headers()
        if os.geteuid() == 0:
            assert choice.path == str(fake / "default-cache" / "6.1.0-9-amd64")
        assert choice.path is not None
        assert Path(choice.path, "include/generated/autoconf.h").is_file()


class TestIdempotence:
    pytestmark = pytest.mark.pure

    def test_second_call_reuses(self, fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        make_headers(fake / "usr/src", "6.1.0-9")
        first = kh.find_kernel_headers()
        assert first.path is not None
        ino = os.stat(first.path).st_ino

        def boom(src: str, dest: str) -> None:
            raise AssertionError("rebuilt")

        monkeypatch.setattr(kh, "_overlay", boom)
        second = kh.find_kernel_headers()
        assert second.path == first.path
        assert "reusing" in second.how
        assert os.stat(first.path).st_ino == ino

    def test_ensure_applies_env_once(self, fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        make_headers(fake / "usr/src", "6.1.0-9")
        choice = kh.ensure_kernel_headers()
        assert os.environ[kh.ENV_VAR] == choice.path
        calls: list[int] = []
        real_find = kh.find_kernel_headers

        def counting() -> kh.HeaderChoice:
            calls.append(1)
            return real_find()

        monkeypatch.setattr(kh, "find_kernel_headers", counting)
        assert kh.ensure_kernel_headers() == choice
        assert calls == []

    def test_stale_tree_is_rebuilt(self, fake: Path) -> None:
        make_headers(fake / "usr/src", "6.1.0-9")
        dest = fake / "cache" / "6.1.0-9-amd64"
        dest.mkdir(parents=True)
        (dest / "junk").write_text("half-built by a crashed run, no marker")
        choice = kh.find_kernel_headers()
        assert choice.path == str(dest)
        assert not (dest / "junk").exists()
        assert (dest / "include/generated/autoconf.h").is_file()
        marker = json.loads((dest / ".xdpfw-kheaders.json").read_text())
        assert len(marker["sources"]) == 2

    def test_removed_package_triggers_rebuild(self, fake: Path) -> None:
        import shutil

        usr_src = fake / "usr/src"
        make_headers(usr_src, "6.1.0-9")
        first = kh.find_kernel_headers()
        shutil.rmtree(usr_src / "linux-headers-6.1.0-9-amd64")
        shutil.rmtree(usr_src / "linux-headers-6.1.0-9-common")
        make_headers(usr_src, "6.1.0-9")  # reinstalled (same paths): still valid
        assert kh.find_kernel_headers().path == first.path
        shutil.rmtree(usr_src / "linux-headers-6.1.0-9-amd64")
        with pytest.raises(kh.KernelHeadersMissing):
            kh.find_kernel_headers()

    def test_concurrent_builder_wins(self, fake: Path) -> None:
        common, arch_dir = make_headers(fake / "usr/src", "6.1.0-9")
        dest = str(fake / "cache" / "tree")
        sources = [str(common), str(arch_dir)]
        assert kh.build_merged_tree(sources, dest) is True
        # a second process finished first: our rename fails, theirs is valid, we use it
        tmp = fake / "cache" / ".tmp-other"
        tmp.mkdir()
        (tmp / "x").write_text("")
        kh._install(str(tmp), dest, sources)
        assert not tmp.exists()
        assert Path(dest, "include/linux/kernel.h").is_file()
        assert kh.build_merged_tree(sources, dest) is False


class TestMissing:
    pytestmark = pytest.mark.pure

    def test_nothing_installed(self, fake: Path) -> None:
        with pytest.raises(kh.KernelHeadersMissing) as info:
            kh.find_kernel_headers()
        msg = str(info.value)
        assert "apt-get install linux-headers-amd64" in msg
        assert "make setup" in msg
        assert "6.18.44-test" in msg
        assert "bcc" in msg

    def test_only_common_installed(self, fake: Path) -> None:
        make_headers(fake / "usr/src", "6.1.0-9", arch=None)
        with pytest.raises(kh.KernelHeadersMissing, match="linux-headers-amd64") as info:
            kh.find_kernel_headers()
        assert "linux-headers-6.1.0-9-common" in str(info.value)

    def test_main_exit_codes(self, fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert kh.main([]) == 1
        assert "apt-get install linux-headers-amd64" in capsys.readouterr().err
        make_headers(fake / "usr/src", "6.1.0-9")
        assert kh.main([]) == 0
        out = capsys.readouterr().out
        assert f"kernel headers: {fake / 'cache' / '6.1.0-9-amd64'}" in out

    def test_module_does_not_import_bcc(self) -> None:
        code = "import sys, xdpfw.kernel.kheaders; sys.exit('bcc' in sys.modules)"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


BPF_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
int xdp_prog(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return XDP_PASS;
    return XDP_PASS;
}
"""


@pytest.mark.bpf
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to load BPF programs")
@pytest.mark.skipif(
    not glob.glob("/usr/src/linux-headers-*-common"), reason="no Debian kernel headers installed"
)
def test_real_merged_tree_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv (run make setup)")
    monkeypatch.delenv(kh.ENV_VAR, raising=False)
    monkeypatch.setenv(kh.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(kh, "LIB_MODULES", str(tmp_path / "no-modules"))  # force the merge
    choice = kh.find_kernel_headers()
    assert choice.path is not None and choice.path.startswith(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != kh.ENV_VAR}
    env.update(choice.env)
    code = (
        "import sys\n"
        "from bcc import BPF\n"
        "b = BPF(text=sys.argv[1])\n"
        "fn = b.load_func('xdp_prog', BPF.XDP)\n"
        "print('loaded', fn.fd > 0)\n"
    )
    proc = subprocess.run(
        [str(python), "-c", code, BPF_PROGRAM],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loaded True" in proc.stdout
