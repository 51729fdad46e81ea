"""Reading adapters written by the original LoRAN research code (peft_type ``"MLORA"``).

The original saved ``adapter_model.bin`` (a torch pickle) with keys ``...mlora_A``, ``...mlora_B``,
``...mlora_P_<i>`` and ``...mlora_b_<i>`` (``i`` from 1, ``b`` as a column ``(dim, 1)``), and for embeddings
``...mlora_embedding_A`` / ``_B`` / ``_P_<i>`` / ``_b_<i>``. Its ``A``, ``B`` and ``P`` layouts are already our
row-view layouts (for embeddings too: rows are the embedding dimension), so conversion is renaming plus
flattening ``b``. Its released adapters come split into ``adapter_model.bin.aa``, ``.ab``, ...; those parts are
read in order. Pickles are read with ``torch.load(weights_only=True)`` only: one that would run code is refused,
and a file that is not a complete checkpoint at all is reported as such.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from dataclasses import InitVar, dataclass, field
from typing import Optional, Union

import torch

from .config import ExternalPeftType, LoranConfig

_FACTOR_KEY = re.compile(r"(^|\.)mlora_(?:embedding_)?(A|B)$")
_STAGE_KEY = re.compile(r"(^|\.)mlora_(?:embedding_)?(P|b)_(\d+)$")
#: peft-loran 0.1 and 0.2 called the chain's biases ``loran_b`` (beside the factor ``loran_B``); now ``loran_bias``
_LEGACY_BIAS_KEY = re.compile(r"(^|\.)loran_b(\.|$)")
_STAGE_NAMES = {"P": "loran_P", "b": "loran_bias"}
ORIGINAL_WEIGHTS_NAME = "adapter_model.bin"
_PART_SUFFIX = re.compile(r"^[a-z]{2,}$")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled code rather than plain tensors."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated, damaged or not a torch checkpoint at all."""


def split_parts(directory: str) -> list[str]:
    """``adapter_model.bin.aa``, ``.ab``, ... in ``directory`` (the original's released adapters), in order."""
    if not os.path.isdir(directory):
        return []
    prefix = ORIGINAL_WEIGHTS_NAME + "."
    return sorted(
        os.path.join(directory, name) for name in os.listdir(directory)
        if name.startswith(prefix) and _PART_SUFFIX.match(name[len(prefix):])
    )


def join_parts_command(directory: str) -> str:
    """The shell command that joins split parts into the one file PEFT reads."""
    parts = " ".join(os.path.basename(p) for p in split_parts(directory))
    return f"cd {directory!r} && cat {parts} > {ORIGINAL_WEIGHTS_NAME}"


def convert_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``mlora_*`` keys to ours and flatten the original's column biases, and rename peft-loran 0.1 and 0.2's
    ``loran_b`` to ``loran_bias``; other keys pass unchanged."""
    converted = {}
    for key, value in state_dict.items():
        key = _LEGACY_BIAS_KEY.sub(r"\1loran_bias\2", key)
        if match := _FACTOR_KEY.search(key):
            key = key[: match.start()] + f"{match.group(1)}loran_{match.group(2)}"
        elif match := _STAGE_KEY.search(key):
            kind, index = match.group(2), int(match.group(3)) - 1
            key = key[: match.start()] + f"{match.group(1)}{_STAGE_NAMES[kind]}.{index}"
            if kind == "b":
                value = value.reshape(-1)
        converted[key] = value
    return converted


def load_tensors_safely(path: str | list[str]) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` of plain tensors (or split parts of one, joined in the given order) without executing
    pickled code. Refuses a file that holds code (:class:`UnsafeCheckpointError`) and reports a truncated or
    damaged one as such (:class:`CorruptCheckpointError`)."""
    paths = [path] if isinstance(path, str) else list(path)
    name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} parts)"
    source = paths[0] if len(paths) == 1 else io.BytesIO(b"".join(open(p, "rb").read() for p in paths))
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only's refusal of a global/reduce (code) says so; anything else is a damaged stream
        message = str(exc)
        if "Weights only load failed" in message and ("GLOBAL" in message or "Unsupported" in message):
            raise UnsafeCheckpointError(
                f"Refusing to load {name}: it is not a file of plain tensors ({message.splitlines()[0]}). Loading it "
                "would execute code stored in the file. Re-save the adapter from a trusted environment as "
                "safetensors (see `peft_loran.convert_original_checkpoint`)."
            ) from None
        raise CorruptCheckpointError(_corrupt_message(name, exc)) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(_corrupt_message(name, exc)) from None


