"""Run a test command so that a hang, a killed worker or runaway memory fails it within minutes, and report its
time and peak memory (the sum of its processes' proportional set sizes, sampled every second).

    python scripts/guard.py --label "main suite" --limit-gib 20 --idle 900 --wall 2400 -- python -m pytest ...

- memory: the command's process group together above --limit-gib is stopped (an OOM kill of one pytest-xdist
  worker can leave the controller waiting forever: pytest-xdist 3.8 with --dist loadfile was seen to hang);
- a crashed worker (xdist prints "node down" / "crashed"): the run gets --grace seconds to finish, then stops;
- no output for --idle seconds (longer than pytest-timeout's per-test limit): stopped;
- --wall seconds in all: stopped;
- processes the command leaves behind when it ends are ended with it (they would hold the output pipe open).
Exit status: the command's own, or 1 with one `error:` line saying which limit stopped it.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CRASH_MARKS = (b"node down", b"crashed")


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split between their users), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return 0


def group_pss(pgid: int) -> int:
    """Total PSS of the processes in process group `pgid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    total += pss_bytes(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return total


class Guard:
    def __init__(self, args, proc: subprocess.Popen):
        self.args, self.proc = args, proc
        self.start = self.last_output = time.monotonic()
        self.crash_at: float | None = None
        self.peak, self.reason = 0, ""

    def stop(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
            os.killpg(self.proc.pid, signal.SIGKILL)

    def watch(self) -> None:
        """Sample memory and check the limits until the command ends."""
        a = self.args
        while self.proc.poll() is None:
            self.peak = max(self.peak, group_pss(self.proc.pid))
            now = time.monotonic()
            if self.peak > a.limit_gib * 2**30:
                self.stop(f"it used {self.peak / 2**30:.1f} GiB, above the {a.limit_gib:g} GiB limit")
            elif now - self.last_output > a.idle:
                self.stop(f"it printed nothing for {a.idle} s (a hung test or a lost worker)")
            elif self.crash_at is not None and now - self.crash_at > a.grace:
                self.stop(f"a test worker crashed and the run did not end within {a.grace} s")
            elif now - self.start > a.wall:
                self.stop(f"it ran past its {a.wall} s limit")
            time.sleep(1.0)
        try:  # the command ended: what it left behind (an orphaned worker holding the output pipe open) ends too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def pump(self) -> None:
        """Copy the command's output through, noting when it last spoke and whether a worker crashed."""
        tail = b""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            self.last_output = time.monotonic()
            tail = (tail + chunk)[-4096:]
            if self.crash_at is None and any(m in tail for m in CRASH_MARKS):
                self.crash_at = time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--limit-gib", type=float, default=20.0)
    p.add_argument("--idle", type=int, default=900)
    p.add_argument("--grace", type=int, default=120)
    p.add_argument("--wall", type=int, default=3600)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    guard = Guard(args, proc)
    watcher = threading.Thread(target=guard.watch, daemon=True)
    watcher.start()
    guard.pump()
    rc = proc.wait()
    watcher.join(timeout=5)
    seconds = time.monotonic() - guard.start
    print(f"\n{args.label}: {seconds:.0f} s, peak memory {guard.peak / 2**30:.1f} GiB (all its processes, PSS)", flush=True)
    if guard.reason:
        print(f"error: {args.label} stopped: {guard.reason}", file=sys.stderr, flush=True)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
