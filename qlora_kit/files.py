"""Writing files so that nothing is lost or silently wrong, the way git and rsync write theirs.

Every output is written under a name nobody else uses (a private staging folder or an O_EXCL temporary file beside
it) and renamed into place: the real name holds the whole old content or the whole new, never part of either. A
link planted where an output goes is replaced by the rename, never followed; a lock file that is a link is refused.
One writer per output at a time: the second is refused with who holds it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from qlora_kit.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers there are not refused
    fcntl = None

# What a full disk, a quota or a folder one may not write raises: the user's to fix, so one sentence, not a traceback.
WRITE_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.ENOENT,
    errno.EISDIR,
}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_mode(mode: int = 0o666) -> int:
    """The permissions a file (0o666) or folder (0o777) gets under this process's umask, as `open` would give it."""
    return mode & ~current_umask()


def staging_folder(beside: Path) -> Path:
    """A new private folder (0700, a name nobody else has) beside `beside`, to write its replacement in."""
    return Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".partial", dir=beside.parent))


def check_can_replace(out: Path, overwrite: bool, flag: str = "--out") -> None:
    """Before any work: `out` must be a file name in a folder (not a folder, not under a file), and an existing
    file there is replaced only when overwrite says so."""
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"{flag} {out} is a folder; this writes one file.", hint=f"Name the file, e.g. {flag} {out / 'NAME'}."
        )
    check_not_under_a_file(out, hint=f"Choose another {flag}.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UserError(f"{out} already exists.", hint=f"Pass --overwrite to replace it, or choose another {flag}.")


def check_not_under_a_file(out: Path, hint: str) -> None:
    """The nearest existing folder above out must be a folder, not a file (or a link to one, or a dangling link)."""
    parent = next((p for p in Path(out).parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"Cannot write {out}: {parent} is a file, not a folder.", hint=hint)


@contextlib.contextmanager
def staged_file(
    out: Path, hint: str = "Nothing was left there. Free some space (or choose another --out) and try again."
):
    """A path to write out's new content to, in a private staging folder beside it; when the block ends without error
    it is renamed over out (a link there is replaced, not followed), else removed, so out is whole or as it was. A full
    disk or a folder it may not write is one sentence with `hint`."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(out)
    except OSError as error:
        raise _write_error(out, error, hint) from None
    try:
        yield staging / out.name
        written = staging / out.name
        if written.is_symlink() or not written.is_file():
            raise RuntimeError(f"nothing was written to {written}")  # a bug in the caller, not the user's doing
        written.chmod(shared_mode())  # as a plain open() under the umask would make it, not the folder's 0700
        os.replace(written, out)
    except OSError as error:
        raise _write_error(out, error, hint) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_error(out: Path, error: OSError, hint: str) -> BaseException:
    if error.errno not in WRITE_ERRORS:
        return error
    return UserError(f"Could not write {out}: {error.strerror}.", hint=hint)


@contextlib.contextmanager
def staged_folder(final: Path):
    """An empty folder beside `final` to write into; when the block ends without error it replaces `final` in one
    rename, so `final` is always whole (new or old) or absent. On any error, a second Ctrl-C included, it is removed.
    What is written in it gets the umask's permissions (libraries write some files private)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(final)
    try:
        yield staging
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                path.chmod(shared_mode(0o777 if path.is_dir() else 0o666))
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def free_space(path: Path) -> tuple[Path, int]:
    """The bytes free on the disk that path is (or would be made) on, and the nearest existing folder that says so."""
    existing = next(p for p in (Path(path), *Path(path).absolute().parents) if p.exists())
    return existing, shutil.disk_usage(existing).free


def write_atomically(path: Path, content: str | bytes) -> None:
    """Replace a file's content so that a kill leaves the old content or the new, never a mix or nothing; the new
    content goes to a temporary file made with O_EXCL (never a link), flushed to disk, then renamed."""
    path = Path(path)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, shared_mode())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def open_for_appending(path: Path):
    """path opened to append text to (made if absent), never through a link; a folder it may not write, or a link
    there, is one sentence."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; qlora-kit does not follow links it did not make.",
                hint="Pass the file itself, or another name.",
            ) from None
        raise _write_error(path, error, "Choose another file, or fix the folder's permissions or free space.") from None
    return os.fdopen(fd, "a", encoding="utf-8")


class Busy(Exception):
    """Another process holds the lock; its text says who (pid, host, since), as it wrote it."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(lock_file: Path) -> int | None:
    """Hold lock_file for this process (its fd), or raise Busy. The lock is the kernel's (flock), so a killed process
    never leaves one behind; the file only says who held it last. A link in its place is refused, not followed."""
    if fcntl is None:
        return None
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(
                    f"{lock_file} is a symbolic link; qlora-kit does not follow links it did not make.",
                    hint="Remove the link, then run the command again.",
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise Busy(describe_holder(holder)) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:  # else the holder removed the file as we opened it: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    return fd


def release_lock(lock_file: Path, fd: int | None) -> None:
    """Let other processes take lock_file again (the file is removed first: whoever opens it next makes a new one)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the folder may be gone: the lock goes with the fd
        Path(lock_file).unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def only_writer(out: Path, what: str = "writing"):
    """While the block runs, this process is the only qlora-kit process writing `out`; a second is refused at once."""
    out = Path(out)
    lock_file = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = hold_lock(lock_file)
    except Busy as busy:
        raise UserError(
            f"Another qlora-kit process is {what} {out} ({busy.holder}).",
            hint="Wait for it to finish; two writers of one file would mix their output.",
        ) from None
    except OSError as error:
        raise _write_error(out, error, "Choose another --out, or fix the folder's permissions or free space.") from None
    try:
        yield
    finally:
        release_lock(lock_file, fd)


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "it has not said which yet"
