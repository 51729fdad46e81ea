"""Writing output directories safely: under a temporary name, renamed into place only when complete, and never
replacing or deleting a file this package did not write.

Every directory written here carries a manifest (:data:`MANIFEST`) that lists the files it wrote. Replacing an
existing directory (``overwrite``) is allowed only when every file in it is listed there, and only the listed files
are removed; a directory without a manifest (the user's own folder, or one written by another program) is never
replaced. The current working directory, its ancestors, the home directory, the filesystem root and (for the
command line) the ancestors of its input files are never replaced at all.

Pure standard library (no torch): the command line loads this file on its own to check ``--output-dir`` before it
imports anything heavy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

#: The file, in every directory this package writes, that lists what it wrote there (paths relative to it).
MANIFEST = ".peft-loran-manifest.json"


class DirectoryInUseError(RuntimeError):
    """Another live process is writing the same destination."""


class UnsafeOverwriteError(ValueError):
    """Replacing the destination would remove something this package did not write (the message names it)."""


# ----------------------------------------------------------------------------------------------------- ownership
def read_manifest(directory: Union[str, Path]) -> Optional[dict]:
    """The directory's manifest, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def _listed(manifest: Optional[dict]) -> tuple[set[str], list[str]]:
    """(files, staging directories) a manifest owns, as relative POSIX paths."""
    if manifest is None:
        return set(), []
    return set(map(str, manifest.get("files", []))), [str(d).rstrip("/") for d in manifest.get("staging", [])]


