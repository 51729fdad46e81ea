"""One adapter's update of one layer, ``D = scaling * chain(B A)`` of shape ``(out, in)``: its factors, the one block
loop over its plan, and what the layers need of it (the fused matmul, a dense copy, adding it to a weight).

Row view of the (original MLoRA) chain::

    H_0 = B @ A                                  B: (out, r), A: (r, d_1)
    H_k = f(H_{k-1}) @ P_k + b_k                 P_k: (d_k, d_{k+1}) optional, b_k: (d_{k+1},) optional
    D = scaling * H_K                            last width is ``in``

Plain LoRAN is one stage with neither ``P`` nor ``b``: ``D = scaling * f(B @ A)``. Every row of ``D`` depends only
on the same row of ``B``, so ``D`` is computed in blocks of rows: one block alive at a time, built, used and dropped,
in forward and (rebuilt) in backward. How many rows and by which kernel is the call's :class:`~peft_loran.plan.
BlockPlan`; the non-linearity always runs in float32 or float64 (with ``w = 1e4`` half precision leaves nothing of
``sin(w x)``): the factors are promoted once per update object, and autocast is off inside the block loop.

A call goes down: layer -> :class:`LowRankUpdate` -> :mod:`peft_loran.plan` -> :mod:`peft_loran.kernels` ->
:mod:`peft_loran.activations`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import torch

from .activations import Activation
from .kernels import BlockGrads, Stage, chain_rows
from .plan import BlockPlan, make_plan


class Block(NamedTuple):
    """Rows ``[i0, i1)`` of an update: ``value`` (``base`` rows plus the update's, or None when not asked for) and,
    when an upstream gradient was given, the block's ``grads``."""

    i0: int
    i1: int
    value: Optional[torch.Tensor]
    grads: Optional[BlockGrads]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


# ------------------------------------------------------------------------------------------------ memory
#: Page size for :func:`empty_page_aligned`.
PAGE_BYTES = 4096


def empty_page_aligned(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` whose data starts on a page boundary on CPU (elsewhere plain ``torch.empty``).

    Why: weights read on every call (the eval cache) are allocated after the model, and after large frees glibc
    serves them from its heap at arbitrary page offsets. Matrix-vector products (decoding) against such copies ran
    up to 17% slower than against the model's own page-aligned weights, and generation 6-8% slower
    (``benchmarks/placement_ab.py``). The cost is at most one page per tensor."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    raw = torch.empty(numel + PAGE_BYTES // dtype.itemsize, dtype=dtype, device=device)
    shift = (-raw.data_ptr() % PAGE_BYTES) // dtype.itemsize  # CPU data is 64-byte aligned, so this is exact
    return raw[shift : shift + numel].view(shape)


def page_aligned_copy(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A copy of ``t`` (cast to ``dtype``) in :func:`empty_page_aligned` storage."""
    return empty_page_aligned(t.shape, dtype or t.dtype, t.device).copy_(t)


# ---------------------------------------------------------------------------------------------- the update
@dataclass(frozen=True)
class LowRankUpdate:
    """One adapter's update of one layer (see the module docstring). ``shape`` is ``(out, in)``; ``plain`` says it
    is the paper's ``f(B A)`` (one stage, no ``P`` or ``b``); :meth:`of` works both out. ``block_rows`` (the
    config's) overrides the plan's height."""

    A: torch.Tensor
    B: torch.Tensor
    stages: tuple[Stage, ...]
    activation: Activation
    scaling: float
    shape: tuple[int, int]
    plain: bool
    block_rows: Optional[int] = None

    @classmethod
    def of(cls, A: torch.Tensor, B: torch.Tensor, stages: Sequence, activation: Activation, scaling: float,
           block_rows: Optional[int] = None) -> "LowRankUpdate":
        """The update of these factors (``stages``: ``(P, b)`` pairs), its shape and plainness worked out."""
        stages = tuple(Stage(*s) for s in stages)
        width = A.shape[1]
        for P, b in stages:
            width = P.shape[1] if P is not None else (b.shape[0] if b is not None else width)
        plain = len(stages) == 1 and stages[0].P is None and stages[0].b is None
        return cls(A, B, stages, activation, scaling, (B.shape[0], width), plain, block_rows)

    # ------------------------------------------------------------------------------------------ the tensors
    def tensors(self) -> list[Optional[torch.Tensor]]:
        """``[A, B, P_1, b_1, ...]`` (None where a stage has no P or b): what autograd differentiates."""
        flat = [self.A, self.B]
        for P, b in self.stages:
            flat += [P, b]
        return flat

    def with_tensors(self, flat: Sequence[Optional[torch.Tensor]]) -> "LowRankUpdate":
        """The same update on other tensors, in :meth:`tensors`' order."""
        stages = []
        for i in range(2, len(flat), 2):
            stages.append(Stage(flat[i], flat[i + 1]))
        return dataclasses.replace(self, A=flat[0], B=flat[1], stages=tuple(stages))

    def in_float64(self) -> "LowRankUpdate":
        """Detached float64 factors (statistics that resolve Sinter's 2.5e-9 share at the paper's setting)."""
        return self.with_tensors([None if t is None else t.detach().double() for t in self.tensors()])

    def promoted(self) -> tuple[torch.Tensor, torch.Tensor, tuple[Stage, ...]]:
        """``(A, B, stages)`` in float32 (float64 stays): the one place the factors are promoted, once per object
        (kept in the object's ``__dict__``; ``functools.cached_property`` takes a lock ``torch.compile`` cannot
        trace)."""
        kept = self.__dict__.get("_promoted")
        if kept is not None:
            return kept
        A = self.A.to(torch.promote_types(self.A.dtype, torch.float32))
        B = self.B.to(torch.promote_types(self.B.dtype, torch.float32))
        stages = []
        for P, b in self.stages:
            stages.append(Stage(None if P is None else P.to(torch.promote_types(P.dtype, torch.float32)),
                                None if b is None else b.to(torch.promote_types(b.dtype, torch.float32))))
        kept = (A, B, tuple(stages))
        object.__setattr__(self, "_promoted", kept)  # a frozen dataclass: its fields stay as they are
        return kept

    # --------------------------------------------------------------------------------------- the block loop
    def plan(self, device: Optional[torch.device] = None, autograd: Optional[bool] = None,
             budget: Optional[int] = None, target: Optional[str] = None) -> BlockPlan:
        """:func:`~peft_loran.plan.make_plan` for this update (device: the factors'; ``autograd``: whether autograd
        must see the operations, by default when gradients are enabled and a factor requires them)."""
        if autograd is None:
            autograd = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.tensors())
        return make_plan(*self.shape, self.activation, self.plain, device or self.A.device, autograd,
                         self.block_rows, budget, target)

    def blocks(self, plan: Optional[BlockPlan] = None, base: Optional[torch.Tensor] = None,
               upstream: Optional[tuple[torch.Tensor, torch.Tensor]] = None, need_value: bool = True,
               out_dtype: Optional[torch.dtype] = None) -> Iterator[Block]:
        """The one row-block loop: per block of ``plan`` (default :meth:`plan`), ``base[i0:i1] + D[i0:i1]`` (``base``
        in the update's orientation; None: ``D``'s rows alone) in ``out_dtype`` (default: the factors' float32 or
        float64), and, given ``upstream = (G, X)``, the block's gradients for ``dD[i0:i1] = G[:, i0:i1]^T X``."""
        plan = plan or self.plan()
        A, B, stages = self.promoted()
        out_dtype = out_dtype or A.dtype
        rows, kernel, device_type = self.shape[0], plan.kernel, A.device.type
        for i0 in range(0, rows, plan.block_rows):
            i1 = min(i0 + plan.block_rows, rows)
            base_rows = None if base is None else base[i0:i1]
            with torch.autocast(device_type, enabled=False):  # B A and f in float32, never in autocast's dtype
                if upstream is None:
                    value, grads = kernel.value(B[i0:i1], A, stages, self.activation, self.scaling, base_rows,
                                                out_dtype), None
                else:
                    G, X = upstream
                    grad_h = (G[:, i0:i1].T @ X).to(A.dtype)
                    value, grads = kernel.value_and_grads(B[i0:i1], A, stages, self.activation, self.scaling,
                                                          base_rows, out_dtype, grad_h, need_value)
            yield Block(i0, i1, value, grads)

    # ------------------------------------------------------------------------------------ what callers need
    def dense(self, plan: Optional[BlockPlan] = None) -> torch.Tensor:
        """``D`` in float32 (float64 for float64 factors), in page-aligned memory."""
        result = empty_page_aligned(self.shape, self.promoted()[0].dtype, self.A.device)
        for block in self.blocks(plan):
            result[block.i0:block.i1] = block.value
        return result

    @torch.no_grad()
    def add_to_(self, target: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """``target += sign * D`` in place, ``target`` ``(out, in)`` (a transposed view works too) of any float
        dtype: each block's sum is formed in float32 and rounded once to ``target``'s dtype. One block of transient
        memory, no graph (always under ``no_grad``)."""
        if tuple(target.shape) != self.shape:
            raise ValueError(f"`target` has shape {tuple(target.shape)}; the update has shape {self.shape}.")
        update = self if sign == 1.0 else dataclasses.replace(self, scaling=sign * self.scaling)
        plan = make_plan(*self.shape, self.activation, self.plain, target.device, False, self.block_rows)
        for block in update.blocks(plan, base=target, out_dtype=target.dtype):
            target[block.i0:block.i1] = block.value
        return target

    @torch.no_grad()
    def matmul(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``D @ X`` (``X``: ``(in, k)``) or, with ``transpose``, ``D^T @ X`` (``X``: ``(out, k)``), in ``X``'s dtype
        (float64 for the export's SVD)."""
        rows, cols = self.shape
        out = X.new_zeros((cols if transpose else rows, X.shape[1]))
        for i0, i1, block, _ in self.blocks(self.plan(autograd=False)):
            if transpose:
                out += block.to(X.dtype).T @ X[i0:i1]
            else:
                out[i0:i1] = block.to(X.dtype) @ X
        return out

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """Unscaled columns ``index`` of ``H_K``, ``(out, len(index))``, without building the others (embeddings
        look up columns). Columns are independent up to the last ``P`` (which mixes the widths before it), so:
        without ``P`` the selected columns of ``A`` and of every ``b``; with ``P`` the chain in full but for the last
        ``P``/``b``, of which only the selected columns are used. Plain torch operations: autograd differentiates
        them."""
        A, B, stages = self.promoted()
        with torch.autocast(self.A.device.type, enabled=False):
            if any(P is not None for P, _ in stages):
                *head, (P_last, b_last) = stages
                last = Stage(P_last[:, index], b_last[index] if b_last is not None else None)
                return chain_rows(B, A, [*head, last], self.activation)[0]
            selected = [Stage(None, b[index] if b is not None else None) for _, b in stages]
            return chain_rows(B, A[:, index], selected, self.activation)[0]

    def fused_matmul(self, x: torch.Tensor, dtype: torch.dtype, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, fan_in_fan_out: bool = False) -> torch.Tensor:
        """``x @ (W + D)^T + bias`` for ``x`` of shape ``(..., in)`` in ``dtype`` (the caller's compute dtype), through
        :class:`FusedLoranMatmul` with one plan for the call; without ``weight`` the adapter's contribution ``x @ D^T``
        alone. ``weight`` is the frozen base weight in its own layout (``(in, out)`` with ``fan_in_fan_out``)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype) if weight is not None else None
        b = bias.to(dtype) if (bias is not None and weight is not None) else None
        plan = make_plan(*self.shape, self.activation, self.plain, x.device, False, self.block_rows)
        if torch.is_grad_enabled():
            y = FusedLoranMatmul.apply(x2, w, b, fan_in_fan_out, self, plan, *self.tensors())
        else:
            y = fused_forward(x2, w, b, fan_in_fan_out, self, plan)
        return y.reshape(*lead, y.shape[-1])


# ---------------------------------------------------------------------------------------- the fused matmul
def fused_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], fan_in_fan_out: bool,
                  update: LowRankUpdate, plan: BlockPlan) -> torch.Tensor:
    """The forward of :class:`FusedLoranMatmul` (see there), also what no-grad calls run."""
    base = None if weight is None else (weight.T if fan_in_fan_out else weight)
    chunks = []
    for i0, i1, block, _ in update.blocks(plan, base=base, out_dtype=x.dtype):
        bias_rows = bias[i0:i1] if bias is not None else None
        if weight is None:
            chunks.append(x @ block.T)
        elif fan_in_fan_out:  # Conv1D's own operation (addmm on an (in, out) matrix): a zero update is the base
            folded = block.T.contiguous()
            chunks.append(x @ folded if bias_rows is None else torch.addmm(bias_rows, x, folded))
        else:
            chunks.append(torch.nn.functional.linear(x, block, bias_rows))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)


class FusedLoranMatmul(torch.autograd.Function):
    """``x @ (W + D)^T + bias`` (``weight`` given, "folded") or ``x @ D^T`` (no weight), ``D`` the update.

    ``x`` is 2-D ``(N, in)`` in the compute dtype; ``weight`` the frozen base weight in its own layout (``(in, out)``
    with ``fan_in_fan_out``, GPT-2's ``Conv1D``); each block uses the base layer's own operation (``F.linear`` /
    ``addmm``), so a zero update reproduces the base output bit for bit. ``tensors`` are ``update.tensors()``, passed
    so that autograd sees them. Saves only ``x``, ``weight`` (a reference) and the factors, and rebuilds ``D`` block
    by block in backward with the same plan: ``dD = G^T x`` per block, chained back to the factors by the plan's
    kernel; ``dx = G (W + D)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, update, plan, *tensors):
        out = fused_forward(x, weight, bias, fan_in_fan_out, update, plan)
        ctx.save_for_backward(x, weight, *tensors)
        ctx.fan_in_fan_out, ctx.has_bias, ctx.plan = fan_in_fan_out, bias is not None, plan
        ctx.update = update.with_tensors([None] * len(tensors))  # the settings; the tensors are saved above
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *flat = ctx.saved_tensors
        update = ctx.update.with_tensors(flat)
        need_x, need_bias, need_factors = ctx.needs_input_grad[0], ctx.needs_input_grad[2], any(ctx.needs_input_grad[6:])
        g = grad_out.to(x.dtype)
        base = (weight.T if ctx.fan_in_fan_out else weight) if (need_x and weight is not None) else None
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        grads: list = []
        if need_factors:  # accumulated in the factors' float32 (float64 stays)
            for t in flat:
                grads.append(None if t is None else torch.zeros(t.shape, dtype=update.promoted()[0].dtype,
                                                                 device=t.device))
        grad_x = None
        for i0, i1, value, block_grads in update.blocks(ctx.plan, base=base, upstream=(g, x) if need_factors else None,
                                                        need_value=need_x, out_dtype=x.dtype):
            if need_x:
                part = (g[:, i0:i1] @ value).to(acc_dtype)
                grad_x = part if grad_x is None else grad_x.add_(part)
            if need_factors:
                dB, dA, dP, db = block_grads
                grads[1][i0:i1] = dB
                grads[0] += dA
                for k in range(len(dP)):
                    if dP[k] is not None:
                        grads[2 + 2 * k] += dP[k]
                    if db[k] is not None:
                        grads[3 + 2 * k] += db[k]
        grad_bias = grad_out.sum(0) if (need_bias and ctx.has_bias) else None
        factor_grads = [None] * len(flat)
        for i in range(len(grads)):
            if grads[i] is not None:
                factor_grads[i] = grads[i].to(flat[i].dtype)
        return (None if grad_x is None else grad_x.to(x.dtype), None, grad_bias, None, None, None, *factor_grads)