def _corrupt_message(name: str, exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        f"Cannot read {name}: it is truncated, damaged or not a torch checkpoint ({type(exc).__name__}: {first}). "
        "Download or copy it again; split parts must all be present."
    )


def check_original_weights_are_safe(directory: str, subfolder: Optional[str] = None) -> None:
    """Before PEFT reads a local original checkpoint: its pickle must hold only tensors, and split parts (which
    PEFT cannot read) get the command that joins them."""
    path = os.path.join(directory, subfolder) if subfolder else directory
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        return
    weights = os.path.join(path, ORIGINAL_WEIGHTS_NAME)
    if os.path.exists(weights):
        load_tensors_safely(weights)
    elif split_parts(path):
        raise FileNotFoundError(
            f"{path} holds the adapter as split parts ({', '.join(os.path.basename(p) for p in split_parts(path))}). "
            f"Join them once with:  {join_parts_command(path)}  or convert without joining: "
            f"peft_loran.convert_original_checkpoint({path!r}, 'converted-adapter')."
        )


def convert_original_checkpoint(source: str, destination: str, overwrite: bool = False) -> str:
    """Write an original ``MLORA`` adapter directory as a peft-loran adapter (``LORAN`` config + safetensors).

    The result loads with ``PeftModel.from_pretrained`` and computes exactly what the original computed
    (``zero_centered=False``). Written to a temporary directory first, then renamed into place.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_directory

    with open(os.path.join(source, "adapter_config.json")) as fh:
        raw = json.load(fh)
    if raw.get("peft_type") != "MLORA":
        raise ValueError(f"{source} is not an original LoRAN (MLORA) adapter: peft_type={raw.get('peft_type')!r}.")
    config = MLoraConfig.from_pretrained(source, check_weights=False)
    weights = os.path.join(source, ORIGINAL_WEIGHTS_NAME)
    tensors = convert_original_state_dict(load_tensors_safely(weights if os.path.exists(weights) else
                                                               split_parts(source) or weights))
    try:
        with atomic_directory(destination, overwrite=overwrite) as tmp:
            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, "adapter_model.safetensors"))
    except FileExistsError:
        raise FileExistsError(f"{destination} exists; pass overwrite=True to replace it.") from None
    return destination


#: peft_type written by the original research code; loading maps it onto LoRAN.
MLORA = ExternalPeftType("MLORA")


# The original implementation's argument defaults (its README's table; they differ from the paper's setting).
_ORIGINAL_DEFAULTS = dict(
    mlora_alpha=8, mlora_dropout=0.0, mlora_af="Sigmoid", mlora_af_sin_A=5e-4, mlora_af_sin_omega=1000.0,
    mlora_use_P=True, mlora_use_b=True, init_mlora_weights=True,
)
#: The original's ``bias`` values and ours.
_ORIGINAL_BIAS = {"mlora_only": "loran_only"}


@dataclass
class MLoraConfig(LoranConfig):
    """The original LoRAN code's ``MLoraConfig``: every argument of its table, with its meaning and its default,
    translated into :class:`LoranConfig`.

    ``MLoraConfig(r=[64, 4096], mlora_alpha=16, mlora_af="Sin", mlora_af_sin_A=5e-5, mlora_af_sin_omega=1e4,
    mlora_use_P=False, mlora_use_b=False, mlora_dropout=0.2, bias="none", task_type="CAUSAL_LM")`` gives the
    same adapter as ``LoranConfig(r=64, loran_alpha=16, activation="sinter", ..., chain_dims=[4096])``.

    The original's defaults hold: ``mlora_alpha=8``, ``mlora_dropout=0.0``, ``mlora_af="Sigmoid"``,
    ``mlora_af_sin_A=5e-4``, ``mlora_af_sin_omega=1000``, ``mlora_use_P=True``, ``mlora_use_b=True``;
    ``bias="mlora_only"`` is our ``"loran_only"``. ``r`` is a list ``[r0, r1, ...]`` (rank, then chain widths)
    as in the original; an int ``r`` (our extension) means plain LoRAN, where ``P``/``b`` are off unless asked
    for. Deliberate differences from the original (README): new adapters use zero-centred activations so that
    they start exactly at the base model, and merging adds the update in the right orientation. Saved adapters
    are written as ``LoranConfig`` (peft_type ``LORAN``). A checkpoint written by the original (peft_type
    ``MLORA``) is read through this class with ``zero_centered=False`` so that it computes exactly what it
    computed there.
    """

    r: Union[int, list[int]] = 8
    bias: str = field(default="none")
    mlora_alpha: InitVar[Optional[float]] = None
    mlora_dropout: InitVar[Optional[float]] = None
    mlora_af: InitVar[Optional[str]] = None
    mlora_af_sin_A: InitVar[Optional[float]] = None
    mlora_af_sin_omega: InitVar[Optional[float]] = None
    mlora_use_P: InitVar[Optional[bool]] = None
    mlora_use_b: InitVar[Optional[bool]] = None
    init_mlora_weights: InitVar[Optional[bool]] = None

    def __post_init__(
        self, mlora_alpha, mlora_dropout, mlora_af, mlora_af_sin_A, mlora_af_sin_omega, mlora_use_P, mlora_use_b,
        init_mlora_weights,
    ) -> None:
        given = dict(
            mlora_alpha=mlora_alpha, mlora_dropout=mlora_dropout, mlora_af=mlora_af, mlora_af_sin_A=mlora_af_sin_A,
            mlora_af_sin_omega=mlora_af_sin_omega, mlora_use_P=mlora_use_P, mlora_use_b=mlora_use_b,
            init_mlora_weights=init_mlora_weights,
        )
        ranks = self.r
        if isinstance(ranks, (list, tuple)):
            ranks = list(ranks)
            if len(ranks) < 2:
                raise ValueError(
                    f"`r` as a list needs at least two entries [rank, width, ...], got {self.r!r}; for plain LoRAN "
                    "pass an int, e.g. r=8."
                )
            self.r, self.chain_dims = ranks[0], ranks[1:]
            defaults = _ORIGINAL_DEFAULTS
        else:  # an int rank: plain LoRAN, no chain for P or b to act on unless the caller asks
            defaults = dict(_ORIGINAL_DEFAULTS, mlora_use_P=False, mlora_use_b=False)
        opts = {k: (defaults[k] if v is None else v) for k, v in given.items()}
        legacy_checkpoint = self.peft_type is not None and str.__str__(self.peft_type) == "MLORA"
        self.bias = _ORIGINAL_BIAS.get(self.bias, self.bias)
        self.loran_alpha = opts["mlora_alpha"]
        self.loran_dropout = opts["mlora_dropout"]
        self.activation = opts["mlora_af"]
        self.sinter_amplitude = opts["mlora_af_sin_A"]
        self.sinter_frequency = opts["mlora_af_sin_omega"]
        self.use_P = bool(opts["mlora_use_P"])
        self.use_b = bool(opts["mlora_use_b"])
        self.init_weights = bool(opts["init_mlora_weights"])
        if legacy_checkpoint:
            self.zero_centered = False
        super().__post_init__()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, check_weights: bool = True, **kwargs
    ):
        """Read an original ``MLORA`` adapter config; with ``check_weights`` (PEFT's loading path) refuses a weights
        file that is not plain tensors and explains split parts."""
        if check_weights:
            check_original_weights_are_safe(pretrained_model_name_or_path, subfolder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
