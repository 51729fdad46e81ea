"""Loading models for the commands, by one rule.

* :func:`load_base`: a base model for a task (the right head, its tokenizer, the position-table cap), loaded as a
  :class:`BaseLoading` says: float32, or QLoRA's 4-bit NF4 with the classification head left unquantized.
* :func:`load_adapter_model`: a saved adapter on its base, for ``evaluate``, ``inspect`` and ``export``. The base is
  the one the adapter's task record names, else the one its config names, else ``--model``; it is loaded the way the
  run loaded it (the record's ``base_loading``), so a QLoRA adapter is scored on the NF4 base it was trained on.
  What cannot be loaded that way (bitsandbytes missing, no base recorded) is one ``error:`` line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .files import read_task_record, recorded_base

#: The classification heads of the architectures transformers ships (kept in float: they are trained).
HEAD_MODULES = ["classifier", "score", "pre_classifier"]


@dataclass(frozen=True)
class BaseLoading:
    """How a base model's weights are loaded: ``quantization`` None (float32) or ``"nf4"`` (QLoRA: bitsandbytes 4-bit
    NF4, double quantization, bfloat16 compute)."""

    quantization: Optional[str] = None

    def as_record(self) -> dict:
        """What the task record keeps (``base_loading``)."""
        if self.quantization == "nf4":
            return {"quantization": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "dtype": "float32"}
        return {"quantization": None, "dtype": "float32"}

    @classmethod
    def recorded(cls, record: Optional[dict], adapter: str) -> "BaseLoading":
        """The way the adapter's run loaded its base: the record's ``base_loading``; records of peft-loran 0.4 have
        none, and their model card's command tells whether it had ``--load-in-4bit``."""
        loading = (record or {}).get("base_loading")
        if isinstance(loading, dict):
            return cls(loading.get("quantization"))
        card = Path(adapter) / "README.md"
        made_with = [line for line in (card.read_text(errors="replace").splitlines() if card.exists() else [])
                     if line.startswith("- **Made with:**")]
        return cls("nf4" if any("--load-in-4bit" in line for line in made_with) else None)

    def describe(self) -> str:
        return "4-bit NF4 (bitsandbytes)" if self.quantization == "nf4" else "float32"

    def from_pretrained_kwargs(self, kind: str) -> dict:
        """``from_pretrained`` arguments: the quantization config, the head kept out of it for classifiers."""
        if self.quantization is None:
            return {}
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("the base model is loaded in 4-bit NF4 (as the run loaded it), which needs bitsandbytes: "
                            "pip install bitsandbytes (or peft-loran[quant])")
        return {"quantization_config": qlora_quantization(HEAD_MODULES if kind == "classify" else None)}


def qlora_quantization(skip_modules: Optional[list[str]] = None):
    """The paper's QLoRA base: nf4 with double quantization, bf16 compute; ``skip_modules`` stay unquantized."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules)


def load_base(model_path: str, kind: str, labels: Optional[list[str]], loading: BaseLoading,
              gradient_checkpointing: bool = False, num_labels: Optional[int] = None):
    """The base model for a ``kind`` ("classify" or "generate") task and its tokenizer. Classifiers get a head with
    ``labels`` (or ``num_labels`` unnamed classes); a quantized base is prepared for k-bit training. The tokenizer is
    None where the model folder has none (see :func:`needs_tokenizer`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import peft_loran  # noqa: F401  (registers LoRAN)

    from .models import generation_model_problem

    tokenizer = tokenizer_if_any(model_path)
    kwargs = loading.from_pretrained_kwargs(kind)
    if kind == "classify":
        names = (dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
                 if labels else {})
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(labels) if labels else num_labels, **names, **kwargs)
    else:
        problem = generation_model_problem(model_path, kind)
        if problem:
            raise UserError(problem)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
    if model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoders classify the last real token: they need it
    if loading.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model, tokenizer


def needs_tokenizer(tokenizer, where: str):
    """``tokenizer``, or one ``error:`` line: the command reads or writes text."""
    if tokenizer is None:
        raise UserError(f"{where} has no tokenizer files (tokenizer.json, vocab.txt, ...); save the tokenizer with the "
                        "model")
    return tokenizer


