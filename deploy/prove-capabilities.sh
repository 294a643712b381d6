#!/usr/bin/env bash
# Which privileges does `xdpfw serve` really need? Run it under reduced capability sets and
# container-like restrictions against a throw-away veth pair, and report what worked.
#
#   sudo deploy/prove-capabilities.sh            # all cases
#   sudo VERBOSE=1 deploy/prove-capabilities.sh no-bpf no-perfmon   # some cases, with logs
#
# Each case starts `xdpfw serve` through setpriv(1) as uid 0 (or a spare uid) with the given
# bounding, inheritable and ambient sets, waits for GET /healthz == 200, adds one rule through
# the API (a map write), stops it with SIGTERM and checks the exit code. A case passes when
# that outcome is the expected one ("ok" or "refused"). The lab is a namespace xfw-dep-PID, a
# veth pair xfwdepPIDa/b, pins under /sys/fs/bpf/xdpfw-dep-PID-* and a work dir in /dev/shm;
# all of it is removed on exit, also on failure or Ctrl-C. The host's other interfaces are never
# touched. Needs root with the full capability set, util-linux (setpriv, prlimit, unshare), curl.
set -euo pipefail

ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
XDPFW=${XDPFW:-$ROOT/.venv/bin/xdpfw}
TAG=$$
NS=xfw-dep-$TAG
HOST_IF=xfwdep${TAG}a
PEER_IF=xfwdep${TAG}b
PINS_BASE=/sys/fs/bpf/xdpfw-dep-$TAG
WORK=/dev/shm/xfw-dep-$TAG # tmpfs, its own mount: stays writable when / is made read-only
SPARE_UID=${SPARE_UID:-64123} # uid/gid with no passwd entry, for the non-root case

log() { printf 'prove: %s\n' "$*"; }
die() { printf 'prove: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root"
[[ -x $XDPFW ]] || die "$XDPFW not found (run make setup, or set XDPFW=...)"
for tool in setpriv prlimit unshare curl ip; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done

SERVER_PID=""
# shellcheck disable=SC2329 # run by the EXIT trap
cleanup() {
    set +e
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        sleep 2
        kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
    fi
    ip link set dev "$HOST_IF" xdp off 2>/dev/null
    ip link set dev "$HOST_IF" xdpgeneric off 2>/dev/null
    rm -rf "$PINS_BASE"-* 2>/dev/null
    ip link del "$HOST_IF" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$PEER_IF" netns "$NS"
ip link set dev "$HOST_IF" up
ip -n "$NS" link set dev "$PEER_IF" up
mkdir -p "$WORK"

# case name | expected outcome | capabilities (setpriv names) | uid | wrapper
# Wrappers (see run_wrapped):
#   none       plain setpriv
#   memlock0   RLIMIT_MEMLOCK soft=hard=0
#   container  private mount namespace shaped like an unprivileged container: / read-only,
#              /sys and /proc/sys read-only, /proc/kallsyms masked, tmpfs /tmp; only the state
#              dir and bpffs writable
#   ro-notmp   as container, but without the tmpfs on /tmp
CASES=(
    "bpf+net_admin+perfmon|ok|bpf,net_admin,perfmon|0|none"
    "restart-adopts-pins|ok|bpf,net_admin,perfmon|0|none"
    "adopt-without-perfmon|ok|bpf,net_admin|0|none"
    "non-root-adopts-root-pins|ok|bpf,net_admin,perfmon|$SPARE_UID|none"
    "no-perfmon|refused|bpf,net_admin|0|none"
    "no-bpf|refused|net_admin,perfmon|0|none"
    "no-net_admin|refused|bpf,perfmon|0|none"
    "none|refused||0|none"
    "sys_admin-fallback|ok|sys_admin,net_admin|0|none"
    "sys_admin-only|refused|sys_admin|0|none"
    "memlock-0|ok|bpf,net_admin,perfmon|0|memlock0"
    "container-like|ok|bpf,net_admin,perfmon|0|container"
    "read-only-without-tmp|refused|bpf,net_admin,perfmon|0|ro-notmp"
    "non-root-ambient|ok|bpf,net_admin,perfmon|$SPARE_UID|none"
)

run_wrapped() { # wrapper state_dir -- command...
    local wrapper=$1 state=$2
    shift 3
    case $wrapper in
        none) exec "$@" ;;
        memlock0) exec prlimit --memlock=0:0 -- "$@" ;;
        container | ro-notmp)
            local tmp_line="mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp"
            [[ $wrapper == ro-notmp ]] && tmp_line=":"
            # shellcheck disable=SC2016  # expanded by the inner shell
            exec unshare --mount --propagation private -- sh -euc '
                state=$1; tmpcmd=$2; shift 2
                mount --bind "$state" "$state"
                mount --bind /sys/fs/bpf /sys/fs/bpf
                mount --bind /dev/null /proc/kallsyms
                mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
                mount -o remount,bind,ro /sys
                mount -o remount,bind,ro /
                $tmpcmd
                exec "$@"' sh "$state" "$tmp_line" "$@"
            ;;
        *) die "unknown wrapper $wrapper" ;;
    esac
}

