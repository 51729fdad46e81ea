"""LoRAN tuner layers, in PEFT's house style: :class:`Linear` (``nn.Linear``, transformers' ``Conv1D`` with
``fan_in_fan_out``, bitsandbytes 8-bit and 4-bit layers) and :class:`Embedding`. The math is the adapter's
:class:`~peft_loran.update.LowRankUpdate`; a layer holds the factors and decides, per call, what to add.

``Linear.forward`` (the first that applies): adapters disabled, merged or none active: the base layer alone; a mixed
batch (``adapter_names=[...]``): each adapter's rows through the single-adapter path; otherwise the base output plus
every active adapter, where the adapters without dropout on a plain float32 weight are folded into the base GEMM
(``x (W + s f(BA))^T``, block by block), and, with the eval cache on and no gradient needed, read from a cached
effective weight or update (:mod:`peft_loran.cache`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .activations import Activation
from .cache import EvalCache
from .config import LoranConfig
from .kernels import Stage
from .update import LowRankUpdate, page_aligned_copy

BASE_ADAPTER_NAME = "__base__"


def unpack_bnb_cpu_weight(layer: nn.Module) -> None:
    """Undo bitsandbytes' in-place CPU repacking of a 4-bit weight (done on its first no-grad CPU forward), so that
    dequantizing it gives the real weight again (the next CPU forward repacks it)."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


