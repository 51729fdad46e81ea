"""Reading adapters written by the original LoRAN research code (peft_type ``"MLORA"``).

The original saved ``adapter_model.bin`` (a torch pickle) with keys ``...mlora_A``, ``...mlora_B``,
``...mlora_P_<i>`` and ``...mlora_b_<i>`` (``i`` from 1, ``b`` as a column ``(dim, 1)``). Its ``A``, ``B`` and
``P`` layouts are already our row-view layouts, so conversion is renaming plus flattening ``b``. Pickles are
read with ``torch.load(weights_only=True)`` only: one that would run code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Optional

import torch

_FACTOR_KEY = re.compile(r"(^|\.)mlora_(A|B)$")
_STAGE_KEY = re.compile(r"(^|\.)mlora_(P|b)_(\d+)$")
ORIGINAL_WEIGHTS_NAME = "adapter_model.bin"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled code rather than plain tensors."""


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``mlora_*`` keys to ours and flatten the original's column biases; other keys pass unchanged."""
    converted = {}
    for key, value in state_dict.items():
        if match := _FACTOR_KEY.search(key):
            key = key[: match.start()] + f"{match.group(1)}loran_{match.group(2)}"
        elif match := _STAGE_KEY.search(key):
            kind, index = match.group(2), int(match.group(3)) - 1
            key = key[: match.start()] + f"{match.group(1)}loran_{kind}.{index}"
            if kind == "b":
                value = value.reshape(-1)
        converted[key] = value
    return converted


def load_tensors_safely(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` of plain tensors without executing pickled code; refuse anything else clearly."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it is not a file of plain tensors (torch.load(weights_only=True) rejected it: "
            f"{str(exc).splitlines()[0]}). Loading it would execute code stored in the file. Re-save the adapter "
            "from a trusted environment as safetensors (see `peft_loran.compat.convert_original_checkpoint`)."
        ) from None


def check_original_weights_are_safe(directory: str, subfolder: Optional[str] = None) -> None:
    """Before PEFT reads a local original checkpoint, make sure its pickle holds only tensors."""
    path = os.path.join(directory, subfolder) if subfolder else directory
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        weights = os.path.join(path, ORIGINAL_WEIGHTS_NAME)
        if os.path.exists(weights):
            load_tensors_safely(weights)


def convert_original_checkpoint(source: str, destination: str, overwrite: bool = False) -> str:
    """Write an original ``MLORA`` adapter directory as a peft-loran adapter (``LORAN`` config + safetensors).

    The result loads with ``PeftModel.from_pretrained`` and computes exactly what the original computed
    (``zero_centered=False``). Written to a temporary directory first, then renamed into place.
    """
    from safetensors.torch import save_file

    from ._atomic import atomic_directory
    from .config import MLoraConfig

    with open(os.path.join(source, "adapter_config.json")) as fh:
        raw = json.load(fh)
    if raw.get("peft_type") != "MLORA":
        raise ValueError(f"{source} is not an original LoRAN (MLORA) adapter: peft_type={raw.get('peft_type')!r}.")
    config = MLoraConfig.from_pretrained(source)
    tensors = convert_original_state_dict(load_tensors_safely(os.path.join(source, ORIGINAL_WEIGHTS_NAME)))
    try:
        with atomic_directory(destination, overwrite=overwrite) as tmp:
            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "adapter_model.safetensors"))
    except FileExistsError:
        raise FileExistsError(f"{destination} exists; pass overwrite=True to replace it.") from None
    return destination