free_port() {
    "$(dirname "$XDPFW")/python" -c \
        'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_health() { # port pid -> 0 when /healthz says 200, 1 when the process died or timed out
    local port=$1 pid=$2 i code
    for ((i = 0; i < 600; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz" || true)
        [[ $code == 200 ]] && return 0
        sleep 0.1
    done
    return 1
}

REASONS='prohibited|could not open bpf map|Need super-user|No usable temporary|xdp_attach failed'
results=()
failures=0
n=0
for spec in "${CASES[@]}"; do
    IFS='|' read -r name expect caps uid wrapper <<<"$spec"
    if (($#)) && [[ " $* " != *" $name "* ]]; then
        continue
    fi
    n=$((n + 1))
    port=$(free_port)
    state=$WORK/$name/state
    # The first case leaves its program attached and pinned, as a stopped service does; the
    # next three have to adopt them (no new load, so no verifier run) with their reduced sets,
    # the last one as another user after a `chown -R` (what xdpfw.service's ExecStartPre does).
    pin_dir=$PINS_BASE-$name
    case $name in
        bpf+net_admin+perfmon | restart-adopts-pins | adopt-without-perfmon | \
            non-root-adopts-root-pins) pin_dir=$PINS_BASE-first ;;
    esac
    mkdir -p "$state" "$WORK/$name/home"
    chmod 0700 "$state"
    setcaps="-all"
    [[ -n $caps ]] && setcaps="-all,+${caps//,/,+}"
    idargs=(--reuid=0 --regid=0 --clear-groups)
    if [[ $uid != 0 ]]; then
        # What systemd does with User= + AmbientCapabilities=: the state and pin directories
        # are created for the service user beforehand (StateDirectory=, ExecStartPre=+).
        chown -R "$uid:$uid" "$WORK/$name"
        mkdir -p "$pin_dir"
        chown -R "$uid:$uid" "$pin_dir"
        chmod 0700 "$pin_dir"
        idargs=(--reuid="$uid" --regid="$uid" --clear-groups)
    fi
    logf=$WORK/$name.log
    (
        cd /
        run_wrapped "$wrapper" "$state" -- env HOME="$WORK/$name/home" \
            setpriv "${idargs[@]}" --inh-caps="$setcaps" --ambient-caps="$setcaps" \
            --bounding-set="$setcaps" -- \
            "$XDPFW" serve --no-demo --iface "$HOST_IF" --listen "127.0.0.1:$port" \
            --state-dir "$state" --bpffs-dir "$pin_dir" \
            --max-rules 8192 --max-prefixes 4096 --max-sets 512
    ) >"$logf" 2>&1 &
    SERVER_PID=$!
    outcome=refused
    detail=""
    if wait_health "$port" "$SERVER_PID"; then
        capeff=$(awk '/^CapEff/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null || echo '?')
        srv_uid=$(awk '/^Uid/ {print $3}' "/proc/$SERVER_PID/status" 2>/dev/null || echo '?')
        token=$(cat "$state/token")
        rule=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" \
            -H 'content-type: application/json' -d "{\"src\": \"198.18.0.$n\"}" \
            "http://127.0.0.1:$port/v1/rules" || true)
        kill -TERM "$SERVER_PID"
        rc=0
        wait "$SERVER_PID" || rc=$?
        detail="uid $srv_uid CapEff $capeff; POST /v1/rules -> $rule; exit $rc after SIGTERM"
        [[ $rule == 201 && $rc == 0 ]] && outcome=ok
        if [[ $pin_dir == "$PINS_BASE-first" && $name != bpf+net_admin+perfmon ]]; then
            grep -q 'adopted program id' "$logf" || outcome="not-adopted"
        fi
    else
        rc=0
        wait "$SERVER_PID" || rc=$?
        # The most telling line: the verifier's or the kernel's reason, else xdpfw's message.
        why=$(grep -m1 -E "$REASONS" "$logf" || grep -m1 -E 'xdpfw serve:' "$logf" || true)
        detail="exit $rc: ${why:0:160}"
    fi
    SERVER_PID=""
    if [[ $pin_dir != "$PINS_BASE-first" || $name == non-root-adopts-root-pins ]]; then
        ip link set dev "$HOST_IF" xdp off 2>/dev/null || true
        ip link set dev "$HOST_IF" xdpgeneric off 2>/dev/null || true
        rm -rf "$pin_dir"
    fi
    if [[ $outcome == "$expect" ]]; then
        verdict=PASS
        if [[ ${VERBOSE:-0} == 1 ]]; then
            grep -v -E '^; |^[0-9]+: ' "$logf" | sed 's/^/    | /' | tail -n 12
        fi
    else
        verdict=FAIL
        failures=$((failures + 1))
        sed 's/^/    | /' "$logf" | tail -n 25
    fi
    line=$(printf '%-4s %-22s caps=%-20s uid=%-6s wrap=%-9s expected=%-7s got=%-7s %s' \
        "$verdict" "$name" "${caps:-none}" "$uid" "$wrapper" "$expect" "$outcome" "$detail")
    log "$line"
    results+=("$line")
done
log "summary: $n case(s), $failures unexpected (kernel $(uname -r)," \
    "unprivileged_bpf_disabled=$(cat /proc/sys/kernel/unprivileged_bpf_disabled))"
exit $((failures > 0))
