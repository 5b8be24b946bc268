"""Write a directory beside its destination under a hidden staging name, then
swap it in, so readers find the old directory or the new one, never half of one,
and a failed or interrupted write leaves the old one as it was.

Staging names carry the writer's host and PID
(`.NAME.staging-HOST-PID-RANDOM`), because SIGKILL runs no cleanup: the next
write to the same destination removes what a dead writer left, and never the
directory of a writer that is still running.

A run that must own its destination from its first check to its swap (convert,
save_model) holds it with `claimed`: a lock file beside it, `.NAME-lock`, that a
second writer is refused on. The lock is the kernel's (flock), so it dies with
its process, SIGKILL included: a lock file a dead writer left is simply reused.
It holds the holder's PID and host, for the refusal to name.
"""

import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())  # no "-", so names split unambiguously


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swappable(destination: Union[str, Path]) -> Path:
    """`destination` made absolute (so `.` has a name to stage beside). The
    working directory and those above it are refused: swapping one out would
    leave this process, and the shell it runs in, in a deleted directory."""
    destination = Path(os.path.abspath(destination))
    cwd = Path.cwd().resolve()
    if destination.resolve() in (cwd, *cwd.parents):
        raise ValueError(
            f"{destination} is the current directory or holds it, so it cannot be swapped for a new one; "
            "run from elsewhere or choose another path"
        )
    return destination


def remove_stale(destination: Path) -> None:
    """Remove the staging directories that dead writers left for `destination`.
    A writer killed between its two renames left the old output aside (`.old`)
    and none in place: that one is put back."""
    pattern = re.compile(
        rf"\.{re.escape(destination.name)}\.staging-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[^.]+(?P<old>\.old)?"
    )
    if not destination.parent.is_dir():
        return
    for entry in sorted(destination.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if match["old"] and not os.path.lexists(destination):
            os.replace(entry, destination)
        else:
            _remove(entry)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _lock(lock: Path, destination: Path) -> int:
    """An open descriptor of `lock`, flock-ed; BlockingIOError naming the holder if
    another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)  # never write through a planted link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, lock):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
                return fd
        except BlockingIOError:
            holder = " ".join(os.read(fd, 200).decode(errors="replace").split()) or "another process"
            os.close(fd)
            raise BlockingIOError(
                f"{destination} is being written by {holder} (lock file {lock}); wait for that run to end "
                "or choose another path"
            ) from None
        except OSError as e:  # flock's own errors name no file (ENOLCK: a file system without locks)
            os.close(fd)
            raise OSError(e.errno, f"cannot lock {lock}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it between our open and our lock: lock the one there now


@contextmanager
def claimed(destination: Union[str, Path]) -> Iterator[Path]:
    """Hold `destination` against other writers for the whole block (see the
    module's docstring); yields it made absolute. Its parent is created."""
    destination = _swappable(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    lock = destination.with_name(f".{destination.name}-lock")
    fd = _lock(lock, destination)
    try:
        yield destination
    finally:
        if _same_file(fd, lock):  # removed while still held, so no one locks a file on its way out
            lock.unlink()
        os.close(fd)


def _swap_in(staging: Path, destination: Path) -> None:
    """The final rename. Onto a non-empty directory or a file it fails in the
    kernel, atomically: such a destination is refused, never replaced."""
    try:
        os.replace(staging, destination)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise FileExistsError(
            f"{destination} was filled by something else during this run; it is left as it is, "
            "and this run's output is discarded"
        ) from None


@contextmanager
def staged(destination: Union[str, Path], replace: bool = True) -> Iterator[Path]:
    """Yield an empty hidden sibling of `destination` to write into. On success
    it replaces `destination` (an existing one is moved aside first and deleted
    only once the new one is in place); on any exception, KeyboardInterrupt and
    SystemExit included, it is removed. With `replace=False` it takes the place
    of nothing or of an empty directory only: anything else there at the end
    (written meanwhile by someone else) is kept and FileExistsError raised.
    Whether an existing destination may be replaced is the caller's decision."""
    destination = _swappable(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(destination)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.staging-{_HOST}-{os.getpid()}-", dir=destination.parent)
    )
    old = staging.with_name(staging.name + ".old")
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; an output gets the user's umask
        yield staging
        replacing = replace and os.path.lexists(destination)
        if replacing:
            os.replace(destination, old)
        try:
            _swap_in(staging, destination)
        except BaseException:
            if replacing:
                os.replace(old, destination)
            raise
    except BaseException:
        _remove(staging)
        raise
    if replacing:
        _remove(old)
