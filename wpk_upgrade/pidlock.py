"""One daemon per home: a pid file held with an exclusive ``flock`` for the process's life.

``PidLock(path, what, home).acquire()`` opens (creating it) the pid file, takes
``flock(LOCK_EX | LOCK_NB)`` on it and writes our pid. While the lock is held, another
process's ``acquire`` fails at once with ``WpkUpgradeError``: "another manager is already
running on HOME (pid N)". The kernel drops the lock when the process dies, however it dies:
a pid file left by a ``kill -9`` is taken over (and rewritten) by the next start, never
trusted for its content. ``release()`` removes the file while still holding the lock, then
closes it: a newcomer that opened the old file in between gets a lock on a file no longer
at ``path``, notices (the inode differs) and tries again on the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from .errors import WpkUpgradeError

_ATTEMPTS = 20
_PID_READS = 50  # times 20 ms


class PidLock:
    """The exclusive lock of ``path`` (a pid file), held until ``release()``."""

    def __init__(self, path: Path, what: str, home: Path) -> None:
        self.path = Path(path)
        self.what = what
        self.home = Path(home)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful ``acquire()`` and ``release()``."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid, or raise ``WpkUpgradeError`` (one line) when
        another process holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise WpkUpgradeError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_pid(fd)
                os.close(fd)
                raise WpkUpgradeError(
                    f"another {self.what} is already running on {self.home} "
                    f"(pid {holder or 'unknown'})"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise WpkUpgradeError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            if not _same_file(fd, self.path):  # released and removed under us: again
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:
                os.close(fd)
                raise WpkUpgradeError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
            self._fd = fd
            return
        raise WpkUpgradeError(f"cannot lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Remove the pid file, then drop the lock. Does nothing when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the open file ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder_pid(fd: int) -> int | None:
    """The pid the holder wrote in the file (it writes it right after taking the lock, so
    an empty file is read again for a moment); None when it never shows."""
    for _ in range(_PID_READS):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.02)
    return None
