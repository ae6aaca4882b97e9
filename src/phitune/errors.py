"""The one exception type meant for users, and the one way a failed write (a full disk) becomes one."""

import errno
import re


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type), for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# How a failed write shows itself: an OSError from Python's own files; an error of a Rust library quoting the OS
# error (safetensors' SafetensorError "I/O error: No space left on device (os error 28)", tokenizers' plain Exception
# "No space left on device (os error 28)"); and a RuntimeError from torch.save's zip writer, which on a full disk says
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" and nothing of ENOSPC.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES}
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
TORCH_WRITER = ("inline_container", "PytorchStreamWriter")
NEARLY_FULL_BYTES = 1 << 20  # below this much free space a failed save is taken to be a full disk


def is_write_failure(exc: BaseException) -> bool:
    """True for the exceptions a failed write raises (a full disk, a quota, a read-only or failing disk)."""
    return _errno(exc) in WRITE_ERRNOS or (
        isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in TORCH_WRITER))


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    found = RUST_OS_ERROR.search(str(exc))
    return int(found.group(1)) if found else None


def write_error(exc: BaseException, where) -> PhituneError:
    """A failed write as one line a user can act on: the file and the reason ("No space left on device").

    `where` is the file written, or the folder a save was filling. torch.save's error names no file, but its file
    exists, cut short, and is the one written last in the folder; safetensors' names none and may leave none, so
    the folder is named."""
    import os
    from pathlib import Path

    where = Path(getattr(exc, "filename", None) or where)
    if where.is_dir() and isinstance(exc, RuntimeError):
        files = [path for path in where.rglob("*") if path.is_file()]
        where = max(files, key=lambda path: path.stat().st_mtime_ns) if files else where
    if _errno(exc):
        reason = os.strerror(_errno(exc))
    elif _free_bytes(where) < NEARLY_FULL_BYTES:
        reason = "No space left on device"
    else:
        reason = first_line(exc)
    return PhituneError(f"could not write {where}: {reason}")


def _free_bytes(path) -> int:
    import shutil

    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 1 << 62
