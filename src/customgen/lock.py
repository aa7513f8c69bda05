"""One run per output folder: `customgen train` and `customgen evaluate` hold a lock on their output folder for
the whole run, so two runs never interleave logs, resume each other's checkpoints or replace each other's files.

The lock is `fcntl.flock` on OUT/.customgen.lock, a file that names its holder (pid, host, command, start time).
The kernel drops a flock when its process ends, even by SIGKILL or a lost Kaggle session, so a lock file that
nobody holds is stale by definition and the next run takes it over with a note. Where the file system has no
flock (some network mounts) a pid check stands in: a holder on this host that no longer runs is stale; a holder
on another host is trusted until its lock file is deleted by hand.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path

from customgen.errors import Notice, UserError

LOCK_NAME = ".customgen.lock"


def main_process() -> bool:
    """Whether this process takes output locks: rank 0 under `accelerate launch`/torchrun, or a plain run."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextlib.contextmanager
def output_lock(folder: str | Path, *, command: str):
    """Hold `folder`'s lock (creating the folder) for the `with` body; a second run gets one line (UserError)."""
    if not main_process():  # the other ranks of a multi-process run work under rank 0's lock
        yield None
        return
    folder = Path(folder)
    fd, holder, held = _lock(folder)
    try:
        if not held:
            raise UserError(f"{folder} is in use by another customgen {holder.get('command', 'run')} (pid "
                            f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                            f"{holder.get('started', '?')}); wait for it to end or choose another output folder")
        if holder:
            warnings.warn(f"{folder}: a {holder.get('command', 'run')} run (pid {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}) ended without releasing its lock; taking it over",
                          Notice, stacklevel=3)
        _write(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield folder / LOCK_NAME
    finally:
        _release(folder / LOCK_NAME, fd, held)


def _lock(folder: Path, tries: int = 5) -> tuple[int, dict, bool]:
    """(fd, holder named in the file, whether we hold it). A lock file removed by the run that just ended is not
    ours even if flock succeeds on it: retry on the fresh file."""
    for _ in range(tries):
        fd = _open_lock(folder)
        holder = _read(fd)
        held = _acquire(fd, holder)
        try:
            current = os.stat(folder / LOCK_NAME)
        except FileNotFoundError:
            current = None
        same = current is not None and (current.st_ino, current.st_dev) == os.fstat(fd)[1:3]
        if same or not held:
            return fd, holder, held
        os.close(fd)
    raise UserError(f"cannot lock output folder {folder}: its lock file keeps changing; is another run starting?")


def _open_lock(folder: Path) -> int:
    """Create the folder and open its lock file; one line when the folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror or err}); "
                        "choose a folder you can write to") from None


def _acquire(fd: int, holder: dict) -> bool:
    """flock without waiting; without flock support, a pid check (same host only)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
    if not holder or holder.get("pid") == os.getpid():
        return True
    return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0


def _read(fd: int) -> dict:
    """The holder a lock file names ({} for a new or unreadable one)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _release(path: Path, fd: int, held: bool) -> None:
    """Remove the lock file while still holding it, then let go (the next run creates a fresh one); a refused run
    only closes its descriptor."""
    try:
        if held:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
