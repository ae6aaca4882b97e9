"""One run per output directory: an exclusive lock that `phitune train` holds while it writes there.

The lock is `phitune.lock` in the output directory, held with `flock`, which the kernel lets go when the holder dies
however it dies (kill -9, out of memory), so a lock left by a dead run is never mistaken for a live one. The file
says who holds it (host, pid, start time, command) so that a second run refused at the door can name the first.
Under torchrun only the global main process (RANK 0) takes it: all ranks of one job are one holder, and a restarted
job (torchrun's elastic restarts) takes it over from its dead predecessor with a warning. The other ranks wait for
rank 0's answer before they read the directory (`phitune.run.processes.job_lock`): refused, every rank
stops at once.

eval, chat, generate, merge, export and serve read a run directory's top-level adapter, which a run being trained
there (with --overwrite, or --resume of a finished run) is about to replace: they refuse with one line naming the
holder (`refuse_while_training`). The web page's Start asks the same question before it starts `phitune train`.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

from phitune.errors import PhituneError

log = logging.getLogger("phitune")

LOCK_FILE = "phitune.lock"


def is_main_process() -> bool:
    """The process that speaks for its torchrun job: global rank 0 (every rank of a job sees the same RANK set)."""
    return os.environ.get("RANK", "0") == "0"


class RunLock:
    """The exclusive lock on one output directory, taken by `acquire` and given back by `release` (or at exit)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders acquire made, deepest first

    def acquire(self) -> "RunLock":
        """Take the lock, or raise PhituneError naming the run that holds it. Makes the directory and its parents if
        needed (and `release` removes them again if nothing else was written)."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise PhituneError(f"training_config.output_dir {self.output_dir} is a file, not a directory")
        self._made = [folder for folder in (self.output_dir, *self.output_dir.parents) if not folder.exists()]
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                self._fd = self._try_lock()
        except OSError as exc:
            self._remove_dir_if_made()
            raise PhituneError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        return self

    def _try_lock(self) -> int | None:
        """The locked descriptor; None when the file was replaced between open and lock (try again)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            self._remove_dir_if_made()
            raise PhituneError(f"{self.output_dir} is being trained by another run ({holder}); wait for it to end, "
                               "or set training_config.output_dir to another directory") from None
        if not _same_file(fd, self.path):  # the previous holder removed the file as we opened it
            os.close(fd)
            return None
        previous = _read(fd)
        if previous:  # the lock was free yet its file names a holder: that run died without letting go
            log.warning("taking over the lock of a run that is gone (%s)", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        return fd

    def release(self) -> None:
        """Remove the lock file and let go (and remove the directory if this run made it and left it empty)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before letting go: a waiting run then finds the file replaced
        os.close(self._fd)
        self._fd = None
        self._remove_dir_if_made()

    def _remove_dir_if_made(self) -> None:
        """Remove the folders acquire made, deepest first, while empty: a run that stopped early leaves nothing."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:  # the run wrote something: keep it (and its parents)
                return

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def holder(output_dir: Path) -> str | None:
    """Who trains in `output_dir` now ("pid 12 on host a, started ...: phitune train x.yaml"), or None; reads only."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(_read(fd))
    finally:
        os.close(fd)
    return None


def refuse_while_training(run_dir: Path) -> None:
    """One line, for the commands that read a run directory, when a run is being trained there."""
    who = holder(run_dir)
    if who:
        raise PhituneError(f"{run_dir} is being trained now ({who}); wait for the run to finish, or use one of its "
                           "complete checkpoints with --adapter RUN/checkpoint-N")


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "job": os.environ.get("TORCHELASTIC_RUN_ID")}


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _describe(who: dict) -> str:
    if not who:
        return "a run that has not said who it is yet"
    return f"pid {who.get('pid')} on host {who.get('host')}, started {who.get('started')}: {who.get('command')}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False
