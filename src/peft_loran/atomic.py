"""Writing output directories whole: under a temporary name, renamed into place only when complete.

:func:`atomic_directory` is what :func:`peft_loran.export_lora`, :func:`peft_loran.export_merged` and
:func:`peft_loran.convert_original_checkpoint` write through, and what the command line builds on. A reader sees
the old directory or the complete new one, never half of it; on an error or Ctrl-C the destination is left as it
was. Replacing an existing destination (``overwrite=True``) deletes nothing the new content does not replace: by
default every file in it must be one the new content writes again under the same name (re-running the same export);
a caller with its own record of what it wrote passes ``may_replace`` (the command line's manifest).

Pure standard library (no torch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, Path]
#: ``may_replace(destination, staged)``: why ``destination`` may not be replaced by the complete ``staged`` directory
#: (the message for the user), or None.
ReplaceRule = Callable[[Path, Optional[Path]], Optional[str]]


class DirectoryInUseError(RuntimeError):
    """Another live process is writing the same destination."""


class UnsafeOverwriteError(ValueError):
    """Replacing the destination would remove something that should stay (the message names it)."""


def relative_files(directory: Path) -> list[str]:
    """Every file (and symlink) below ``directory``, relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        found += [(rel_root / name).as_posix() for name in files]
        found += [(rel_root / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def replaced_by_new_files(destination: Path, staged: Optional[Path]) -> Optional[str]:
    """The default rule: every file in ``destination`` is written again by ``staged``. Before the block has run
    (``staged`` None) nothing is known yet; the rule is applied at the swap."""
    if staged is None:
        return None
    kept = set(relative_files(staged))
    lost = [f for f in relative_files(destination) if f not in kept]
    if lost:
        return (f"refusing to replace {destination}: it holds {destination / lost[0]}"
                + (f" (and {len(lost) - 1} more file(s))" if len(lost) > 1 else "")
                + ", which the new output does not write again; move it away or choose another directory")
    return None


@contextmanager
def directory_lock(target: PathLike) -> Iterator[None]:
    """A lock file beside ``target`` holding the writer's pid: a second writer is refused
    (:class:`DirectoryInUseError`) while the first lives; a lock left by a crashed process is taken over."""
    target = Path(target)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_unless(rule: ReplaceRule, destination: Path, staged: Optional[Path]) -> None:
    reason = rule(destination, staged)
    if reason:
        raise UnsafeOverwriteError(reason + " (nothing was removed)")


@contextmanager
def atomic_directory(destination: PathLike, overwrite: bool = False,
                     may_replace: Optional[ReplaceRule] = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; when the block completes it replaces
    ``destination``. On any error or Ctrl-C the temporary directory is removed and ``destination`` is left as it was.
    A lock file keeps a second writer of the same destination out while the block runs (:class:`DirectoryInUseError`).
    The result gets the user's umask (a temporary directory is created private).

    An existing ``destination`` is replaced only with ``overwrite`` and only when ``may_replace`` (default
    :func:`replaced_by_new_files`) allows it: asked before the block runs (``staged`` None) and again before the
    swap. Raises ``FileExistsError`` if ``destination`` exists without ``overwrite``, :class:`UnsafeOverwriteError`
    if it may not be replaced. An existing empty directory counts as absent."""
    rule = may_replace or replaced_by_new_files
    target = Path(destination).expanduser().resolve()
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{destination} exists")
    if occupied:
        _refuse_unless(rule, target, None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            if target.exists():
                _refuse_unless(rule, target, tmp)  # again: a file may have been added while the block ran
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            if rule(old / "previous", target):  # a file appeared between the check and the swap: keep it, say where
                import warnings

                warnings.warn(f"peft-loran: files appeared in {target} while it was replaced; the previous directory "
                              f"is kept in {old / 'previous'}", RuntimeWarning, stacklevel=3)
            else:
                shutil.rmtree(old, ignore_errors=True)  # the rule allowed it: nothing in it is lost
        else:
            os.replace(tmp, target)


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: readers see the old file or the
    whole new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
