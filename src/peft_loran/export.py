"""Deploying a LoRAN adapter where only LoRA or plain models are understood.

* :func:`export_lora` writes a standard PEFT LoRA adapter whose update per module is the best rank-``k``
  approximation of LoRAN's dense ``s f(BA)`` (truncated SVD). Serving stacks (vLLM and llama.cpp, checked by
  ``scripts/serve_check.sh``; PEFT's own multi-adapter serving) take it like any LoRA adapter. At the paper's Sinter setting the update is LoRA to within
  ``a = 5e-5`` relative (``|a x sin(w x)| <= a |x|``), so a rank-``r`` export reproduces it to that precision; at
  stronger settings the error is measured and reported per module.
* :func:`export_merged` writes a complete transformers model with the update added to the weights: no PEFT
  needed at all. Quantized (bitsandbytes) bases are dequantized, merged in float32 and saved in bf16.

The SVD never holds more than one block of the dense update at a time besides its sketches: products ``D X`` and
``D^T Y`` are formed block by block (:meth:`peft_loran.update.LowRankUpdate.matmul`) inside a randomized SVD (Halko,
Martinsson and Tropp, 2011) with power iterations, all in float64.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import nn

from .update import LowRankUpdate
from .layer import Embedding, LoranLayer, unpack_bnb_cpu_weight
from .rank_spec import parse_rank

#: Extra sketch columns beyond the wanted rank, and power iterations, of the randomized SVD.
OVERSAMPLE = 16
POWER_ITERATIONS = 3


@dataclass
class ModuleExport:
    """What the export did to one adapted module."""

    module: str
    shape: list[int]
    rank: int
    relative_error: float  # ||D - D_k||_F / ||D||_F, measured on the exported factors
    energy_kept: float  # ||D_k||_F^2 / ||D||_F^2


def _randomized_svd(layer: LoranLayer, adapter: str, sketch: int, generator: torch.Generator):
    """Top ``sketch`` singular triplets of the layer's update ``D`` (rows x cols), float64."""
    D = layer.low_rank_update(adapter).matmul
    rows, cols = layer.update_shape
    omega = torch.randn(cols, sketch, dtype=torch.float64, generator=generator).to(layer.loran_A[adapter].device)
    Q = torch.linalg.qr(D(omega)).Q
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(D(Q, transpose=True)).Q
        Q = torch.linalg.qr(D(Q)).Q
    small = D(Q, transpose=True).T  # Q^T D: (sketch, cols)
    U, S, Vh = torch.linalg.svd(small, full_matrices=False)
    return Q @ U, S, Vh


def _sq_norm(update: LowRankUpdate) -> float:
    """``||D||_F^2``, accumulated in float64, block by block."""
    return float(sum(block.value.double().pow(2).sum() for block in update.blocks(update.plan(autograd=False))))


def _distance(update: LowRankUpdate, left: torch.Tensor, right: torch.Tensor) -> float:
    """``||D - left @ right||_F^2`` (``left``: ``(rows, k)``, ``right``: ``(k, cols)``) in float64, block by block."""
    return float(sum((block.value.double() - left[block.i0:block.i1] @ right).pow(2).sum()
                     for block in update.blocks(update.plan(autograd=False))))


