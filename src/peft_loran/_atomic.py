"""Write a directory under a temporary name and rename it into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


class DirectoryInUseError(RuntimeError):
    """Another live process is writing the same destination."""


@contextmanager
def _destination_lock(target: Path) -> Iterator[None]:
    """A lock file beside ``target`` holding the writer's pid: a second writer is refused while the first lives; a
    lock left by a crashed process (its pid gone) is taken over."""
    lock = target.parent / f".{target.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                raise DirectoryInUseError(f"{target} is being written by another run (process {owner})") from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise DirectoryInUseError(f"{target} is being written by another run (lock {lock})")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(destination: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; when the block completes, it replaces
    ``destination`` (an existing one is removed only after the new one is in place). On any error or Ctrl-C the
    temporary directory is removed and ``destination`` is left as it was. While the block runs, a lock file keeps a
    second writer of the same destination out (:class:`DirectoryInUseError`). The result gets the user's umask
    (a temporary directory is created private).

    Raises ``FileExistsError`` if ``destination`` exists and ``overwrite`` is False.
    """
    target = Path(destination).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _destination_lock(target):
        if target.exists() and not overwrite:  # written by another run while we waited for nothing
            raise FileExistsError(f"{destination} exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_current_umask())
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


#: A lock on a directory that is written in place (a resumable sweep): the same rules as :func:`atomic_directory`'s.
directory_lock = _destination_lock


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: readers see the old file or the
    whole new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