def tokenizer_if_any(path: str):
    """The tokenizer saved in ``path`` (with a pad token), or None: a model built from a config and saved without one
    is common, and exporting needs none."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).exists() for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt",
                                                           "tokenizer.model", "vocab.json")):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def cap_max_length(settings, model) -> None:
    """Texts longer than the model's position table cannot be encoded: cap ``max_length`` there, and say so once."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and settings.max_length > limit:
        print(f"note: --max-length {settings.max_length} is more than the model's {limit} positions; using {limit}",
              file=sys.stderr, flush=True)
        settings.max_length = limit


# ------------------------------------------------------------------------------------------------ saved adapters
@dataclass
class LoadedAdapter:
    """An adapter on its base, and what was read to load it."""

    model: object
    tokenizer: object
    config: object
    record: Optional[dict]
    base_path: str
    loading: BaseLoading
    kind: str


def adapter_config(adapter: str):
    """The adapter's PEFT config (ours, LoRA, the original's MLORA), or one ``error:`` line."""
    from peft import PeftConfig

    import peft_loran  # noqa: F401  (registers LORAN and MLORA)

    if not (Path(adapter) / "adapter_config.json").exists():
        raise UserError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    try:
        return PeftConfig.from_pretrained(adapter)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None


def load_adapter_model(adapter: str, model: Optional[str] = None, load_in_4bit: bool = False,
                       quiet: bool = False) -> LoadedAdapter:
    """``adapter`` on its base model (see the module docstring), in eval mode, with the tokenizer saved beside it
    (else the base's). ``model`` replaces the recorded base only where the adapter records none or names the same
    one; ``load_in_4bit`` asks for an NF4 base where the run used a float one (a warning says the numbers will
    differ from the run's)."""
    from .models import resolve_model

    config = adapter_config(adapter)
    record = read_task_record(adapter)
    recorded = recorded_base(adapter)
    spec = model or recorded
    if not spec:
        raise UserError(f"{adapter} does not record its base model; pass --model")
    base_path = resolve_model(spec, quiet=quiet)
    if model and record and not same_model(base_path, record["base_model"]):
        raise UserError(f"the adapter was trained on {record['base_model']}, not {base_path}; numbers on another base "
                        "model mean nothing (leave out --model)")
    loading = BaseLoading.recorded(record, adapter)
    if load_in_4bit and loading.quantization is None:
        if record is not None:
            print("warning: the run loaded its base in float32; on a 4-bit NF4 base the adapter computes something "
                  "else, so its numbers will differ from the run's", file=sys.stderr)
        loading = BaseLoading("nf4")
    task_type = str(getattr(config.task_type, "value", config.task_type) or "")
    kind = (record or {}).get("kind") or ("classify" if task_type == "SEQ_CLS" else "generate")
    labels = (record or {}).get("labels") if kind == "classify" else None
    num_labels = None if labels else (saved_num_labels(adapter) if kind == "classify" else None)
    base, base_tokenizer = load_base(base_path, kind, labels, loading, num_labels=num_labels)
    tokenizer = tokenizer_if_any(adapter) or base_tokenizer
    return LoadedAdapter(attach_adapter(base, adapter), tokenizer, config, record, base_path, loading, kind)


def same_model(path: str, recorded: str) -> bool:
    """Whether ``path`` is the model the run recorded: the same folder, or (moved or copied) one with the same config
    and weight files of the same sizes. Hashing the weights would cost a full read of a large model."""
    first, second = Path(path).expanduser(), Path(recorded).expanduser()
    if first.resolve() == second.resolve():
        return True
    if not (first.is_dir() and second.is_dir()):
        return False

    def fingerprint(folder: Path):
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config.pop("_name_or_path", None)
        sizes = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
        return config, sizes or sorted((p.name, p.stat().st_size) for p in folder.glob("*.bin"))

    return fingerprint(first) is not None and fingerprint(first) == fingerprint(second)


def attach_adapter(base, adapter: str):
    """``PeftModel.from_pretrained`` in eval mode; a checkpoint that does not fit is one ``error:`` line."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter).eval()
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None


def saved_num_labels(adapter: str) -> int:
    """Classes of a classification adapter: the rows of its saved head (its modules_to_save)."""
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"{adapter} is a classification adapter without adapter_model.safetensors; cannot tell its "
                        "classes")
    with safe_open(str(path), "pt") as fh:
        heads = [fh.get_slice(k).get_shape()[0] for k in fh.keys()
                 if any(h in k for h in HEAD_MODULES) and k.endswith("weight") and ".loran_" not in k]
    if not heads:
        raise UserError(f"{adapter} is a classification adapter without a saved head; cannot tell its classes")
    return heads[-1]
