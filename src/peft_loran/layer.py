"""LoRAN tuner layers, in PEFT's house style.

One :class:`Linear` serves ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out``) and bitsandbytes 8-bit and
4-bit layers (PEFT's ``QuantizationBackend`` dequantizes for merging); :class:`Embedding` serves ``nn.Embedding``.
All math is in :mod:`peft_loran.functional`.

Forward paths of :class:`Linear` (the first that applies):

* adapters disabled / merged: the base layer alone;
* ``adapter_names=[...]`` (mixed batch): base output plus each adapter on its rows of the batch;
* no gradient needed, eager, and ``eval_cache``: a cached effective weight ``W + sum s f(BA)`` (float32 plain
  weights) or cached updates, rebuilt whenever anything they depend on changed (:mod:`peft_loran.cache`);
* otherwise: :class:`~peft_loran.functional.FusedLoranMatmul` (no grad or under ``torch.compile``: its plain
  forward, ``functional.fused_forward``), folded into the base GEMM when possible (plain float32 weight, no dropout
  active, no quantization, no hooks on the base layer).
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

from . import functional
from .activations import Activation
from .cache import EvalCache, EvalCacheHost
from .config import LoranConfig

BASE_ADAPTER_NAME = "__base__"


def unpack_bnb_cpu_weight(layer: nn.Module) -> None:
    """Undo bitsandbytes' in-place CPU repacking of a 4-bit weight (done on its first no-grad CPU forward), so that
    dequantizing it gives the real weight again (the next CPU forward repacks it)."""
    weight = getattr(layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


class WeightMerging:
    """Merging into the base weight, mixed into :class:`LoranLayer`: ``W <- W +/- s f(BA)`` built block by block
    beside the old weight (no dense delta), dequantized and re-quantized by PEFT's backend for bitsandbytes."""

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``s f(BA)`` of the given (default: active) adapters to the base weight.

        ``safe_merge=True`` builds the merged weight in a copy and refuses non-finite values before writing.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name not in self.loran_A:
                continue
            if self.quantization_backend is not None and not self.quantization_backend.supports_merge:
                raise TypeError(f"Merging is not supported for {self.quantization_backend.backend_name} layers.")
            self._shift_base_weight(name, +1.0, check_finite=safe_merge)
            self.merged_adapters.append(name)
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
        self._loran_cache.clear()

    def _shift_base_weight(self, adapter_name: str, sign: float, check_finite: bool = False) -> None:
        """``W <- W + sign * s f(BA)`` (dequantized and re-quantized for bitsandbytes by PEFT's backend). The new
        weight is built beside the old one (at least float32, page-aligned, the update added block by block: no
        dense delta), so a refused (non-finite) merge leaves ``W`` untouched."""
        weight = self.get_base_weight()
        shifted = functional.page_aligned_copy(weight, torch.promote_types(weight.dtype, torch.float32))
        self._add_delta_(shifted, adapter_name, sign)
        if shifted.dtype != weight.dtype:  # rounded once, to the base's own dtype
            shifted = functional.page_aligned_copy(shifted, weight.dtype)
        # checked after that rounding: a float16 weight overflows to inf there (above 65504), not in float32
        if check_finite and not torch.isfinite(shifted).all():
            raise ValueError(
                f"NaNs or infs detected in the merged weights. The adapter {adapter_name} seems to be broken."
            )
        self.set_base_weight(shifted)

    def _add_delta_(self, target: torch.Tensor, adapter_name: str, sign: float = 1.0) -> None:
        """``target += sign * s f(BA)`` in place for ``target`` in the base weight's layout, block by block."""
        self.low_rank_update(adapter_name).dense(add_to=target.T if self.fan_in_fan_out else target, sign=sign)


