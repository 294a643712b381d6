#!/usr/bin/env bash
# Idempotent machine + venv setup for xdpfw (Debian 12, as root). Safe to re-run:
# a second run installs nothing and only re-checks. Needs no TTY or stdin.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
ROOT=$PWD
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

PACKAGES=(
    python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-pip
    iproute2 xdp-tools bpftool netsniff-ng nftables ipset iptables tcpdump
)

# --- Debian packages ---------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}); run this script as root"
    export DEBIAN_FRONTEND=noninteractive APT_LISTCHANGES_FRONTEND=none NEEDRESTART_MODE=a
    log "installing ${missing[*]}"
    apt-get -q -o DPkg::Lock::Timeout=300 update </dev/null >/dev/null
    apt-get -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold install --no-install-recommends \
        "${missing[@]}" </dev/null >/dev/null
else
    log "debian packages present"
fi

# --- bpffs ---------------------------------------------------------------------------
if [[ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null || true)" != "bpf_fs" ]]; then
    if [[ $EUID -eq 0 ]]; then
        log "mounting bpffs at /sys/fs/bpf"
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
    else
        log "WARNING: /sys/fs/bpf is not bpffs and we are not root; skipping mount"
    fi
fi

# --- venv (must see Debian's bcc through system site packages) ----------------------
venv_ok() {
    [[ -x "$VENV/bin/python" ]] &&
        grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null &&
        "$VENV/bin/python" -c 'import bcc' >/dev/null 2>&1
}
if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        log "recreating $VENV (no system site packages or bcc not importable)"
        rm -rf "$VENV"
    else
        log "creating $VENV"
    fi
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    venv_ok || die "bcc is not importable from $VENV (is python3-bpfcc installed?)"
fi

# --- project + dev dependencies -------------------------------------------------------
if [[ ! -e "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" || "$ROOT/setup.py" -nt "$STAMP" ]]; then
    log "pip install -e '.[dev]'"
    pip_log="$VENV/pip-install.log"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -e '.[dev]' \
        </dev/null >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    touch "$STAMP"
else
    log "python dependencies up to date"
fi

# --- kernel headers for bcc ------------------------------------------------------------
kh_out=$("$VENV/bin/python" -m xdpfw.kernel.kheaders </dev/null) || die "kernel headers: see above"
kh_path=$(sed -n 's/^kernel headers: //p' <<<"$kh_out")

log "ok: $("$VENV/bin/python" -c 'import sys; print("python", sys.version.split()[0])')," \
    "bcc $("$VENV/bin/python" -c 'import bcc; print(getattr(bcc, "__version__", "?"))' 2>/dev/null)," \
    "bpffs $(stat -f -c %T /sys/fs/bpf 2>/dev/null || echo '?'), kernel $(uname -r)," \
    "headers $kh_path"
