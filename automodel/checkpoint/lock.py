"""One run per output directory: rank 0 holds an exclusive lock on <output_dir>/.lock for the run's life.

The lock is an `fcntl.flock` on the file, which the kernel releases when the process ends, however it ends: a lock
left by a dead process never blocks the next run. The file names the holder (host, pid, start time) so that a second
run can say who it is waiting for.
"""

import datetime
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from automodel.config import ConfigError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock, or raises ConfigError naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, or give "
                              "this run another output_dir") from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
