"""Checks of the files a command reads and writes that need no torch: that a safetensors file is whole, that a model
or adapter folder holds readable weights, that an existing plot is one this program wrote, and which paths a
command reads (so that ``--overwrite`` can never replace them).

A truncated or damaged weights file would otherwise end in a traceback from deep inside safetensors or torch;
reading a safetensors header costs a few kilobytes of I/O, however large the file.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Optional

from .errors import UserError

#: Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
                "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75}


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file (truncated, damaged header, tensors outside the file), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes: not even a safetensors header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path} is truncated or not a safetensors file (header of {length} bytes in a {size}-byte file)"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is damaged: its safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return f"{path} is damaged: its safetensors header is not a table of tensors"
    data = size - 8 - length
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            elements = 1
            for dim in info["shape"]:
                elements *= int(dim)
            expected = elements * _DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            return f"{path} is damaged: tensor {name!r} has no valid entry in the header"
        if info["dtype"] in _DTYPE_BYTES and stop - begin != expected:
            return f"{path} is damaged: tensor {name!r} should take {expected} bytes, the header gives {stop - begin}"
        end = max(end, stop)
    if end > data:
        return f"{path} is truncated: its tensors need {end} bytes of data, the file has {data}"
    if end < data:
        return f"{path} is damaged: {data - end} bytes after the last tensor"
    return None


def weights_problem(directory: Path, names: tuple[str, ...]) -> Optional[str]:
    """The first problem with the safetensors weights in ``directory`` (files ``names``, else every ``*.safetensors``
    there), or None."""
    files = [directory / n for n in names if (directory / n).exists()] or sorted(directory.glob("*.safetensors"))
    for path in files:
        problem = safetensors_problem(path)
        if problem:
            return problem
    return None


def adapter_problem(adapter: str) -> Optional[str]:
    """What is wrong with an adapter folder before anything loads it: no or unreadable ``adapter_config.json``, no
    weights, or damaged ones; else None."""
    root = Path(adapter)
    config = root / "adapter_config.json"
    if not config.exists():
        return f"{adapter} is not an adapter directory (no adapter_config.json)"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{config} is damaged: not a JSON object"
    weights = root / "adapter_model.safetensors"
    if weights.exists():
        return safetensors_problem(weights)
    if not (root / "adapter_model.bin").exists() and not list(root.glob("adapter_model.bin.*")):
        return f"{adapter} has no adapter_model.safetensors or adapter_model.bin"
    return None  # the original's pickles are checked as they are read (peft_loran.compat.load_tensors_safely)


def model_problem(spec: Optional[str]) -> Optional[str]:
    """For a local model folder: damaged safetensors weights (the rest is checked when it loads); else None."""
    if not spec:
        return None
    local = Path(spec).expanduser()
    if not local.is_dir():
        return None
    return weights_problem(local, ())


#: Written into every PNG this program saves (its ``Software`` text chunk), so it can tell its own plots from others.
PLOT_SOFTWARE = "peft-loran"


def is_our_plot(path: Path) -> bool:
    """Whether ``path`` is a PNG this program wrote (its ``Software`` text chunk names peft-loran)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"Software\x00" + PLOT_SOFTWARE.encode() in head


def input_paths(args: argparse.Namespace) -> list[str]:
    """The paths a command reads: its data files, its adapter, a local model folder (never to be replaced)."""
    paths = [getattr(args, name, None) for name in ("train_file", "eval_file", "adapter")]
    model = getattr(args, "model", None)
    if model and Path(model).expanduser().exists():
        paths.append(model)
    return [p for p in paths if p]


#: The file in an adapter folder that records what it was trained on (written by ``train`` and ``compare``).
TASK_RECORD = "peft_loran_task.json"


def read_task_record(adapter: str) -> Optional[dict]:
    """The adapter's task record, or None when it has none; a damaged one is an error (one ``error:`` line)."""
    path = Path(adapter) / TASK_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; the adapter's task record is damaged") from None


def recorded_base(adapter: str) -> Optional[str]:
    """The base model an adapter names: its task record's, else its config's (the one rule every command uses)."""
    for name, key in ((TASK_RECORD, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((Path(adapter) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return value
    return None