class LoranLayer(WeightMerging, EvalCacheHost, BaseTunerLayer):
    """State and behaviour shared by all LoRAN layers.

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
        self.loran_dropout = nn.ModuleDict({})
        self.loran_A = nn.ParameterDict({})
        self.loran_B = nn.ParameterDict({})
        self.loran_P = nn.ModuleDict({})
        self.loran_bias = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.loran_eval_cache: dict[str, bool] = {}
        self._loran_cache = EvalCache()
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        in_features, out_features = _get_in_out_features(base)
        if in_features is None or out_features is None:
            raise TypeError(f"LoRAN cannot adapt a layer of type {type(base).__name__}: its sizes are unknown.")
        self.in_features, self.out_features = in_features, out_features

    # ----------------------------------------------------------------------------------------------- geometry
    @property
    def update_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def _width_name(self) -> str:
        return "in_features"

    # ----------------------------------------------------------------------------------------------- creation
    def update_layer(self, adapter_name: str, config: LoranConfig, module_name: str = "", **_: Any) -> None:
        """Create (or re-create) the factors of ``adapter_name`` from ``config``; checks the chain fits."""
        rows, cols = self.update_shape
        r = config.r
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
        self.loran_A[adapter_name] = nn.Parameter(torch.empty(r, dims[0]))
        self.loran_B[adapter_name] = nn.Parameter(torch.empty(rows, r))
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
    def stages(self, adapter_name: str) -> list[functional.Stage]:
        Ps, bs = self.loran_P[adapter_name], self.loran_bias[adapter_name]
        return [
            (Ps[k] if len(Ps) else None, bs[k] if len(bs) else None) for k in range(len(self.loran_dims[adapter_name]))
        ]

    def _factors(self, adapter_name: str) -> list[torch.Tensor]:
        """``[A, B, *P, *b]`` of an adapter. Read from the containers' parameter dicts directly: this runs on
        every cached no-grad call (each generated token), where nn.Module attribute look-ups dominate."""
        modules = self._modules
        A = modules["loran_A"]._parameters[adapter_name]
        B = modules["loran_B"]._parameters[adapter_name]
        Ps = modules["loran_P"]._modules[adapter_name]._parameters.values()
        bs = modules["loran_bias"]._modules[adapter_name]._parameters.values()
        return [A, B, *Ps, *bs]

    def low_rank_update(self, adapter_name: str) -> functional.LowRankUpdate:
        """The adapter's update ``s f-chain(B A)`` as one object (factors, activation, scaling, block height)."""
        return functional.LowRankUpdate(
            self.loran_A[adapter_name], self.loran_B[adapter_name], self.stages(adapter_name),
            self.loran_activation[adapter_name], self.loran_scaling[adapter_name], self.loran_block_rows[adapter_name],
        )

    def dense_update(self, adapter_name: str) -> torch.Tensor:
        """``s * f-chain(B A)`` as a float32 ``(rows, cols)`` matrix."""
        return self.low_rank_update(adapter_name).dense()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update in the base weight's layout and dtype (transposed for ``fan_in_fan_out``)."""
        delta = self.dense_update(adapter_name)
        if self.fan_in_fan_out:
            delta = delta.T
        base_weight = self.get_base_layer().weight
        dtype = base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32
        return delta.to(dtype)

    # ------------------------------------------------------------------------------------------------ state
    def _grad_needed(self, x: torch.Tensor, adapters: list[str]) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for a in adapters for p in self._factors(a))

    def _dropout_active(self, adapter_name: str) -> bool:
        return self.training and isinstance(self.loran_dropout[adapter_name], nn.Dropout)

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

    def get_base_layer(self) -> nn.Module:
        """PEFT's walk down nested ``base_layer``s, without its ``hasattr`` (an AttributeError raised and caught
        per call): this runs on every generated token."""
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

    def _active_here(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.loran_A]

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The PEFT-wide cases (disabled, mixed batch, merged, nothing active) here; the adapted case in
        each layer's ``_adapted_forward``."""
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        adapters = self._active_here()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._loran_cache and self._grad_needed(x, adapters):
            # training resumed (e.g. after an evaluation inside the Trainer's loop): the next optimizer step makes
            # the cached updates stale anyway, so free them now instead of carrying them through training
            self._loran_cache.clear()
        return self._adapted_forward(x, adapters, *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``adapter_names=[...]``: each adapter's rows of the batch computed exactly as that adapter alone computes
        them (the same path and plan: the fused fold where it applies), ``"__base__"`` rows by the base layer."""
        parts = []
        for adapter_name in sorted(set(adapter_names)):
            rows = [i for i, name in enumerate(adapter_names) if name == adapter_name]
            if adapter_name == BASE_ADAPTER_NAME or adapter_name not in self.loran_A:
                out = self.base_layer(x[rows], *args, **kwargs)
            else:
                out = self._adapted_forward(x[rows], [adapter_name], *args, **kwargs)
            parts.append((rows, out))
        first = parts[0][1]
        result = first.new_empty((len(x), *first.shape[1:]))
        for rows, out in parts:
            result[rows] = out.to(result.dtype)
        return result

    def _adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's contribution (layers override this with something cheaper)."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in adapters:
            result = result + self._adapter_output(x, adapter_name).to(result.dtype)
        return result

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "loran." + super().__repr__()


class Linear(nn.Module, LoranLayer):
    """LoRAN on ``nn.Linear``, transformers ``Conv1D`` (``fan_in_fan_out=True``) and bitsandbytes linear layers."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoranConfig, module_name: str = "",
                 **kwargs: Any) -> None:
        super().__init__()
        LoranLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    # ------------------------------------------------------------------------------------------------ helpers
    def _plain_weight(self, base: nn.Module) -> Optional[torch.Tensor]:
        """The base weight (own layout) if the fused path may replace the base layer's own forward: exactly an
        ``nn.Linear`` or ``Conv1D`` (a subclass may have its own forward), a plain float32 tensor (not quantized,
        not a DTensor, not on the meta device), frozen, and no hooks (e.g. accelerate's offloading) on the layer."""
        weight = base._parameters.get("weight")
        if self.quantization_backend is not None or type(base) not in (nn.Linear, Conv1D):
            return None
        if (
            type(weight) not in (torch.Tensor, nn.Parameter)
            or weight.dtype != torch.float32
            or weight.requires_grad
            or weight.is_meta
            or base._forward_hooks
            or base._forward_pre_hooks
            or "_hf_hook" in base.__dict__  # accelerate's hook attribute (cheaper than hasattr on a Module)
        ):
            return None
        return weight

    @staticmethod
    def _base_bias(base: nn.Module) -> Optional[torch.Tensor]:
        return getattr(base, "bias", None)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapter's own contribution ``s * dropout(x) @ f(BA)^T`` (cached when no gradient is needed)."""
        if self._use_cache(x, [adapter_name]):
            dtype = functional.compute_dtype_for(x)
            nbytes = self.out_features * self.in_features * dtype.itemsize
            update = self._cached(
                ("delta", adapter_name, dtype), [adapter_name], lambda: self._dense_update_as(adapter_name, dtype),
                nbytes,
            )
            if update is not None:
                return F.linear(self.loran_dropout[adapter_name](x).to(dtype), update)
        return functional.loran_matmul(self.loran_dropout[adapter_name](x), self.low_rank_update(adapter_name))

    def _dense_update_as(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        update = self.dense_update(adapter_name)  # already page-aligned
        return update if update.dtype == dtype else functional.page_aligned_copy(update, dtype)

    def _effective_weight(self, weight: torch.Tensor, adapters: list[str]) -> Optional[torch.Tensor]:
        """Cached ``W + sum_a s_a f(B_a A_a)`` in the base weight's layout, for no-grad calls (rebuilt when
        anything it depends on changes)."""
        def build():  # float32 weights only (the fold's condition); page-aligned: see functional.empty_page_aligned
            total = functional.page_aligned_copy(weight)
            for a in adapters:
                self._add_delta_(total, a)
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

    # ---------------------------------------------------------------------------------------------- forward
    # nn.Module comes first in the bases and would shadow these
    forward, _apply, __getstate__ = LoranLayer.forward, LoranLayer._apply, LoranLayer.__getstate__

    def _adapted_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        weight = self._plain_weight(base) if not args and not kwargs else None
        # a weight can absorb the adapters whose input is x itself (no dropout active)
        foldable = [a for a in adapters if not self._dropout_active(a)] if weight is not None else []
        if foldable and functional.compute_dtype_for(x) == torch.float32:
            bias = self._base_bias(base)
            effective = self._effective_weight(weight, foldable) if self._use_cache(x, foldable) else None
            if effective is not None:
                result = self._base_op(x, effective, bias)
                rest = [a for a in adapters if a not in foldable]
            else:
                first = foldable[0]
                result = functional.loran_matmul(x, self.low_rank_update(first), weight=weight, bias=bias,
                                                 weight_in_out=self.fan_in_fan_out)
                rest = [a for a in adapters if a != first]
        else:
            result = self.base_layer(x, *args, **kwargs)
            rest = adapters
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in rest:
            result = result + self._adapter_output(x, adapter_name).to(result.dtype)
        return result


class Embedding(nn.Module, LoranLayer):
    """LoRAN on ``nn.Embedding``, in PEFT LoRA's (and the original's) orientation.

    The update is ``(embedding_dim, num_embeddings)``: ``B`` is ``(embedding_dim, r)`` (shared by all tokens),
    ``A`` is ``(r, num_embeddings)`` (one column per token; with ``P`` the per-token factor is the last ``P``,
    ``(d_K, num_embeddings)``), and token ``t`` looks up column ``t`` of ``s * chain(B A)``. This is the original
    code's math for its embedding adapters (the chain runs with the embedding dimension as rows) and the layout of
    PEFT's ``lora_embedding_A`` / ``lora_embedding_B``. Only the looked-up columns are built.
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

    def _adapter_output(self, ids: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s * chain(B A)[:, ids]^T``: each distinct token's column built once (eagerly; a compiled graph builds one
        per position, since ``unique`` has a data-dependent shape)."""
        flat = ids.reshape(-1)
        if torch.compiler.is_compiling():
            unique, inverse = flat, torch.arange(flat.numel(), device=flat.device)
        else:
            unique, inverse = torch.unique(flat, return_inverse=True)
        columns = functional.chain_columns(
            self.loran_B[adapter_name], self.loran_A[adapter_name], self.stages(adapter_name),
            self.loran_activation[adapter_name], unique,
        )
        out = (columns.T * self.loran_scaling[adapter_name])[inverse].reshape(*ids.shape, columns.shape[0])
        embed_scale = self._get_embed_scale()
        return out * embed_scale.to(out.dtype) if embed_scale is not None else out

    # nn.Module comes first in the bases and would shadow these
    forward, _apply, __getstate__ = LoranLayer.forward, LoranLayer._apply, LoranLayer.__getstate__
