#!/usr/bin/env bash
# Idempotent machine + venv setup for xdpfw (Debian 12; as root, or through sudo). Safe to
# re-run: a second run installs nothing and only re-checks. Needs no TTY or stdin.
#
#   scripts/setup.sh run     what the service and its demo need (`make run`)
#   scripts/setup.sh [test]  that plus the test and benchmark stack (`make setup`, `make test`)
#   scripts/setup.sh --print-packages run|test   list the Debian packages, change nothing
#
# As root it also links /usr/local/bin/xdpfw (XDPFW_BIN_DIR overrides the directory) to the
# venv's command, never replacing a file that is not such a link (scripts/path-link.sh).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
ROOT=$PWD
VENV="$ROOT/.venv"
STAMP_DEV="$VENV/.installed"      # pip install -e '.[dev]' done (the test profile)
STAMP_RUN="$VENV/.installed-run"  # pip install -e . done (the run profile)

log() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

print_only=0
if [[ "${1:-}" == "--print-packages" ]]; then
    print_only=1
    shift
fi
PROFILE=${1:-test}
[[ "$PROFILE" == run || "$PROFILE" == test ]] || die "unknown profile '$PROFILE' (run or test)"

# The headers meta-package of this architecture (linux-headers-amd64, linux-headers-arm64...),
# as the Dockerfile picks it; xdpfw.kernel.kheaders looks for the same flavour.
ARCH=$(dpkg --print-architecture)

# run: bcc and the headers it compiles against, a venv, and what the demo's printed lines use
# (ip, ping, curl).
RUN_PACKAGES=(
    python3-bpfcc "linux-headers-$ARCH" python3-venv iproute2 iputils-ping curl
)
# test: the test suite and the benchmarks (xdp-filter as the foreign program and the rival,
# trafgen from netsniff-ng, nftables/ipset/iptables as rivals, bpftool/tcpdump to look;
# systemd for systemd-analyze verify of deploy/systemd, which needs no systemd as PID 1;
# zsh to run the zsh completion).
TEST_PACKAGES=(
    "${RUN_PACKAGES[@]}" python3-pip bpfcc-tools xdp-tools bpftool netsniff-ng nftables ipset
    iptables tcpdump tshark systemd zsh
    # fleet mode (docs/fleet.md): the tests start their own etcd 3.4 cluster on loopback
    etcd-server etcd-client
)
# Partner programs the tests run on private config dirs: crowdsec (the LAPI and cscli of
# tests/test_crowdsec_lapi.py), fail2ban (fail2ban-server/-client of tests/test_fail2ban.py),
# prometheus (promtool, tests/test_prometheus.py). The daemons their postinst starts are stopped
# below: the tests start their own instances.
PARTNER_DAEMONS=(crowdsec fail2ban prometheus)
TEST_PACKAGES+=("${PARTNER_DAEMONS[@]}")
if [[ "$PROFILE" == run ]]; then
    PACKAGES=("${RUN_PACKAGES[@]}")
else
    PACKAGES=("${TEST_PACKAGES[@]}")
fi
if ((print_only)); then
    printf '%s\n' "${PACKAGES[@]}"
    exit 0
fi

# --- Debian packages ---------------------------------------------------------------
# crowdsec's postinst registers with CrowdSec's online API and fails without the internet,
# unless online_api_credentials.yaml already exists and is not empty: then it configures
# offline (the tests run their own LAPI on loopback; nothing here talks to the internet).
crowdsec_offline_credentials() {
    local pkg creds=/etc/crowdsec/online_api_credentials.yaml
    for pkg in "$@"; do
        [[ "$pkg" == crowdsec ]] || continue
        if [[ ! -s "$creds" ]]; then
            log "crowdsec: writing $creds (a comment) so its postinst configures offline"
            mkdir -p /etc/crowdsec
            echo "# xdpfw setup: no online API (offline install; see scripts/setup.sh)" >"$creds"
        fi
    done
}

