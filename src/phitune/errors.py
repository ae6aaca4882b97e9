"""The one exception type meant for users, and the one way a failed write (a full disk) becomes one."""

import errno


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type), for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# How a failed write shows itself: an OSError from Python's own files, safetensors' SafetensorError ("I/O error: No
# space left on device"), and a RuntimeError from torch.save's zip writer, which on a full disk says "[enforce fail
# at inline_container.cc:672] . unexpected pos 576 vs 534" and nothing of ENOSPC.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES}
TORCH_WRITER = ("inline_container", "PytorchStreamWriter")
NEARLY_FULL_BYTES = 1 << 20  # below this much free space a failed save is taken to be a full disk


def is_write_failure(exc: BaseException) -> bool:
    """True for the exceptions a failed write raises (a full disk, a quota, a read-only or failing disk)."""
    if isinstance(exc, OSError):
        return exc.errno in WRITE_ERRNOS
    if type(exc).__name__ == "SafetensorError":
        return "I/O error" in str(exc)
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in TORCH_WRITER)


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
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno)
    elif "No space left on device" in str(exc) or _free_bytes(where) < NEARLY_FULL_BYTES:
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
