"""Write a directory beside its destination under a hidden staging name, then
swap it in, so readers find the old directory or the new one, never half of one,
and a failed or interrupted write leaves the old one as it was.

Staging names carry the writer's host and PID
(`.NAME.staging-HOST-PID-RANDOM`), because SIGKILL runs no cleanup: the next
write to the same destination removes what a dead writer left, and never the
directory of a writer that is still running.
"""

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


@contextmanager
def staged(destination: Union[str, Path]) -> Iterator[Path]:
    """Yield an empty hidden sibling of `destination` to write into. On success
    it replaces `destination` (an existing one is moved aside first and deleted
    only once the new one is in place); on any exception, KeyboardInterrupt and
    SystemExit included, it is removed. Whether an existing destination may be
    replaced is the caller's decision."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(destination)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{destination.name}.staging-{_HOST}-{os.getpid()}-", dir=destination.parent)
    )
    old = staging.with_name(staging.name + ".old")
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; an output gets the user's umask
        yield staging
        replacing = os.path.lexists(destination)
        if replacing:
            os.replace(destination, old)
        try:
            os.replace(staging, destination)
        except BaseException:
            if replacing:
                os.replace(old, destination)
            raise
    except BaseException:
        _remove(staging)
        raise
    if replacing:
        _remove(old)
