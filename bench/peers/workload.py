"""The group-chat workload of BENCHMARKS.md, shared by the peer frameworks' versions.

N agents in a round-robin ring, one session of M messages (the task included, so
M - 1 model calls), an instant mock model that returns a fixed reply, every
agent seeing the whole history. An untimed warm-up session of 200 messages runs first
in the same process; memory is counted from before the warm-up to after the measured
session, with the team and its result still held, as `roundtable bench groupchat`
counts it (anonymous memory: heap and stacks).
"""

import argparse
import json
import sys
import time

# The reply and the task of Roundtable's own run (roundtable-bench: mock.rs, workloads.rs).
REPLY = "I agree with the previous point and add one more."
TASK = "Discuss the benchmark topic."


def rss_anon_kib():
    """The process's anonymous resident memory (KiB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def peak_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Calls:
    """The instants of the model calls of one session, in order."""

    def __init__(self):
        self.at = []

    def mark(self):
        self.at.append(time.perf_counter())


def mean_gap_us(at):
    gaps = [b - a for a, b in zip(at, at[1:])]
    return sum(gaps) / len(gaps) * 1e6 if gaps else 0.0


def main(framework, run_session):
    """Parse the common flags, run the warm-up and the measured session, print a JSON line.

    `run_session(peers, messages, calls)` runs one session to its end and returns
    (messages on the record, what must stay alive); it calls `calls.mark()` on every
    model call.
    """
    p = argparse.ArgumentParser(description=f"The group-chat workload on {framework}.")
    p.add_argument("--peers", type=int, default=16)
    p.add_argument("--messages", type=int, default=1000, help="messages, the task included")
    p.add_argument("--warmup", type=int, default=200, help="messages of an untimed session first (0: none)")
    a = p.parse_args()
    if a.peers < 2 or a.messages < 202:
        sys.exit("--peers must be at least 2 and --messages at least 202 (first and last 100 gaps)")
    before = rss_anon_kib()
    if a.warmup:
        run_session(a.peers, a.warmup, Calls())
    calls = Calls()
    start = time.perf_counter()
    n, keep = run_session(a.peers, a.messages, calls)
    wall = time.perf_counter() - start
    added = rss_anon_kib() - before
    if n != a.messages or len(calls.at) != a.messages - 1:
        sys.exit(f"{framework}: {n} messages and {len(calls.at)} model calls, expected {a.messages} and {a.messages - 1}")
    first = mean_gap_us(calls.at[:101])
    last = mean_gap_us(calls.at[-101:])
    print(json.dumps({
        "framework": framework,
        "peers": a.peers,
        "messages": a.messages,
        "msgs_per_s": a.messages / wall,
        "us_first_100": first,
        "us_last_100": last,
        "last_over_first": last / first,
        "added_mib": added / 1024,
        "peak_mib": peak_kib() / 1024,
    }))
    del keep