@torch.no_grad()
def low_rank_factors(
    layer: LoranLayer, adapter: str, rank: Optional[int] = None, tol: Optional[float] = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_B (rows x k), lora_A (k x cols), relative error)`` with ``lora_B @ lora_A`` the best rank-``k``
    approximation of the layer's update; ``k = rank``, or with ``tol`` the smallest ``k`` whose relative Frobenius
    error is at most ``tol``. float32 factors; the error is measured on them against the float32 update."""
    rows, cols = layer.update_shape
    full = min(rows, cols)
    update = layer.low_rank_update(adapter)
    total = _sq_norm(update)
    generator = torch.Generator().manual_seed(seed)
    want = min(rank, full) if rank is not None else min(full, max(2 * layer.loran_A[adapter].shape[0], 8))
    while True:
        sketch = min(full, want + OVERSAMPLE)
        U, S, Vh = _randomized_svd(layer, adapter, sketch, generator)
        if rank is not None:
            k = want
            break
        # tail energy after k components, from the sketch (exact once sketch == full)
        kept = torch.cumsum(S**2, 0)
        tail = (total - kept).clamp_min(0) / max(total, 1e-300)
        fits = (tail <= tol**2).nonzero()
        if len(fits):
            k = int(fits[0]) + 1
            break
        if sketch >= full:
            k = full
            break
        want = min(full, 2 * sketch)
    k = max(1, min(k, len(S)))
    root = S[:k].sqrt()
    lora_B = (U[:, :k] * root).float()
    lora_A = (root[:, None] * Vh[:k]).float()
    error = _distance(update, lora_B.double(), lora_A.double())
    relative = math.sqrt(error / total) if total > 0 else 0.0
    return lora_B, lora_A, relative


def _loran_modules(model: nn.Module, adapter: str) -> dict[str, LoranLayer]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = {name: m for name, m in base.named_modules() if isinstance(m, LoranLayer) and adapter in m.loran_A}
    if not found:
        raise ValueError(f"Nothing to export: the model has no LoRAN adapter {adapter!r} (not a LoRAN PeftModel?).")
    return found


def lora_state_and_config(model: nn.Module, rank: Union[int, str], adapter: str = "default", seed: int = 0):
    """The exported LoRA adapter in memory: ``(state dict in PEFT's saved format, LoraConfig, [ModuleExport])``."""
    from peft import LoraConfig, get_peft_model_state_dict

    fixed, tol = parse_rank(rank)
    configs = getattr(model, "peft_config", {})
    if adapter not in configs:
        raise ValueError(f"Nothing to export: the model has no adapter {adapter!r} (not a LoRAN PeftModel?).")
    loran_config = configs[adapter]
    if getattr(loran_config, "bias", "none") != "none":
        raise ValueError(f"The adapter trains biases (bias={loran_config.bias!r}), which a LoRA adapter file does not "
                         "carry the same way; export a merged model instead (export_merged / --merge).")
    state, reports, ranks, conv1d = {}, [], {}, False
    for name, layer in _loran_modules(model, adapter).items():
        lora_B, lora_A, error = low_rank_factors(layer, adapter, fixed, tol, seed=seed)
        k = lora_A.shape[0]
        ranks[name] = k
        key = f"base_model.model.{name}"
        if isinstance(layer, Embedding):
            state[f"{key}.lora_embedding_A"], state[f"{key}.lora_embedding_B"] = lora_A, lora_B
        else:
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = lora_A, lora_B
            conv1d |= bool(layer.fan_in_fan_out)
        kept = 1 - error**2
        reports.append(ModuleExport(name, list(layer.update_shape), k, error, kept))
    # modules_to_save (e.g. a classification head) travel as they are: PEFT stores them the same way for LoRA
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter).items():
        if ".loran_" not in key:
            state[key] = value.detach().contiguous()
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(name): k for name, k in ranks.items() if k != common}
    config = LoraConfig(
        r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),  # scaling 1 everywhere
        target_modules="(" + "|".join(re.escape(name) for name in ranks) + ")",  # exactly the adapted modules
        lora_dropout=0.0, bias="none", fan_in_fan_out=conv1d,
        # PEFT adds a classifier's head names to modules_to_save again when it wraps the model: keep each once
        modules_to_save=list(dict.fromkeys(loran_config.modules_to_save)) if loran_config.modules_to_save else None,
        task_type=loran_config.task_type, base_model_name_or_path=loran_config.base_model_name_or_path,
        inference_mode=True,
    )
    return state, config, reports


