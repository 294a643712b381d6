#!/usr/bin/env bash
# Put the venv's `xdpfw` on PATH: make LINK a symlink to TARGET (scripts/setup.sh calls this as
# root with /usr/local/bin/xdpfw). Idempotent, and it never replaces a file it did not make:
#   - no LINK: create it;
#   - LINK already points to TARGET: nothing to do;
#   - LINK is a dangling link to some `.venv/bin/xdpfw` (a checkout removed since): re-point it;
#   - anything else (a file, a link elsewhere, another checkout's live venv): warn, leave it,
#     exit 0 (the set-up still worked; TARGET is the command to type).
set -euo pipefail

(($# == 2)) || { echo "usage: $0 TARGET LINK" >&2; exit 2; }
target=$1
link=$2

log() { echo "setup: $*"; }

make_link() {
    local tmp
    tmp="$(dirname "$link")/.xdpfw-link.$$"
    ln -sfn "$target" "$tmp"
    mv -fT "$tmp" "$link"
}

if [[ -L "$link" ]]; then
    current=$(readlink "$link")
    if [[ "$current" == "$target" ]]; then
        log "$link -> $target present"
    elif [[ ! -e "$link" && "$current" == */.venv/bin/xdpfw ]]; then
        make_link
        log "$link -> $target (it pointed to $current, which no longer exists)"
    else
        log "WARNING: $link already exists and points to $current; not replaced." \
            "Use $target, or remove $link and run the set-up again"
    fi
elif [[ -e "$link" ]]; then
    log "WARNING: $link already exists and is not a link made by xdpfw's set-up; not replaced." \
        "Use $target, or remove $link and run the set-up again"
else
    [[ -d "$(dirname "$link")" ]] || mkdir -p "$(dirname "$link")"
    make_link
    log "$link -> $target (xdpfw is on PATH)"
fi
