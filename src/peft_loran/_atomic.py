"""Write a directory under a temporary name and rename it into place only when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


@contextmanager
def atomic_directory(destination: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``destination``; when the block completes, it replaces
    ``destination`` (an existing one is removed only after the new one is in place). On any error or Ctrl-C the
    temporary directory is removed and ``destination`` is left as it was.

    Raises ``FileExistsError`` if ``destination`` exists and ``overwrite`` is False.
    """
    target = Path(destination).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
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