class LoranLayer(BaseTunerLayer):
    """State and behaviour shared by the LoRAN layers.

    The update has the orientation ``(rows, cols)`` = ``(out_features, in_features)``; for embeddings that is
    ``(embedding_dim, num_embeddings)``, the transpose of the table (``fan_in_fan_out``). ``A`` is ``(r, d_1)``,
    ``B`` is ``(rows, r)``, ``P_k`` is ``(d_k, d_{k+1})`` and ``b_k`` is ``(d_{k+1},)``; the last width is ``cols``.
    """

    adapter_layer_names: tuple[str, ...] = ("loran_A", "loran_B", "loran_P", "loran_bias")
    other_param_names: tuple[str, ...] = (
        "loran_scaling", "loran_dropout", "loran_activation", "loran_dims", "loran_block_rows", "loran_eval_cache",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.loran_scaling: dict[str, float] = {}
        self.loran_activation: dict[str, Activation] = {}
        self.loran_dims: dict[str, list[int]] = {}
        self.loran_block_rows: dict[str, Optional[int]] = {}
        self.loran_eval_cache: dict[str, bool] = {}
        self.loran_dropout = nn.ModuleDict({})
        self.loran_A = nn.ParameterDict({})
        self.loran_B = nn.ParameterDict({})
        self.loran_P = nn.ModuleDict({})
        self.loran_bias = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._loran_cache = EvalCache()
        self.fan_in_fan_out = False
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        in_features, out_features = _get_in_out_features(base)
        if in_features is None or out_features is None:
            raise TypeError(f"LoRAN cannot adapt a layer of type {type(base).__name__}: its sizes are unknown.")
        self.in_features, self.out_features = in_features, out_features

    @property
    def update_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _width_name(self) -> str:
        return "in_features"

    # ----------------------------------------------------------------------------------------------- creation
    def update_layer(self, adapter_name: str, config: LoranConfig, module_name: str = "", **_: Any) -> None:
        """Create (or re-create) the factors of ``adapter_name`` from ``config``; checks the chain fits."""
        rows, cols = self.update_shape
        where = f"module '{module_name}'" if module_name else f"{type(self.get_base_layer()).__name__}"
        dims, outs = config.chain_widths(rows, cols, self._width_name(), where)
        self.loran_scaling[adapter_name] = config.scaling
        self.loran_dims[adapter_name] = dims
        self.loran_block_rows[adapter_name] = config.block_rows
        self.loran_eval_cache[adapter_name] = config.eval_cache
        self.loran_activation[adapter_name] = config.build_activation(in_features=dims[0])
        self.loran_dropout[adapter_name] = (
            nn.Dropout(p=config.loran_dropout) if config.loran_dropout > 0 else nn.Identity()
        )
        self.loran_A[adapter_name] = nn.Parameter(torch.empty(config.r, dims[0]))
        self.loran_B[adapter_name] = nn.Parameter(torch.empty(rows, config.r))
        self.loran_P[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.empty(d_in, d_out)) for d_in, d_out in zip(dims, outs)] if config.use_P else []
        )
        self.loran_bias[adapter_name] = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_out)) for d_out in outs] if config.use_b else []
        )
        self.reset_loran_parameters(adapter_name, config.init_weights)
        if config.init_weights and not config.zero_centered and len(self.loran_P[adapter_name]):
            # the original's init: with f(0) != 0 only a zero last P makes the initial update vanish
            nn.init.zeros_(self.loran_P[adapter_name][-1])
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._loran_cache.clear()
        self.set_adapter(self.active_adapters)

    def reset_loran_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """``init_weights=True``: ``B = 0`` so the update is exactly zero; else every factor random non-zero."""
        A, B = self.loran_A[adapter_name], self.loran_B[adapter_name]
        with torch.no_grad():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            for P in self.loran_P[adapter_name]:
                nn.init.kaiming_uniform_(P, a=math.sqrt(5))
            if init_weights:
                nn.init.zeros_(B)
            else:
                nn.init.normal_(B, std=0.1)
                for b in self.loran_bias[adapter_name]:
                    nn.init.normal_(b, std=0.1)

    # ---------------------------------------------------------------------------------------------- the math
    def low_rank_update(self, adapter_name: str) -> LowRankUpdate:
        """The adapter's update ``s f-chain(B A)`` (factors, activation, scaling, shape, block height). Reads the
        containers' parameter dicts directly: this runs on every call, where nn.Module attribute look-ups cost."""
        modules = self._modules
        Ps = tuple(modules["loran_P"]._modules[adapter_name]._parameters.values())
        bs = tuple(modules["loran_bias"]._modules[adapter_name]._parameters.values())
        stages = []
        for k in range(len(self.loran_dims[adapter_name])):
            stages.append(Stage(Ps[k] if Ps else None, bs[k] if bs else None))
        return LowRankUpdate(modules["loran_A"]._parameters[adapter_name], modules["loran_B"]._parameters[adapter_name],
                             tuple(stages), self.loran_activation[adapter_name], self.loran_scaling[adapter_name],
                             (self.out_features, self.in_features), not Ps and not bs and len(stages) == 1,
                             self.loran_block_rows[adapter_name])

    def add_update_(self, target: torch.Tensor, adapter_name: str, sign: float = 1.0) -> torch.Tensor:
        """``target += sign * s f(BA)`` in place, ``target`` in the base weight's layout (``(in, out)`` with
        ``fan_in_fan_out``) and any float dtype, each block summed in float32 and rounded once; no graph kept. The one
        way an update reaches a weight: ``get_delta_weight``, merging, the eval cache and export use it."""
        self.low_rank_update(adapter_name).add_to_(target.T if self.fan_in_fan_out else target, sign)
        return target

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's layout and dtype (float32 for quantized weights)."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        shape = self.update_shape[::-1] if self.fan_in_fan_out else self.update_shape
        return self.add_update_(torch.zeros(shape, dtype=dtype, device=weight.device), adapter_name)

    # ------------------------------------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``s f(BA)`` of the given (default: active) adapters to the base weight, block by block (no dense
        delta, no graph). ``safe_merge=True`` adds into a copy and refuses non-finite values before writing."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.loran_A:
                continue
            if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
                raise TypeError(f"Merging is not supported for {self.quantization_backend.backend_name} layers.")
            self._shift_base_weight(name, +1.0, check_finite=safe_merge)
            self.merged_adapters.append(name)
        if self._loran_cache:
            self._loran_cache.clear()

    def unmerge(self) -> None:
        """Subtract the merged adapters' updates again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.loran_A:
                self._shift_base_weight(name, -1.0)
        if self._loran_cache:
            self._loran_cache.clear()

    def _shift_base_weight(self, adapter_name: str, sign: float, check_finite: bool = False) -> None:
        """``W += sign * s f(BA)``: in place for a plain float weight; in a copy for ``check_finite`` (refused
        non-finite values leave ``W`` untouched) and for quantized weights (dequantized and re-quantized by PEFT's
        backend)."""
        weight = self.get_base_layer().weight
        if self.quantization_backend is None and not check_finite and type(weight) in (torch.Tensor, nn.Parameter):
            self.add_update_(weight.data, adapter_name, sign)
            return
        shifted = self.add_update_(page_aligned_copy(self.get_base_weight()), adapter_name, sign)
        if check_finite and not torch.isfinite(shifted).all():  # after the rounding to the weight's dtype
            raise ValueError(
                f"NaNs or infs detected in the merged weights. The adapter {adapter_name} seems to be broken."
            )
        self.set_base_weight(shifted)

    # --------------------------------------------------------------------------------------------- PEFT hooks
    def get_base_layer(self) -> nn.Module:
        """PEFT's walk down nested ``base_layer``s, without its ``hasattr`` (an AttributeError raised and caught per
        call): this runs on every generated token."""
        layer: nn.Module = self
        while (inner := layer._modules.get("base_layer")) is not None:
            layer = inner
        return layer

    def get_base_weight(self) -> torch.Tensor:
        """The base weight, dequantized for bitsandbytes layers (PEFT's backend), after undoing bitsandbytes' CPU
        repacking: its first no-grad CPU forward rewrites a 4-bit weight into a layout that dequantizing reads as
        garbage, which would make a merge after inference silently wrong."""
        unpack_bnb_cpu_weight(self.get_base_layer())
        return super().get_base_weight()

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._loran_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._loran_cache.clear()

    def _check_forward_args(self, x, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    # ------------------------------------------------------------------------------------------------ calls
    def _call_adapters(self, x: torch.Tensor, adapter_names: Optional[list[str]]) -> Optional[list[str]]:
        """The active adapters this call adds (``[]`` for a mixed batch, which names its own), or None when the base
        layer alone answers: adapters disabled (merged ones are unmerged first, as in PEFT), merged, none active
        here."""
        if adapter_names is not None:
            self._check_forward_args(x, adapter_names=adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return None
        if adapter_names is not None:
            return []
        if self.merged:
            return None
        active = []
        for name in self.active_adapters:
            if name in self.loran_A:
                active.append(name)
        return active or None

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``adapter_names=[...]``: each adapter's rows of the batch computed exactly as that adapter alone computes
        them (the same path and plan), ``"__base__"`` rows by the base layer."""
        parts = []
        for adapter_name in sorted(set(adapter_names)):
            rows = [i for i, name in enumerate(adapter_names) if name == adapter_name]
            if adapter_name == BASE_ADAPTER_NAME or adapter_name not in self.loran_A:
                out = self.base_layer(x[rows], *args, **kwargs)
            else:
                out = self._adapted(x[rows], [adapter_name], *args, **kwargs)
            parts.append((rows, out))
        first = parts[0][1]
        result = first.new_empty((len(x), *first.shape[1:]))
        for rows, out in parts:
            result[rows] = out.to(result.dtype)
        return result

    def _adapted(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- eval cache
    def _cache_serves(self, adapters: list[str], grad: bool) -> bool:
        """The eval cache serves eager no-grad calls of adapters that have it on (while ``torch.compile`` traces, the
        update is computed in the graph: reading data pointers or page-aligned copies would break it)."""
        if grad or torch.compiler.is_compiling():
            return False
        for name in adapters:
            if not self.loran_eval_cache.get(name, False):
                return False
        return True

    def _cached(self, slot: tuple, adapters: list[str], build, nbytes: int, weight: Optional[torch.Tensor] = None):
        """The cache's value for ``slot``, rebuilt whenever the adapters' factors, scaling, activation or the base
        weight changed; None when it does not fit the budget."""
        factors = [t for a in adapters for t in self.low_rank_update(a).tensors() if t is not None]
        settings = [(self.loran_scaling[a], self.loran_activation[a]) for a in adapters]
        return self._loran_cache.get_or_build(slot, factors, settings, build, nbytes, weight)

    def __repr__(self) -> str:
        return "loran." + super().__repr__()


class LoranModule(nn.Module):
    """``nn.Module`` for the LoRAN layers (it comes first in their bases, as in PEFT's): ``.to()``/``.half()`` and
    copies leave the eval cache behind, since its tensors belong to the old device, dtype or object."""

    def _apply(self, fn, recurse: bool = True):
        self._loran_cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_loran_cache": EvalCache()}


class Linear(LoranModule, LoranLayer):
    """LoRAN on ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out=True``) and bitsandbytes linear layers."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoranConfig, module_name: str = "",
                 **kwargs: Any) -> None:
        super().__init__()
        LoranLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        active = self._call_adapters(x, adapter_names)
        if active is None:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        return self._adapted(x, active, *args, **kwargs)

    def _adapted(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each adapter's: the adapters without active dropout folded into the base GEMM where the
        base is a plain frozen float32 ``nn.Linear``/``Conv1D`` (no quantization, no hooks, nothing else passed), the
        rest added."""
        device_type = x.device.type  # the compute dtype, decided once for the call
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        grad = torch.is_grad_enabled() and x.requires_grad
        if torch.is_grad_enabled() and not grad:
            for name in adapters:
                if self.loran_B[name].requires_grad or self.loran_A[name].requires_grad:
                    grad = True
                    break
        if grad and self._loran_cache:  # training resumed: the next optimizer step makes cached updates stale anyway
            self._loran_cache.clear()
        base = self.base_layer
        while (inner := base._modules.get("base_layer")) is not None:  # get_base_layer(), inlined: every call runs it
            base = inner
        weight = base._parameters.get("weight")
        foldable = []
        if (dtype == torch.float32 and not args and not kwargs and self.quantization_backend is None
                and type(base) in (nn.Linear, Conv1D) and type(weight) in (torch.Tensor, nn.Parameter)
                and weight.dtype == torch.float32 and not weight.requires_grad and not weight.is_meta
                and not base._forward_hooks and not base._forward_pre_hooks and "_hf_hook" not in base.__dict__):
            for name in adapters:
                if not (self.training and isinstance(self.loran_dropout[name], nn.Dropout)):
                    foldable.append(name)
        rest = adapters
        if foldable:
            bias = base.bias
            cached = not grad and any(self.loran_eval_cache.values()) and self._cache_serves(foldable, grad)
            effective = self._effective_weight(weight, foldable) if cached else None
            if effective is not None:
                result = self._base_op(x, effective, bias)
            else:
                foldable = foldable[:1]
                result = self.low_rank_update(foldable[0]).fused_matmul(x, dtype, weight, bias, self.fan_in_fan_out)
            rest = []
            for name in adapters:
                if name not in foldable:
                    rest.append(name)
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in rest:
            result = result + self._adapter_output(x, adapter_name, dtype, grad).to(result.dtype)
        return result

    def _adapter_output(self, x: torch.Tensor, adapter_name: str, dtype: torch.dtype, grad: bool) -> torch.Tensor:
        """The adapter's own contribution ``s * dropout(x) @ f(BA)^T`` (from the eval cache where it serves)."""
        xd = self.loran_dropout[adapter_name](x)
        if not grad and self.loran_eval_cache[adapter_name] and self._cache_serves([adapter_name], grad):
            nbytes = self.out_features * self.in_features * dtype.itemsize
            update = self._cached(("delta", adapter_name, dtype), [adapter_name],
                                  lambda: self._dense_update(adapter_name, dtype), nbytes)
            if update is not None:
                return F.linear(xd.to(dtype), update)
        return self.low_rank_update(adapter_name).fused_matmul(xd, dtype)

    def _dense_update(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        dense = self.low_rank_update(adapter_name).dense()  # page-aligned already
        return dense if dense.dtype == dtype else page_aligned_copy(dense, dtype)

    def _effective_weight(self, weight: torch.Tensor, adapters: list[str]) -> Optional[torch.Tensor]:
        """Cached ``W + sum_a s_a f(B_a A_a)`` in the base weight's layout (page-aligned: see
        :func:`~peft_loran.update.empty_page_aligned`), rebuilt when anything it depends on changes."""
        def build():
            total = page_aligned_copy(weight)
            for name in adapters:
                self.add_update_(total, name)
            return total

        return self._cached(("weight", tuple(adapters)), adapters, build, weight.numel() * weight.dtype.itemsize,
                            weight=weight)

    def _base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The base layer's own computation with ``weight`` in place of its weight (Linear or Conv1D)."""
        if not self.fan_in_fan_out:
            return F.linear(x, weight, bias)
        out = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, out, weight) if bias is not None else out @ weight
        return out.reshape(*x.shape[:-1], weight.shape[1])


class Embedding(LoranModule, LoranLayer):
    """LoRAN on ``nn.Embedding``, in PEFT LoRA's (and the original's) orientation.

    The update is ``(embedding_dim, num_embeddings)``: ``B`` is ``(embedding_dim, r)`` (shared by all tokens), ``A``
    is ``(r, num_embeddings)`` (one column per token; with ``P`` the per-token factor is the last ``P``), and token
    ``t`` looks up column ``t`` of ``s * chain(B A)``: the original code's math for its embedding adapters and the
    layout of PEFT's ``lora_embedding_A`` / ``lora_embedding_B``. Only the looked-up columns are built.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoranConfig, module_name: str = "",
                 **kwargs: Any) -> None:
        super().__init__()
        LoranLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = True  # the embedding table is (num_embeddings, embedding_dim): the update's transpose
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def _width_name(self) -> str:
        return "num_embeddings"

    def reset_loran_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """As PEFT's LoRA embeddings: the per-token factor (``A``, or the last ``P`` of a chain) is zero and the
        shared ``B`` random, so the update starts at exactly zero while every factor gets a gradient from the first
        step (the original set both ``A`` and ``B`` to zero, and its embedding adapters never trained)."""
        super().reset_loran_parameters(adapter_name, init_weights=False)
        if init_weights:
            with torch.no_grad():
                nn.init.normal_(self.loran_B[adapter_name])
                Ps = self.loran_P[adapter_name]
                nn.init.zeros_(Ps[-1] if len(Ps) else self.loran_A[adapter_name])
                for b in self.loran_bias[adapter_name]:
                    nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        active = self._call_adapters(x, adapter_names)
        if active is not None and adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in active or ():
            result = result + self._adapter_output(x, adapter_name).to(result.dtype)
        return result

    def _adapted(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One adapter's rows of a mixed batch."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in adapters:
            result = result + self._adapter_output(x, adapter_name).to(result.dtype)
        return result

    def _adapter_output(self, ids: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s * chain(B A)[:, ids]^T``: each distinct token's column built once (eagerly; a compiled graph builds one
        per position, since ``unique`` has a data-dependent shape)."""
        flat = ids.reshape(-1)
        if torch.compiler.is_compiling():
            unique, inverse = flat, torch.arange(flat.numel(), device=flat.device)
        else:
            unique, inverse = torch.unique(flat, return_inverse=True)
        columns = self.low_rank_update(adapter_name).columns(unique)
        out = (columns.T * self.loran_scaling[adapter_name])[inverse].reshape(*ids.shape, columns.shape[0])
        embed_scale = self._get_embed_scale()
        return out * embed_scale.to(out.dtype) if embed_scale is not None else out
