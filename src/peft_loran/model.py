"""``LoranModel`` (PEFT ``BaseTuner``): target matching, layer creation, mixed-batch hooks, registration."""

from __future__ import annotations

import copy
import functools
import re
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compat import convert_original_state_dict
from .compat import MLORA, MLoraConfig
from .config import LORAN, LoranConfig
from .cache import CacheBudget
from .layer import Embedding, Linear, LoranLayer


def _adapter_names_pre_forward_hook(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LoranModel(BaseTuner):
    """Creates a LoRAN model from a pretrained model: each target layer gets ``W + (alpha/r) f(B A)``.

    Use it through PEFT (``get_peft_model(model, LoranConfig(...))``) after ``import peft_loran``.
    Default ``target_modules`` per architecture are PEFT's LoRA defaults (q/v projections for Llama).
    """

    prefix: str = "loran_"
    tuner_layer_cls = LoranLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        loran_config: LoranConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, LoranLayer):
            target.update_layer(adapter_name, loran_config, module_name=current_key)
            return
        new_module = self._create_new_module(loran_config, adapter_name, target, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: LoranConfig, adapter_name: str, target: nn.Module, module_name: str = ""):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, config, module_name=module_name)
        if isinstance(base, nn.Linear):  # includes bitsandbytes Linear8bitLt / Linear4bit
            if config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False."
                )
                config = copy.copy(config)
                config.fan_in_fan_out = False
            return Linear(target, adapter_name, config, module_name=module_name)
        if isinstance(base, Conv1D):
            if not config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
                )
                config = copy.copy(config)
                config.fan_in_fan_out = True
            return Linear(target, adapter_name, config, module_name=module_name)
        raise TypeError(
            f"Target module '{module_name}' of type {type(base).__name__} is not supported by LoRAN. Supported "
            "types: torch.nn.Linear, torch.nn.Embedding, transformers' Conv1D and bitsandbytes Linear8bitLt / "
            "Linear4bit. Remove it from `target_modules` (or use `exclude_modules`)."
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Route ``adapter_names=[...]`` (one name per batch row, ``"__base__"`` for none) to every layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for layer in self.modules():
            if isinstance(layer, LoranLayer):
                known |= set(layer.loran_A.keys())
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams", None)
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (LoranLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Also accepts the original implementation's ``mlora_*`` keys and layouts, and refuses a checkpoint that
        would leave any LoRAN parameter of the adapter unloaded (or holds LoRAN tensors that fit no module):
        PEFT only warns, and the adapter then silently does nothing."""
        state_dict = convert_original_state_dict(state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_keys(model, adapter_name, remapped)
        return remapped

    def set_eval_cache(self, enabled: bool, max_mb: Optional[float] = None) -> None:
        """Switch the no-grad cache of dense updates on or off for every LoRAN layer (frees it when off), with an
        optional memory budget in MB for all of them together."""
        set_eval_cache(self.model, enabled, max_mb)


def set_eval_cache(model: nn.Module, enabled: bool, max_mb: Optional[float] = None) -> None:
    """Switch the no-grad cache of every LoRAN layer in ``model`` on or off (off frees the memory).

    ``max_mb`` bounds what all layers' caches hold together (each cached tensor is one weight-sized matrix per
    adapted layer): layers whose tensor no longer fits compute their update on every call instead, which costs
    speed but no memory. ``None``: no bound."""
    budget = CacheBudget(max_mb * 2**20) if (enabled and max_mb is not None) else None
    for module in model.modules():
        if isinstance(module, LoranLayer):
            for adapter in module.loran_A:
                module.loran_eval_cache[adapter] = bool(enabled)
            module._loran_cache.clear()
            module._loran_cache.budget = budget


_ADAPTER_KEY = re.compile(r"\.loran_(A|B|P|bias)(\.|$)")
_PEFT_PREFIX = "base_model.model."


def check_adapter_keys(model: nn.Module, adapter_name: str, checkpoint: dict) -> None:
    """Raise a clear error when ``checkpoint`` (keys already mapped onto ``model``) misses LoRAN parameters of
    ``adapter_name``, holds LoRAN tensors that match no module, or has a tensor of the wrong shape."""
    model_tensors = model.state_dict()
    expected = {
        key: t for key, t in model_tensors.items()
        if (m := _ADAPTER_KEY.search(key)) and key[m.end():].split(".")[0] == adapter_name
    }
    found = {key: t for key, t in checkpoint.items() if _ADAPTER_KEY.search(key) or ".mlora_" in key}

    def locate(key):
        return key if key in model_tensors else key.removeprefix(_PEFT_PREFIX)

    missing = sorted(set(expected) - {locate(k) for k in found})
    unexpected = sorted(k for k in found if locate(k) not in model_tensors)
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(t.shape)}, model {tuple(model_tensors[locate(k)].shape)}"
        for k, t in found.items() if locate(k) in model_tensors and tuple(t.shape) != tuple(model_tensors[locate(k)].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return

    def first(keys):
        return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} LoRAN parameter(s) of the model are not in the checkpoint: {first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} adapter tensor(s) in the checkpoint match no module: {first(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) have another shape: {first(wrong_shape)}")
    raise ValueError(
        f"Cannot load adapter {adapter_name!r}: " + "; ".join(problems) + ". Loading would leave the adapter (partly) "
        "at its initial values, so it would compute something else than it was trained to. Likely causes: another "
        "base model than the one the adapter was trained on, or different target_modules / module names (e.g. a "
        "renamed layer). Load it onto the base model it was trained with."
    )


def _strict_transformers_load_adapter(original):
    """transformers' ``model.load_adapter`` loads adapters with its own loader and only logs missing keys; for a LoRAN
    adapter that would be a silently inactive adapter, so refuse it (and take the half-loaded adapter out again)."""

    @functools.wraps(original)
    def load_adapter(self, peft_model_id=None, adapter_name=None, *args, **kwargs):
        info = original(self, peft_model_id, adapter_name, *args, **kwargs)
        name = adapter_name or "default"
        config = getattr(self, "peft_config", {}).get(name)
        if not isinstance(config, LoranConfig) or info is None:
            return info
        problems = [(what, sorted(keys)) for what, keys in (
            ("missing from the checkpoint", {k for k in info.missing_keys if _ADAPTER_KEY.search(k)}),
            ("in the checkpoint but matching no module", {k for k in info.unexpected_keys if "loran_" in k}),
            ("of another shape", {k[0] for k in getattr(info, "mismatched_keys", ())}),
        ) if keys]
        if problems:
            self.delete_adapter(name)
            details = "; ".join(f"{len(keys)} LoRAN tensor(s) {what}: {', '.join(keys[:3])}" for what, keys in problems)
            raise ValueError(
                f"Cannot load adapter {name!r} from {peft_model_id}: {details}. The adapter would compute something "
                "else than it was trained to. Likely causes: another base model, or renamed modules."
            )
        return info

    load_adapter._peft_loran_strict = True
    return load_adapter


def register_with_peft() -> None:
    """Fill PEFT's method tables so that PEFT and transformers know ``LORAN`` (and read ``MLORA`` checkpoints).

    ``peft.utils.register_peft_method`` only accepts names already in PEFT's enum, hence the direct table writes.
    Also makes transformers' ``load_adapter`` refuse a LoRAN checkpoint that leaves adapter weights unloaded
    (for other adapter types it behaves as before). Idempotent.
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LORAN] = LoranConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[LORAN] = LoranModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LORAN] = LoranModel.prefix
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[MLORA] = MLoraConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[MLORA] = LoranModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[MLORA] = LoranModel.prefix
    from transformers.integrations.peft import PeftAdapterMixin

    if not getattr(PeftAdapterMixin.load_adapter, "_peft_loran_strict", False):
        PeftAdapterMixin.load_adapter = _strict_transformers_load_adapter(PeftAdapterMixin.load_adapter)


__all__ = ["LoranModel", "register_with_peft", "set_eval_cache"]
