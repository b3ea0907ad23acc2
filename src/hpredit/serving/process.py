"""A server's process tree, ended as a whole: run a command in a process group of its own and
make sure no process of the group outlives it (pure Python, POSIX).

vLLM's server starts an engine process and worker processes; a signal that reaches it during its
start-up can be lost, and a process it started can outlive it. :func:`run_group` passes SIGINT,
SIGTERM and SIGHUP on to the command, waits for it (``grace`` seconds at most once signalled), and
then ends whatever is left of its group: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["group_members", "run_group", "end_group"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(BaseException):
    """A signal to this process while it supervises the group."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid`` (Linux: /proc; elsewhere: the group
    leader's id while the group is signalable)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    found = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def end_group(pgid: int, wait: float = 5.0) -> None:
    """End every process of group ``pgid``: SIGTERM, then SIGKILL for what is left after ``wait`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_members(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_members(pgid):
            time.sleep(0.05)


def run_group(cmd: Sequence[str], grace: float = 30.0) -> int:
    """Run ``cmd`` in a new process group and return its exit status (``128 + signal`` when this
    process was signalled). A SIGINT, SIGTERM or SIGHUP to this process goes on to ``cmd``; once
    ``cmd`` has ended, or ``grace`` seconds after the signal, every process left in its group is ended."""
    child = subprocess.Popen(list(cmd), start_new_session=True)

    def stop(signum, frame):
        raise _Stop(signum)

    old = {}
    for sig in _SIGNALS:
        try:
            old[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: the caller handles signals
            pass
    try:
        try:
            return child.wait()
        except _Stop as s:
            try:
                child.send_signal(s.signum)
                child.wait(grace)
            except (subprocess.TimeoutExpired, _Stop):
                pass
            return 128 + s.signum
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        end_group(child.pid)
        if child.poll() is None:
            child.wait()