def relative_files(directory: Path) -> list[str]:
    """Every file (and symlink) below ``directory``, relative to it, sorted."""
    found = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        found += [(rel_root / name).as_posix() for name in files]
        found += [(rel_root / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def foreign_files(directory: Union[str, Path]) -> list[str]:
    """Files in ``directory`` this package did not write (not listed in its manifest), relative to it, sorted; every
    file when there is no manifest. Files inside a staging directory the manifest names count as written."""
    directory = Path(directory)
    files, staging = _listed(read_manifest(directory))
    return [f for f in relative_files(directory) if f != MANIFEST and f not in files
            and not any(f.startswith(s + "/") for s in staging)]


def protected_reason(target: Union[str, Path], inputs: Iterable[Union[str, Path]] = ()) -> Optional[str]:
    """Why ``target`` may never be replaced, or None: the filesystem root, the home directory, the working directory
    or one of its ancestors, or an input (a data file, an adapter, a model) or one of its ancestors."""
    target = Path(target).expanduser().resolve()
    if target == Path(target.anchor):
        return "it is the filesystem root"
    if target == Path.home().resolve():
        return "it is your home directory"
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        return "it is the working directory" if target == cwd else f"it contains the working directory {cwd}"
    for item in inputs:
        item = Path(item).expanduser().resolve()
        if target == item or target in item.parents:
            return f"it holds the input {item}"
    return None


def check_replaceable(target: Union[str, Path], inputs: Iterable[Union[str, Path]] = (),
                      what: str = "the output directory") -> None:
    """Raise :class:`UnsafeOverwriteError` unless replacing ``target`` removes only files this package wrote there."""
    target = Path(target)
    reason = protected_reason(target, inputs)
    if reason:
        raise UnsafeOverwriteError(f"refusing to replace {what} {target}: {reason}; choose another directory "
                                   "(nothing was removed)")
    if not target.is_dir():
        raise UnsafeOverwriteError(f"{what} {target} is a file, not a directory; choose another one (nothing was "
                                   "removed)")
    foreign = foreign_files(target)
    if foreign:
        how = ("it was not written by peft-loran (no manifest)" if read_manifest(target) is None
               else "peft-loran did not write it")
        raise UnsafeOverwriteError(f"refusing to replace {what} {target}: it holds {target / foreign[0]}"
                                   + (f" (and {len(foreign) - 1} more file(s))" if len(foreign) > 1 else "")
                                   + f", and {how}; move it away or choose another directory (nothing was removed)")


def write_manifest(directory: Union[str, Path], files: Iterable[str], staging: Iterable[str] = ()) -> None:
    """Record that this package wrote ``files`` (relative paths) in ``directory`` (and owns the ``staging``
    directories while they exist)."""
    payload = {"tool": "peft-loran", "files": sorted(set(files)), "staging": sorted(set(staging))}
    write_text_atomic(Path(directory) / MANIFEST, json.dumps(payload, indent=1) + "\n")


def add_to_manifest(directory: Union[str, Path], files: Iterable[str] = (), staging: Iterable[str] = (),
                    drop_staging: Iterable[str] = ()) -> None:
    """Add ``files`` (relative paths) and ``staging`` directories to ``directory``'s manifest; forget
    ``drop_staging``."""
    old_files, old_staging = _listed(read_manifest(directory))
    gone = {str(d).rstrip("/") for d in drop_staging}
    write_manifest(directory, old_files | set(files), [s for s in [*old_staging, *staging] if s not in gone])


def remove_owned(directory: Union[str, Path], below: str = "") -> list[str]:
    """Remove the files ``directory``'s manifest lists (only those below ``below``, a relative path, when given),
    the staging directories it names, then the directories left empty, and forget them in the manifest. Returns what
    is left there (files it did not write), relative to ``directory``."""
    directory = Path(directory)
    files, staging = _listed(read_manifest(directory))
    prefix = below.rstrip("/") + "/" if below else ""
    for rel in sorted(f for f in files if f.startswith(prefix)):
        path = directory / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
    for rel in (s for s in staging if (s + "/").startswith(prefix)):
        shutil.rmtree(directory / rel, ignore_errors=True)
    root = directory / below if below else directory
    if root.is_dir():
        for path in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            try:
                path.rmdir()
            except OSError:
                pass
    left = [f for f in relative_files(root) if f != MANIFEST] if root.is_dir() else []
    left = [f"{below.rstrip('/')}/{f}" if below else f for f in left]
    if below:
        if root.is_dir() and not left:
            root.rmdir()
        if (directory / MANIFEST).exists():
            write_manifest(directory, [f for f in files if not f.startswith(prefix)],
                           [s for s in staging if not (s + "/").startswith(prefix)])
    else:
        (directory / MANIFEST).unlink(missing_ok=True)
        if not left:
            directory.rmdir()
    return left


# ------------------------------------------------------------------------------------------------------ writing
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
def atomic_directory(destination: Union[str, Path], overwrite: bool = False,
                     inputs: Iterable[Union[str, Path]] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; when the block completes, its files are listed in
    its manifest and it replaces ``destination``. On any error or Ctrl-C the temporary directory is removed and
    ``destination`` is left as it was. While the block runs, a lock file keeps a second writer of the same
    destination out (:class:`DirectoryInUseError`). The result gets the user's umask (a temporary directory is
    created private).

    An existing ``destination`` is replaced only with ``overwrite`` and only when this package wrote every file in
    it (:func:`check_replaceable`, checked before the block runs and again before the swap; ``inputs`` are paths the
    destination must not contain); then only its listed files are removed. Raises ``FileExistsError`` if
    ``destination`` exists and ``overwrite`` is False, :class:`UnsafeOverwriteError` if it may not be replaced.
    """
    target = Path(destination).expanduser().resolve()
    inputs = list(inputs)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists")
    if target.exists():
        check_replaceable(target, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _destination_lock(target):
        if target.exists() and not overwrite:  # written by another run while we waited for nothing
            raise FileExistsError(f"{destination} exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_current_umask())
        try:
            yield tmp
            write_manifest(tmp, relative_files(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            try:
                check_replaceable(target, inputs)  # again: a file may have been added while the block ran
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            left = remove_owned(old / "previous")
            if left:  # only possible if a file appeared between the check and the swap: keep it, say where
                import warnings

                warnings.warn(f"peft-loran: {len(left)} file(s) not written by peft-loran appeared in {target} while "
                              f"it was replaced; they are kept in {old / 'previous'}", RuntimeWarning, stacklevel=3)
            else:
                old.rmdir()
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