def export_lora(
    model: nn.Module,
    output_dir: str,
    rank: Union[int, str],
    adapter: str = "default",
    sample_inputs: Optional[dict] = None,
    overwrite: bool = False,
    model_card: Optional[str] = None,
    tokenizer=None,
    extra_files: Optional[dict[str, str]] = None,
    card_note: str = "",
) -> dict:
    """Write ``model``'s LoRAN adapter as a standard PEFT LoRA adapter (loads with plain PEFT, no peft_loran).

    ``rank``: an int, or ``"auto:TOL"`` (per module the smallest rank with relative Frobenius error <= TOL; PEFT's
    ``rank_pattern`` records them). With ``sample_inputs`` (keyword arguments of the model's forward), the largest
    difference between the LoRAN model's and the exported LoRA model's outputs is measured too (on a copy of the
    base model, so it costs one more model's memory). Returns the report, also written as ``export_report.json``
    and into the adapter's ``README.md``. ``tokenizer`` (saved beside the adapter) and ``extra_files`` (name -> text,
    e.g. a classifier's label names) travel with it; ``card_note`` is appended to the default model card. Written to a temporary directory, then renamed into place.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_directory

    state, config, reports = lora_state_and_config(model, rank, adapter)
    report = {
        "format": "peft LoRA", "rank": str(rank), "source_adapter": adapter,
        "loran": {k: v for k, v in model.peft_config[adapter].to_dict().items()
                  if k in ("r", "loran_alpha", "activation", "sinter_amplitude", "sinter_frequency", "chain_dims",
                           "use_P", "use_b", "zero_centered")},
        "modules": [asdict(r) for r in reports],
        "max_relative_error": max(r.relative_error for r in reports),
    }
    if sample_inputs is not None:
        report["sample_outputs"] = compare_outputs(model, state, config, sample_inputs)
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as tmp:
            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "adapter_model.safetensors"))
            (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card or lora_model_card(report) + card_note)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
    except FileExistsError:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it.") from None
    return report


@torch.no_grad()
def compare_outputs(model: nn.Module, state: dict, config, sample_inputs: dict) -> dict:
    """Largest |LoRAN output - exported LoRA output| on ``sample_inputs``, and the same relative to the adapter's
    own effect (|LoRAN output - base output|)."""
    from peft import PeftModel, set_peft_model_state_dict

    was_training = model.training
    model.eval()
    loran_out = _logits(model(**sample_inputs))
    with model.disable_adapter():
        base_out = _logits(model(**sample_inputs))
    base_copy = copy.deepcopy(model).unload()  # PEFT takes the LoRAN layers out again: the plain base model
    if hasattr(base_copy, "peft_config"):  # PEFT marks the model it wraps; the copy is a plain base model again
        del base_copy.peft_config
    lora = PeftModel(base_copy, copy.deepcopy(config)).eval()
    set_peft_model_state_dict(lora, state)
    lora_out = _logits(lora(**sample_inputs))
    model.train(was_training)
    difference = (lora_out - loran_out).abs().max().item()
    effect = (loran_out - base_out).abs().max().item()
    return {"max_abs_difference": difference, "max_abs_adapter_effect": effect,
            "relative_to_adapter_effect": difference / effect if effect > 0 else 0.0}


def _logits(output) -> torch.Tensor:
    return (output.logits if hasattr(output, "logits") else output).float()


def lora_model_card(report: dict) -> str:
    rows = "\n".join(f"| `{m['module']}` | {m['shape'][0]}x{m['shape'][1]} | {m['rank']} | {m['relative_error']:.3e} |"
                     f" {m['energy_kept']:.9f} |" for m in report["modules"])
    sample = report.get("sample_outputs")
    sample_line = (f"On sample inputs the largest output difference to the LoRAN model was "
                   f"{sample['max_abs_difference']:.3e} ({sample['relative_to_adapter_effect']:.3e} of the adapter's "
                   f"own effect).\n\n" if sample else "")
    loran = report["loran"]
    return f"""---
