"""The one exception type meant for users, and the one way a failed write (a full disk) becomes one."""


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type), for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# The exceptions a failed write raises: OSError from Python's own files, RuntimeError from torch.save's zip writer
# (on a full disk it says "unexpected pos 576 vs 534", not ENOSPC), safetensors' SafetensorError.
WRITE_FAILURES = (OSError, RuntimeError)
NEARLY_FULL_BYTES = 1 << 20  # below this much free space a failed save is taken to be a full disk


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, WRITE_FAILURES) or type(exc).__name__ == "SafetensorError"


def write_error(exc: BaseException, where) -> PhituneError:
    """A failed write as one line a user can act on: the file and the reason ("No space left on device").

    `where` is the file written, or the folder a save was filling: the file named is then the one written last
    there, which is where a full disk stops a save."""
    import os
    from pathlib import Path

    where = Path(getattr(exc, "filename", None) or where)
    if where.is_dir():
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
