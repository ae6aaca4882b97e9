"""The one exception type meant for users, and the one way a failed write (a full disk) becomes one."""

import errno
import os
import re
import shlex
from contextlib import contextmanager
from pathlib import Path


class PhituneError(Exception):
    """A problem the user can act on. The CLI prints its message on one line and exits with code 2."""


class WriteFailed(PhituneError):
    """A failed write (a full disk) said in one line; `reason` keeps the OS's words for a caller that names the file
    the user asked for instead of a scratch file it was writing on the way."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type), for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def pip_install(extra: str) -> str:
    """The pip line that adds phitune's `extra` to this installation, for a one-line error to quote.

    phitune running from a checkout (an editable install, or its src on PYTHONPATH): the README's form, `-e` with the
    checkout's absolute path (so it works from any folder) and its constraints file; else PyPI's form."""
    root = Path(__file__).resolve().parents[2]
    if root / "src" / "phitune" / "errors.py" != Path(__file__).resolve() or not (root / "pyproject.toml").is_file():
        return f"pip install {shlex.quote(f'phitune[{extra}]')}"
    constraints = root / "requirements" / "ci-constraints.txt"
    pinned = f"-c {shlex.quote(str(constraints))} " if constraints.is_file() else ""
    return f"pip install {pinned}-e {shlex.quote(f'{root}[{extra}]')}"


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


def write_error(exc: BaseException, where) -> WriteFailed:
    """A failed write as one line a user can act on: the file and the reason ("No space left on device").

    `where` is the file written, or the folder a save was filling. torch.save's error names no file, but its file
    exists, cut short, and is the one written last in the folder; safetensors' names none and may leave none, so
    the folder is named."""
    where = Path(getattr(exc, "filename", None) or where)
    if where.is_dir() and isinstance(exc, RuntimeError):
        files = [path for path in where.rglob("*") if path.is_file()]
        where = max(files, key=lambda path: path.stat().st_mtime_ns) if files else where
    reason = write_reason(exc, where)
    return WriteFailed(f"could not write {where}: {reason}", reason)


def write_reason(exc: BaseException, where=None) -> str:
    """Why a write failed, in the OS's words ("No space left on device")."""
    if _errno(exc):
        return os.strerror(_errno(exc))
    if where is not None and _free_bytes(Path(where)) < NEARLY_FULL_BYTES:
        return "No space left on device"
    return first_line(exc)


@contextmanager
def replacing(path):
    """Yield a temporary path beside `path` to write; once written, rename it over `path`. A reader never sees half
    a file, an earlier file survives a failed write whole, and a failed write (a full disk) leaves no temporary
    file and is one line naming `path`. The temporary name keeps the suffix, for writers that go by it
    (matplotlib)."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_write_failure(exc):
            reason = write_reason(exc, path.parent)
            raise WriteFailed(f"could not write {path}: {reason}", reason) from None
        raise


def _free_bytes(path: Path) -> int:
    import shutil

    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 1 << 62
