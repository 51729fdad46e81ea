"""The command line's output folders, and what it may replace in them: one class, :class:`OutputFolder`.

Every folder a command writes carries a manifest (:data:`MANIFEST`) listing the files the command wrote. Replacing
a folder (``--overwrite``) is allowed only when every file in it is listed there, and only the listed files are
removed; a folder without a manifest (the user's own, or another program's) is never replaced. The working folder,
its ancestors, the home folder, the filesystem root and the ancestors of the command's inputs are never replaced at
all. A comparison's folder is written in place, cell by cell, each cell added to the manifest when it is complete;
``inspect`` adds its plot to the manifest of the folder it writes into.

Pure Python (the library's ``atomic`` module is loaded without torch): ``--output-dir`` is checked in milliseconds,
before any model is loaded, by the same rules that the writing itself enforces.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from .errors import UserError
from .light import library_module

#: The file, in every folder the command line writes, that lists what it wrote there (paths relative to it).
MANIFEST = ".peft-loran-manifest.json"


def _atomic():
    return library_module("atomic")


class OutputFolder:
    """A folder the command line writes (``path``), and the ``inputs`` (data, adapter, model) it must never
    contain."""

    def __init__(self, path: Union[str, Path], inputs: Iterable[Union[str, Path]] = ()) -> None:
        self.path = Path(path)
        self.inputs = [Path(p) for p in inputs]

    # ------------------------------------------------------------------------------------------------- the manifest
    def manifest(self) -> Optional[dict]:
        """The folder's manifest, or None (none, or an unreadable one)."""
        return read_manifest(self.path)

    def owned(self) -> tuple[set[str], list[str]]:
        """(files, staging folders) the manifest lists, as relative POSIX paths."""
        data = self.manifest() or {}
        return set(map(str, data.get("files", []))), [str(d).rstrip("/") for d in data.get("staging", [])]

    def write_manifest(self, files: Iterable[str], staging: Iterable[str] = ()) -> None:
        payload = {"tool": "peft-loran", "files": sorted(set(files)), "staging": sorted(set(staging))}
        _atomic().write_text_atomic(self.path / MANIFEST, json.dumps(payload, indent=1) + "\n")

    def claim(self, files: Iterable[str] = (), staging: Iterable[str] = (), done_staging: Iterable[str] = ()) -> None:
        """Record ``files`` (relative paths) as written here, and ``staging`` folders as ours while they exist."""
        old_files, old_staging = self.owned()
        gone = {str(d).rstrip("/") for d in done_staging}
        self.write_manifest(old_files | set(files), [s for s in [*old_staging, *staging] if s not in gone])

    def foreign_files(self) -> list[str]:
        """Files here the command line did not write (every file when there is no manifest), relative, sorted."""
        files, staging = self.owned()
        return [f for f in _atomic().relative_files(self.path) if f != MANIFEST and f not in files
                and not any(f.startswith(s + "/") for s in staging)]

    @classmethod
    def enclosing(cls, path: Union[str, Path]) -> Optional["OutputFolder"]:
        """The nearest folder at or above ``path`` that the command line wrote (has a manifest), or None."""
        for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
            if read_manifest(folder) is not None:
                return cls(folder)
        return None

    # --------------------------------------------------------------------------------------------- replacing
    def protected_reason(self) -> Optional[str]:
        """Why this folder may never be replaced, or None."""
        target = self.path.expanduser().resolve()
        if target == Path(target.anchor):
            return "it is the filesystem root"
        if target == Path.home().resolve():
            return "it is your home directory"
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            return "it is the working directory" if target == cwd else f"it contains the working directory {cwd}"
        for item in self.inputs:
            item = item.expanduser().resolve()
            if target == item or target in item.parents:
                return f"it holds the input {item}"
        return None

    def replace_problem(self) -> Optional[str]:
        """Why ``--overwrite`` may not replace this folder (the message for the user), or None."""
        reason = self.protected_reason()
        if reason:
            return f"refusing to replace the output directory {self.path}: {reason}; choose another directory"
        if not self.path.is_dir():
            return f"the output directory {self.path} is a file, not a directory; choose another one"
        foreign = self.foreign_files()
        if foreign:
            how = ("it was not written by peft-loran (no manifest)" if self.manifest() is None
                   else "peft-loran did not write it")
            return (f"refusing to replace the output directory {self.path}: it holds {self.path / foreign[0]}"
                    + (f" (and {len(foreign) - 1} more file(s))" if len(foreign) > 1 else "")
                    + f", and {how}; move it away or choose another directory")
        return None

    def problem(self, overwrite: bool, resumable: bool = False) -> Optional[str]:
        """What stops a command from writing here (checked before anything loads), or None."""
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            return f"--output-dir {self.path} is a file, not a directory; choose another --output-dir (nothing was removed)"
        if not overwrite:
            return None if resumable else f"output directory {self.path} exists; pass --overwrite to replace it"
        reason = self.replace_problem()
        return reason + " (nothing was removed)" if reason else None

    def _rule(self, destination: Path, staged: Optional[Path]) -> Optional[str]:
        return OutputFolder(destination, self.inputs).replace_problem()

    @contextmanager
    def staged(self, overwrite: bool) -> Iterator[Path]:
        """A temporary folder that becomes this one when the block completes (with its manifest); an existing
        folder is replaced only with ``overwrite`` and by :meth:`replace_problem`'s rules. Errors are one line."""
        atomic = _atomic()
        try:
            with atomic.atomic_directory(self.path, overwrite=overwrite, may_replace=self._rule) as tmp:
                yield tmp
                OutputFolder(tmp).write_manifest(atomic.relative_files(tmp))
        except FileExistsError:
            raise UserError(f"output directory {self.path} exists; pass --overwrite to replace it") from None
        except atomic.UnsafeOverwriteError as exc:
            raise UserError(str(exc)) from None
        except atomic.DirectoryInUseError as exc:
            raise UserError(f"{exc}; wait for it to finish or choose another --output-dir") from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Held while a comparison writes this folder in place: a second writer gets one ``error:`` line."""
        atomic = _atomic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic.directory_lock(self.path.resolve()):
                yield
        except atomic.DirectoryInUseError as exc:
            raise UserError(f"{exc}; wait for it to finish or choose another --output-dir") from None

    def remove_owned(self, below: str = "") -> list[str]:
        """Remove the files the manifest lists (only those below ``below``, a relative path, when given) and the
        staging folders it names, then the folders left empty, and forget them. Returns what is left there (files
        the command line did not write), relative to this folder."""
        files, staging = self.owned()
        prefix = below.rstrip("/") + "/" if below else ""
        for rel in sorted(f for f in files if f.startswith(prefix)):
            path = self.path / rel
            if path.is_symlink() or path.is_file():
                path.unlink()
        for rel in (s for s in staging if (s + "/").startswith(prefix)):
            shutil.rmtree(self.path / rel, ignore_errors=True)
        root = self.path / below if below else self.path
        _remove_empty_folders(root)
        left = [f for f in _atomic().relative_files(root) if f != MANIFEST] if root.is_dir() else []
        left = [f"{below.rstrip('/')}/{f}" if below else f for f in left]
        if below:
            if root.is_dir() and not left:
                root.rmdir()
            if (self.path / MANIFEST).exists():
                self.write_manifest([f for f in files if not f.startswith(prefix)],
                                    [s for s in staging if not (s + "/").startswith(prefix)])
        else:
            (self.path / MANIFEST).unlink(missing_ok=True)
            if not left:
                self.path.rmdir()
        return left

    def make_room(self, below: str) -> None:
        """Remove what the command line wrote at ``below`` (a leftover of an interrupted run); a file there it did
        not write is an error that names it, and stays."""
        if not (self.path / below).exists():
            return
        left = self.remove_owned(below)
        if left:
            raise UserError(f"{self.path / left[0]} was not written by peft-loran, and the run needs its place; move it "
                            "away (nothing was removed)")


def read_manifest(directory: Path) -> Optional[dict]:
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def _remove_empty_folders(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass
