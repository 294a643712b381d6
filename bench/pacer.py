"""A paced frame sender for the rate-limit benchmark (bench/floods.py), run in the tx namespace.

    ip netns exec <tx> python -m bench.pacer --dev IF --rate PPS --seconds S [--cpu N] HEX...

Why not trafgen: its `--rate` shaper sends a whole second's worth of frames at full speed and
then sleeps out the rest of the second, so a per-source token bucket with a burst of 100 sees
clumps of thousands of frames and passes little more than its burst per second (measured:
2,000 pps into a 10,000 pps / burst 100 limit passed ~150 pps); its `--gap` sleeps once per
frame, and with the 50 us timer slack a sleep outlasts the 10 us a frame may take at 100k pps
(not measured). This sender keeps the average rate
exact and the clumps short: it sends whatever is due by the monotonic clock (frames x rate x
elapsed), then sleeps until the next frame is due, so frames leave in runs of a few (the
timer slack). After a stall (other work on this shared machine can take its CPU for tens of
ms) it catches up only on what is at most `--max-lag-ms` overdue; older frames are skipped and
counted, since a
longer catch-up burst would push a source under its limit over it for a moment (the default,
10 ms, is half the time the bench's second source takes to send its limit's burst).

The frames (hex, Ethernet onwards) are sent in turn, cycling; a frame given k times in a row
is k/len of the traffic. The socket is AF_PACKET with PACKET_QDISC_BYPASS, so a sender pinned
to CPU n transmits on queue n % queues (the kernel's packet_pick_tx_queue). At the end it
prints one JSON line: frames sent, errors (ENOBUFS and the like), the seconds it ran (and
at the start one with its pid, whose CPU time the bench reads).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

__all__ = ["main"]

SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pacer", description=__doc__.split("\n")[0])
    p.add_argument("--dev", required=True)
    p.add_argument("--rate", type=float, required=True, help="frames per second")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--cpu", type=int, help="pin to this CPU")
    p.add_argument("--max-lag-ms", type=float, default=10.0,
                   help="frames more overdue than this are skipped, not sent late")
    p.add_argument("frames", nargs="+", help="frames as hex, sent in turn")
    args = p.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print(json.dumps({"pid": os.getpid()}), flush=True)  # the bench reads its CPU time
    frames = [bytes.fromhex(f) for f in args.frames]
    n_frames = len(frames)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    s.bind((args.dev, 0))
    send = s.send
    interval_ns = 1e9 / args.rate
    dur_ns = int(args.seconds * 1e9)
    max_lag = max(1, int(args.max_lag_ms * 1e6 / interval_ns))  # in frames
    sent = errors = slot = skipped = stalls = 0  # slot: frames due so far, sent or skipped
    t0 = time.monotonic_ns()
    while True:
        el = time.monotonic_ns() - t0
        if el >= dur_ns:
            break
        due = int(el / interval_ns) + 1 - slot
        if due <= 0:
            time.sleep(((slot + 1) * interval_ns - el) / 1e9)
            continue
        if due > max_lag:  # stalled: skip what is overdue
            skipped += due - 1
            slot += due - 1
            stalls += 1
            due = 1
        for _ in range(due):
            try:
                send(frames[sent % n_frames])
            except OSError:
                errors += 1
            sent += 1
            slot += 1
    print(json.dumps({"sent": sent, "errors": errors, "skipped": skipped, "stalls": stalls,
                      "seconds": (time.monotonic_ns() - t0) / 1e9}), flush=True)
    s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