library_name: peft
tags: [lora, loran-export]
---
# LoRA export of a LoRAN adapter

A standard PEFT LoRA adapter (rank {report['rank']}) made by `peft-loran export --to-lora` from a LoRAN adapter
(r={loran.get('r')}, alpha={loran.get('loran_alpha')}, activation `{loran.get('activation')}`, a={loran.get('sinter_amplitude')},
w={loran.get('sinter_frequency')}). Per module, `lora_B @ lora_A` is the best approximation of LoRAN's dense update
`s f(BA)` at that rank (truncated SVD); scaling is 1. Load it with plain PEFT (`PeftModel.from_pretrained`) or any
LoRA-serving stack; `peft_loran` is not needed.

Largest relative Frobenius error of a module's update: {report['max_relative_error']:.3e}.
{sample_line}| module | update | rank | relative error | energy kept |
|---|---|---|---|---|
{rows}
"""


@torch.no_grad()
def export_merged(model: nn.Module, output_dir: str, tokenizer=None, overwrite: bool = False) -> dict:
    """Write ``model`` with its LoRAN adapter(s) merged into the weights as a plain transformers model.

    Float bases keep their dtype. Quantized (bitsandbytes) bases are dequantized, the update added in float32 and
    the weights saved in bfloat16 (as PEFT does for LoRA), since a merged update cannot be stored in the 4/8-bit
    codes without losing it. Consumes ``model`` (its layers are replaced). Returns what it did."""
    from .atomic import atomic_directory

    quantized = _dequantize_merge(model)
    merged = model.merge_and_unload() if not quantized else model.get_base_model()
    note = {"quantized_base": quantized}
    if quantized:  # every quantized layer is a plain bf16 nn.Linear now: make the model say so too
        if hasattr(merged.config, "quantization_config"):
            delattr(merged.config, "quantization_config")
        merged.hf_quantizer = None
        merged.quantization_method = None
        merged.is_loaded_in_4bit = merged.is_loaded_in_8bit = False
        nn.Module.to(merged, torch.bfloat16)  # transformers' own .to refuses models it loaded quantized
        merged.config.dtype = torch.bfloat16
        note["saved_dtype"] = "bfloat16"
    else:
        note["saved_dtype"] = str(next(merged.parameters()).dtype).removeprefix("torch.")
    try:
        with atomic_directory(output_dir, overwrite=overwrite) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except FileExistsError:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it.") from None
    return note


def _dequantize_merge(model: nn.Module) -> bool:
    """For a bitsandbytes base: replace every quantized linear layer by a bf16 ``nn.Linear`` holding the
    dequantized weight plus, for adapted ones, the active LoRAN updates added in float32. False if not quantized."""
    base = model.get_base_model()
    quantized = [(n, m) for n, m in base.named_modules() if _is_bnb_linear(m)]
    if not quantized:
        return False
    from peft.utils.integrations import dequantize_module_weight

    def dequantized(layer):
        unpack_bnb_cpu_weight(layer)
        return dequantize_module_weight(layer).float()

    for name, module in list(base.named_modules()):
        if isinstance(module, LoranLayer):
            layer = module.get_base_layer()
            weight = dequantized(layer) if _is_bnb_linear(layer) else layer.weight.float()
            weight = weight.clone()
            for adapter in module.active_adapters:
                if adapter in module.loran_A:
                    module.add_update_(weight, adapter)
            _replace(base, name, _plain_linear(layer, weight))
    for name, module in list(base.named_modules()):
        if _is_bnb_linear(module):
            _replace(base, name, _plain_linear(module, dequantized(module)))
    return True


def _is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def _plain_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    bias = getattr(layer, "bias", None)
    plain = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
    return plain


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


__all__ = ["ModuleExport", "export_lora", "export_merged", "low_rank_factors", "lora_state_and_config", "parse_rank"]