# Under systemd the package enables and starts its own agent + LAPI (127.0.0.1:8080). The
# tests run their own LAPI on a private config; a crowdsec installed by this script is not
# left running (one installed before is left alone). Without systemd nothing was started.
partner_daemons_off() {
    # A package's postinst starts its daemon (fail2ban would ban with Debian's sshd jail,
    # prometheus would listen on :9090, crowdsec on :8080): stop and disable those this run
    # installed, under systemd or under an init script (no systemd as PID 1).
    local pkg daemon
    for pkg in "$@"; do
        for daemon in "${PARTNER_DAEMONS[@]}"; do
            [[ "$pkg" == "$daemon" ]] || continue
            log "$daemon: stopping the package's own service (the tests run their own)"
            if [[ -d /run/systemd/system ]]; then
                systemctl disable --now "$daemon" >/dev/null 2>&1 || true
            elif [[ -x /etc/init.d/$daemon ]]; then
                /etc/init.d/"$daemon" stop >/dev/null 2>&1 || true
            fi
        done
    done
}

# Fleet mode (docs/fleet.md): etcd-server's postinst starts etcd on 127.0.0.1:2379; the tests
# start their own cluster on free ports: stop and disable the package's one.
fleet_etcd_off() {
    local pkg
    for pkg in "$@"; do
        [[ "$pkg" == etcd-server ]] || continue
        log "etcd: stopping the package's own service (the fleet tests run their own)"
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now etcd >/dev/null 2>&1 || true
        elif [[ -x /etc/init.d/etcd ]]; then
            /etc/init.d/etcd stop >/dev/null 2>&1 || true
        fi
    done
}

declare -A installed=()
while read -r pkg status; do
    [[ "$status" == installed ]] && installed[$pkg]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
missing=()
for pkg in "${PACKAGES[@]}"; do
    [[ -n "${installed[$pkg]:-}" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] ||
        die "missing packages (${missing[*]}); run this as root, or with sudo (sudo make $PROFILE)"
    export DEBIAN_FRONTEND=noninteractive APT_LISTCHANGES_FRONTEND=none NEEDRESTART_MODE=a
    log "installing ${missing[*]}"
    # tshark (X-ray's tests read the captures with it) asks whether non-root users may
    # capture; answer no, so the install never waits on a question.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    crowdsec_offline_credentials "${missing[@]}"
    apt-get -q -o DPkg::Lock::Timeout=300 update </dev/null >/dev/null
    apt-get -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold install --no-install-recommends \
        "${missing[@]}" </dev/null >/dev/null
    partner_daemons_off "${missing[@]}"
    fleet_etcd_off "${missing[@]}"
else
    log "debian packages present ($PROFILE)"
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

# --- the project (run) or the project + dev dependencies (test) ----------------------
fresh() { [[ -e "$1" && ! "$ROOT/pyproject.toml" -nt "$1" && ! "$ROOT/setup.py" -nt "$1" ]]; }
if [[ "$PROFILE" == test ]]; then
    spec='.[dev]'
    stamps=("$STAMP_DEV" "$STAMP_RUN")
    fresh "$STAMP_DEV" && spec=''
else
    spec='.'
    stamps=("$STAMP_RUN")
    { fresh "$STAMP_RUN" || fresh "$STAMP_DEV"; } && spec=''
fi
if [[ -n "$spec" ]]; then
    log "pip install -e '$spec'"
    pip_log="$VENV/pip-install.log"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -e "$spec" \
        </dev/null >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        die "pip install failed (full log: $pip_log)"
    fi
    touch "${stamps[@]}"
else
    log "python dependencies up to date ($PROFILE)"
fi

# --- kernel headers for bcc ------------------------------------------------------------
kh_out=$("$VENV/bin/python" -m xdpfw.kernel.kheaders </dev/null) || die "kernel headers: see above"
kh_path=$(sed -n 's/^kernel headers: //p' <<<"$kh_out")

# --- `xdpfw` on PATH ---------------------------------------------------------------------
if [[ $EUID -eq 0 ]]; then
    bash "$ROOT/scripts/path-link.sh" "$VENV/bin/xdpfw" "${XDPFW_BIN_DIR:-/usr/local/bin}/xdpfw"
else
    log "not root: no link in /usr/local/bin; the command is $VENV/bin/xdpfw"
fi

log "ok: $("$VENV/bin/python" -c 'import sys; print("python", sys.version.split()[0])')," \
    "bcc $("$VENV/bin/python" -c 'import bcc; print(getattr(bcc, "__version__", "?"))' 2>/dev/null)," \
    "bpffs $(stat -f -c %T /sys/fs/bpf 2>/dev/null || echo '?'), kernel $(uname -r)," \
    "headers $kh_path"
