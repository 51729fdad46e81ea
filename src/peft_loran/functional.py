"""The LoRAN math on plain tensors, in one place. Layers and tools call it; nothing here knows about modules,
adapters or PEFT.

Row view of the (original MLoRA) chain, for a layer ``W`` of shape ``(out, in)``::

    H_0 = B @ A                                  B: (out, r), A: (r, d_1)
    H_k = f(H_{k-1}) @ P_k + b_k                 P_k: (d_k, d_{k+1}) optional, b_k: (d_{k+1},) optional
    delta_W = scaling * H_K                      last width is ``in``

Plain LoRAN is one stage with neither ``P`` nor ``b``: ``delta_W = scaling * f(B @ A)``.

Every row of ``delta_W`` depends only on the same row of ``B``, so an update is computed in blocks of rows: one
block of ``f(BA)`` alive at a time, built, used and dropped, in forward and (rebuilt) in backward. How is decided
once per call by the update's :class:`BlockPlan` (:meth:`LowRankUpdate.plan`): the rows per block and the
:class:`~peft_loran.kernels.BlockKernel` that computes each block, from the device, the shape, whether autograd must
see the operations and a transient-memory budget, and nothing else. Every path (training forward and backward,
no-grad evaluation, mixed batches, merging, ``get_delta_weight``, export, diagnostics) runs the one block loop,
:meth:`LowRankUpdate.blocks`. The non-linearity always runs in float32 (with ``w = 1e4`` half precision leaves
nothing of ``sin(w x)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from . import kernels
from .activations import Activation
from .kernels import BlockGrads, BlockKernel, CompileFailed

# A stage of the chain: (P or None, b or None).
Stage = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


# ------------------------------------------------------------------------------------------------- the plan
#: Elements of one transient ``(rows, in)`` float32 block on the CPU plan, by kernel (eager, compiled); backward
#: keeps about five such temporaries alive. The eager kernel makes several passes over a block, which stay in cache
#: at 2**18 (1 MiB); the compiled kernel makes one pass and its per-block GEMMs are wider at 2**19.
CPU_BLOCK_ELEMENTS = {False: 2**18, True: 2**19}
#: ... and where no backward follows (evaluation, merging, export): the compiled kernel streams through a block once
#: and each block costs a compiled call and a GEMM launch, so blocks of 2**21 (8 MiB) ran an all-seven evaluation
#: forward of a hidden-1024 model at 1.21x the base model's time against 1.28x at 2**19 (benchmarks/block_budget.py);
#: for the eager kernel the budget made no clear difference there (1.49-1.59x from 2**18 to 2**21, 1.76x at 2**22).
CPU_NO_GRAD_BLOCK_ELEMENTS = {False: 2**18, True: 2**21}
#: ... but on layers at least :data:`MIN_BLOCK_ROWS_FROM_COLS` wide, at least this many rows per block (compiled,
#: eager), up to :data:`MAX_BLOCK_ELEMENTS`: every block costs a pass over the whole ``(tokens, in)`` input gradient
#: and a repacking of the input for its GEMMs, so on wide layers short blocks spend more on those passes than on the
#: update itself (a 4096-wide layer at 512 tokens: 128-row blocks took 1.5x the fused step time of 512-row ones).
#: Narrower layers keep the budget's blocks (docs/design.md, "One plan per call").
MIN_BLOCK_ROWS = {True: 512, False: 256}
MIN_BLOCK_ROWS_FROM_COLS = 4096
MAX_BLOCK_ELEMENTS = 2**21
#: The accelerator plan's budget: elements of one float32 temporary (2**24 = 64 MiB). On a GPU the arithmetic of a
#: block is microseconds and every block costs several kernel launches, so a layer is computed in as few blocks as
#: this allows: a whole 4096 x 4096 layer in one, a 4096 x 11008 one in four (backward holds about three such
#: temporaries at once).
ACCELERATOR_BLOCK_ELEMENTS = 2**24
#: Default CPU block heights are rounded down to a multiple of this (when at least four multiples fit): the blocks
#: are one dimension of the per-block GEMMs, and MKL ran them about 10% slower at 93 rows (2^18 / 2816, a
#: Llama-shaped down projection) than at 80 or 96 (docs/benchmarks.md).
GEMM_ROW_MULTIPLE = 16
#: ``PEFT_LORAN_PLAN``: ``auto`` (the device's plan: cpu on CPUs, accelerator elsewhere), or force one of them.
PLAN_TARGETS = ("auto", "cpu", "accelerator")


def plan_target(device: torch.device) -> str:
    """``cpu`` or ``accelerator``: the device's plan, unless ``PEFT_LORAN_PLAN`` forces one (read on each use; the
    accelerator plan on a CPU is how its numbers and its operator count are tested without a GPU)."""
    forced = os.environ.get("PEFT_LORAN_PLAN", "auto").strip().lower() or "auto"
    if forced not in PLAN_TARGETS:
        raise ValueError(f"PEFT_LORAN_PLAN={forced!r} is not one of {PLAN_TARGETS}.")
    if forced != "auto":
        return forced
    return "cpu" if device.type == "cpu" else "accelerator"


def env_block_elements() -> Optional[int]:
    """``PEFT_LORAN_BLOCK_ELEMENTS`` (elements per block, read on each use), or None."""
    env = os.environ.get("PEFT_LORAN_BLOCK_ELEMENTS", "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) <= 0:
        raise ValueError(f"PEFT_LORAN_BLOCK_ELEMENTS={env!r} must be a positive integer (elements per block).")
    return int(env)


def cpu_block_rows(cols: int, compiled: bool, budget: Optional[int] = None, needs_grad: bool = True) -> int:
    """Rows per block on the CPU plan for a ``cols``-wide update: as many as the budget (``budget`` elements, else
    :data:`CPU_BLOCK_ELEMENTS` of the kernel, :data:`CPU_NO_GRAD_BLOCK_ELEMENTS` where no backward follows) allows;
    at least :data:`MIN_BLOCK_ROWS` on layers at least :data:`MIN_BLOCK_ROWS_FROM_COLS` wide (unless a budget is
    given); GEMM-friendly."""
    cols = max(cols, 1)
    default = (CPU_BLOCK_ELEMENTS if needs_grad else CPU_NO_GRAD_BLOCK_ELEMENTS)[compiled]
    rows = max(1, (budget or default) // cols)
    if budget is None and cols >= MIN_BLOCK_ROWS_FROM_COLS:
        rows = max(rows, min(MIN_BLOCK_ROWS[compiled], MAX_BLOCK_ELEMENTS // cols))
    return rows - rows % GEMM_ROW_MULTIPLE if rows >= 4 * GEMM_ROW_MULTIPLE else rows


def accelerator_block_rows(rows: int, cols: int, budget: Optional[int] = None) -> int:
    """Rows per block on the accelerator plan: the fewest blocks of at most ``budget`` elements (default
    :data:`ACCELERATOR_BLOCK_ELEMENTS`), of equal height where a divisor of ``rows`` allows (one block shape per
    layer)."""
    budget = budget or ACCELERATOR_BLOCK_ELEMENTS
    need = max(1, math.ceil(rows * max(cols, 1) / budget))
    for n in range(need, min(rows, 4 * need) + 1):
        if rows % n == 0:
            return rows // n
    return math.ceil(rows / need)


@dataclass(frozen=True)
class BlockPlan:
    """How one call computes an update: ``block_rows`` rows per block, each computed by ``kernel``. Made by
    :meth:`LowRankUpdate.plan`; the same inputs always give the same plan."""

    block_rows: int
    kernel: BlockKernel
    target: str = "cpu"

    def ranges(self, rows: int) -> list[tuple[int, int]]:
        return [(i0, min(i0 + self.block_rows, rows)) for i0 in range(0, rows, self.block_rows)]

    @property
    def compiled(self) -> bool:
        return self.kernel is not EAGER


class Block(NamedTuple):
    """Rows ``[i0, i1)`` of an update: ``value`` (``base`` rows plus the update's, or None when not asked for) and,
    when an upstream gradient was given, the block's ``grads`` (:data:`~peft_loran.kernels.BlockGrads`)."""

    i0: int
    i1: int
    value: Optional[torch.Tensor]
    grads: Optional[BlockGrads]


# ---------------------------------------------------------------------------------------- memory helpers
def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64: the non-linearity never runs below float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


#: Page size for :func:`empty_page_aligned`.
PAGE_BYTES = 4096


def empty_page_aligned(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` whose data starts on a page boundary on CPU (elsewhere plain ``torch.empty``).

    Why: weights that are read on every call (the eval cache, merged weights) are allocated after the model, and
    after large frees glibc serves them from its heap at arbitrary page offsets. Matrix-vector products (decoding)
    against such copies ran up to 17% slower than against the model's own page-aligned weights, and generation
    6-8% slower (``benchmarks/placement_ab.py``). The cost is at most one page per tensor."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    raw = torch.empty(numel + PAGE_BYTES // dtype.itemsize, dtype=dtype, device=device)
    shift = (-raw.data_ptr() % PAGE_BYTES) // dtype.itemsize  # CPU data is 64-byte aligned, so this is exact
    return raw[shift : shift + numel].view(shape)


def page_aligned_copy(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A copy of ``t`` (cast to ``dtype``) in :func:`empty_page_aligned` storage."""
    out = empty_page_aligned(t.shape, dtype or t.dtype, t.device)
    return out.copy_(t)



# ------------------------------------------------------------------------------------------- the eager math
def chain_rows(
    B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage], activation: Activation, keep: bool = False
) -> tuple[torch.Tensor, list[tuple]]:
    """Unscaled update rows ``H_K`` for the given rows of ``B``, in float32 (float64 stays float64).

    With ``keep=True`` also returns, per stage, ``(Z_k, U_k, f'(Z_k))`` for :func:`chain_rows_backward`
    (``f'`` computed together with ``f`` where that saves work). Plain torch ops: differentiable by autograd
    when called outside the fused path.
    """
    h = at_least_float32(B_rows) @ at_least_float32(A)
    saved = []
    for P, b in stages:
        z = h
        if keep:
            u, fprime = activation.value_and_derivative(z)
            # keep only what the backward needs: Z for activations without an analytic f', U for dP
            saved.append((z if fprime is None else None, u if P is not None else None, fprime))
        else:
            u = activation(z)
        h = u @ at_least_float32(P) if P is not None else u
        if b is not None:
            h = h + at_least_float32(b)
    return h, saved


def chain_columns(
    B: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage], activation: Activation, index: torch.Tensor
) -> torch.Tensor:
    """Columns ``index`` of the unscaled update ``H_K``, ``(rows, len(index))``, without building the others.

    Columns are independent up to the last ``P`` (which mixes the widths before it), so: without ``P`` select the
    columns of ``A`` and of every ``b``; with ``P`` run the chain in full except for the last ``P``/``b``, of which
    only the selected columns are used. Plain torch ops (differentiable by autograd), with autocast off: ``f`` runs
    on a float32 ``B A``."""
    with torch.autocast(B.device.type, enabled=False):
        if any(P is not None for P, _ in stages):
            *head, (P_last, b_last) = stages
            last = (P_last[:, index], b_last[index] if b_last is not None else None)
            return chain_rows(B, A, [*head, last], activation)[0]
        selected = [(None, b[index] if b is not None else None) for _, b in stages]
        return chain_rows(B, A[:, index], selected, activation)[0]


def chain_rows_backward(
    grad_h: torch.Tensor,
    B_rows: torch.Tensor,
    A: torch.Tensor,
    stages: Sequence[Stage],
    activation: Activation,
    saved: Sequence[tuple],
) -> tuple[torch.Tensor, torch.Tensor, list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """Analytic vector-Jacobian product of :func:`chain_rows`: grads of ``B_rows``, ``A``, each ``P`` and ``b``.

    May overwrite ``grad_h`` (it is a temporary of the caller)."""
    grad_P: list[Optional[torch.Tensor]] = [None] * len(stages)
    grad_b: list[Optional[torch.Tensor]] = [None] * len(stages)
    for k in reversed(range(len(stages))):
        P, b = stages[k]
        z, u, fprime = saved[k]
        if b is not None:
            grad_b[k] = grad_h.sum(0)
        if P is not None:
            grad_P[k] = u.T @ grad_h
            grad_u = grad_h @ at_least_float32(P).T
        else:
            grad_u = grad_h
        grad_h = activation.grad(z, grad_u) if fprime is None else grad_u.mul_(fprime)
    grad_B = grad_h @ at_least_float32(A).T
    grad_A = at_least_float32(B_rows).T @ grad_h
    return grad_B, grad_A, grad_P, grad_b


def is_plain(stages: Sequence[Stage]) -> bool:
    """One stage without P or b: the paper's ``f(B A)``."""
    return len(stages) == 1 and stages[0][0] is None and stages[0][1] is None


def block_update(
    base_rows: Optional[torch.Tensor],
    B_rows: torch.Tensor,
    A: torch.Tensor,
    stages: Sequence[Stage],
    activation: Activation,
    scaling: float,
    keep: bool = False,
) -> tuple[torch.Tensor, list[tuple]]:
    """``base_rows + scaling * H`` (``base_rows`` None: just the scaled update) for a block of rows, in eager torch
    operations, plus what :func:`chain_rows_backward` needs when ``keep``: the plain case through the activation's
    ``scaled_add``, chains through :func:`chain_rows`. Differentiable by autograd."""
    if is_plain(stages):
        m = at_least_float32(B_rows) @ at_least_float32(A)
        out, fprime = activation.scaled_add(base_rows, m, scaling, with_derivative=keep)
        if keep and fprime is None:  # no analytic derivative: keep Z for autograd (m untouched by scaled_add)
            return out, [(m, None, None)]
        return out, [(None, None, fprime)] if keep else []
    h, saved = chain_rows(B_rows, A, stages, activation, keep=keep)
    return (h.mul_(scaling) if base_rows is None else torch.add(base_rows, h, alpha=scaling)), saved


class EagerKernel(BlockKernel):
    """The block kernel in plain torch operations: every chain, every activation; what autograd differentiates when
    it must see the operations, and the fall-back where nothing is compiled."""

    name = "eager"

    def value(self, update, i0, i1, base_rows, out_dtype=None):
        out = block_update(base_rows, update.B[i0:i1], update.A, update.stages, update.activation, update.scaling)[0]
        return out if out_dtype is None else out.to(out_dtype)

    def value_and_grads(self, update, i0, i1, base_rows, grad_h, need_value, out_dtype=None):
        B_rows = update.B[i0:i1]
        out, saved = block_update(base_rows, B_rows, update.A, update.stages, update.activation, update.scaling,
                                  keep=True)
        grads = chain_rows_backward(grad_h.mul_(update.scaling), B_rows, update.A, update.stages, update.activation,
                                    saved)
        if not need_value:
            return None, grads
        return (out if out_dtype is None else out.to(out_dtype)), grads


#: The one eager kernel (it holds no state).
EAGER = EagerKernel()


# ---------------------------------------------------------------------------------------------- the update
@dataclass(frozen=True)
class LowRankUpdate:
    """One adapter's update of one layer, ``D = scaling * chain(B A)`` of shape ``(out, in)``: its factors and how
    they combine, and how a call computes it (:meth:`plan`, then the one block loop :meth:`blocks`). Every method
    works block by block (one block of ``D`` alive at a time), with autocast off: under it ``B @ A`` would run in
    half precision and ``f`` (``sin(w x)``) on its rounding."""

    A: torch.Tensor
    B: torch.Tensor
    stages: Sequence[Stage]
    activation: Activation
    scaling: float
    block_rows: Optional[int] = None  # an explicit height (LoranConfig.block_rows) overrides the plan's

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], last_width(self.A, self.stages)

    @property
    def is_plain(self) -> bool:
        return is_plain(self.stages)

    # ------------------------------------------------------------------------------------------ the tensors
    def tensors(self) -> list[Optional[torch.Tensor]]:
        """``[A, B, P_1, b_1, ...]`` (None where a stage has no P or b): what autograd differentiates."""
        return [self.A, self.B, *(t for stage in self.stages for t in stage)]

    def with_tensors(self, flat: Sequence[Optional[torch.Tensor]]) -> "LowRankUpdate":
        """The same update on other tensors, in :meth:`tensors`' order."""
        stages = [(flat[i], flat[i + 1]) for i in range(2, len(flat), 2)]
        return dataclasses.replace(self, A=flat[0], B=flat[1], stages=stages)

    def detached(self) -> "LowRankUpdate":
        return self.with_tensors([None if t is None else t.detach() for t in self.tensors()])

    def in_float64(self) -> "LowRankUpdate":
        """Detached float64 factors (for statistics that resolve Sinter's 2.5e-9 share at the paper's setting)."""
        return self.with_tensors([None if t is None else t.detach().double() for t in self.tensors()])

    @functools.cached_property
    def _factors32(self) -> tuple[torch.Tensor, torch.Tensor]:
        return at_least_float32(self.B), at_least_float32(self.A)

    def factors_at_least_float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in float32 (float64 stays), converted once per update object."""
        return self._factors32

    # ------------------------------------------------------------------------------------------------- plan
    def plan(self, device: Optional[torch.device] = None, needs_grad: Optional[bool] = None,
             autograd: Optional[bool] = None, budget: Optional[int] = None, target: Optional[str] = None) -> BlockPlan:
        """How to compute this update in one call: rows per block and the kernel, from the device (default the
        factors'), the shape, whether a backward will need the blocks again (``needs_grad``) and whether autograd
        must see the operations (``autograd``; both default to: gradients are enabled and a factor requires them,
        as outside the fused Function), a transient budget in elements per block (default:
        ``PEFT_LORAN_BLOCK_ELEMENTS``, else the target's) and the target (default :func:`plan_target`). Nothing
        else: no clock, no history of calls (except that an activation whose kernels failed to compile in this
        process runs eagerly).

        * CPU plan: cache-sized blocks (:data:`CPU_BLOCK_ELEMENTS`; larger where no backward follows), with a row
          floor on wide layers; the compiled kernel for updates of at least ``kernels.AUTO_COMPILE_MIN_ELEMENTS``.
        * Accelerator plan: as few blocks as :data:`ACCELERATOR_BLOCK_ELEMENTS` allows, each one compiled pass."""
        device = device or self.A.device
        if autograd is None:
            autograd = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.tensors())
        if needs_grad is None:
            needs_grad = autograd
        target = target or plan_target(device)
        rows, cols = self.shape
        kernel = kernels.compiled_kernel_for(self.activation, is_plain(self.stages), rows, cols, device, target,
                                             autograd) or EAGER
        budget = budget or env_block_elements()
        if self.block_rows:
            height = self.block_rows
        elif target == "cpu":
            height = cpu_block_rows(cols, kernel is not EAGER, budget, needs_grad)
        else:
            height = accelerator_block_rows(rows, cols, budget)
        return BlockPlan(height, kernel, target)

    # --------------------------------------------------------------------------------------- the block loop
    def blocks(self, plan: Optional[BlockPlan] = None, base: Optional[torch.Tensor] = None,
               grad_h: Optional[Callable[[int, int], torch.Tensor]] = None, need_value: bool = True,
               out_dtype: Optional[torch.dtype] = None) -> Iterator[Block]:
        """The one row-block loop: per block of ``plan`` (default :meth:`plan`), ``base[i0:i1] + D[i0:i1]``
        (``base``, in the update's orientation, None: ``D``'s rows alone) in ``out_dtype`` (default float32) and,
        given ``grad_h(i0, i1)`` (the unscaled gradient of those rows of ``D / scaling``), the block's gradients.
        A kernel that fails to compile falls back to the eager kernel here, for this block and the rest."""
        plan = plan or self.plan()
        kernel = plan.kernel
        rows = self.shape[0]
        for i0, i1 in plan.ranges(rows):
            base_rows = None if base is None else base[i0:i1]
            upstream = None if grad_h is None else grad_h(i0, i1)
            with torch.autocast(self.A.device.type, enabled=False):
                try:
                    parts = self._block(kernel, i0, i1, base_rows, upstream, need_value, out_dtype)
                except CompileFailed:
                    kernel = EAGER
                    parts = self._block(kernel, i0, i1, base_rows, upstream, need_value, out_dtype)
            yield Block(i0, i1, *parts)

    def _block(self, kernel, i0, i1, base_rows, upstream, need_value, out_dtype):
        if upstream is None:
            return (kernel.value(self, i0, i1, base_rows, out_dtype) if need_value else None), None
        return kernel.value_and_grads(self, i0, i1, base_rows, upstream, need_value, out_dtype)

    # ------------------------------------------------------------------------------------ what callers need
    def dense(self, add_to: Optional[torch.Tensor] = None, sign: float = 1.0,
              plan: Optional[BlockPlan] = None) -> torch.Tensor:
        """``D`` in float32 (float64 for float64 factors), in page-aligned memory; or, given ``add_to`` (``(out,
        in)``, a transposed view works too), ``add_to += sign * D`` in place: one block of transient memory instead
        of a second dense matrix."""
        if add_to is None:
            result = empty_page_aligned(self.shape, torch.promote_types(self.A.dtype, torch.float32), self.A.device)
        elif tuple(add_to.shape) != self.shape:
            raise ValueError(f"`add_to` has shape {tuple(add_to.shape)}; the update has shape {self.shape}.")
        else:
            result = add_to
        update = self if sign == 1.0 else dataclasses.replace(self, scaling=sign * self.scaling)
        for block in update.blocks(plan, base=add_to):
            result[block.i0:block.i1] = block.value
        return result

    @torch.no_grad()
    def matmul(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``D @ X`` (``X``: ``(cols, k)``) or, with ``transpose``, ``D^T @ X`` (``X``: ``(rows, k)``), in ``X``'s dtype
        (float64 for the export's SVD)."""
        rows, cols = self.shape
        out = X.new_zeros((cols if transpose else rows, X.shape[1]))
        for i0, i1, block, _ in self.blocks():
            if transpose:
                out += block.to(X.dtype).T @ X[i0:i1]
            else:
                out[i0:i1] = block.to(X.dtype) @ X
        return out

    @torch.no_grad()
    def sq_norm(self) -> float:
        """``||D||_F^2``, accumulated in float64."""
        return float(sum(block.double().pow(2).sum() for _, _, block, _ in self.blocks()))

    @torch.no_grad()
    def distance(self, left: torch.Tensor, right: torch.Tensor) -> float:
        """``||D - left @ right||_F^2`` (``left``: ``(rows, k)``, ``right``: ``(k, cols)``) in float64."""
        return float(sum((block.double() - left[i0:i1].double() @ right.double()).pow(2).sum()
                         for i0, i1, block, _ in self.blocks()))


def last_width(A: torch.Tensor, stages: Sequence[Stage]) -> int:
    for P, b in reversed(stages):
        if P is not None:
            return P.shape[1]
        if b is not None:
            return b.shape[0]
    return A.shape[1]


# ---------------------------------------------------------------------------------------- the fused matmul
def _base_in_update_layout(weight: Optional[torch.Tensor], weight_in_out: bool) -> Optional[torch.Tensor]:
    """The base weight as an ``(out, in)`` view (GPT-2's ``Conv1D`` stores ``(in, out)``)."""
    return None if weight is None else (weight.T if weight_in_out else weight)


def fused_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], weight_in_out: bool,
                  update: LowRankUpdate, plan: BlockPlan) -> torch.Tensor:
    """The forward of :class:`FusedLoranMatmul` (see there) without autograd: what no-grad calls run."""
    chunks = []
    for i0, i1, block, _ in update.blocks(plan, base=_base_in_update_layout(weight, weight_in_out), out_dtype=x.dtype):
        bias_rows = bias[i0:i1] if bias is not None else None
        if weight is None:
            chunks.append(x @ block.T)
        elif weight_in_out:  # Conv1D's own operation (addmm on an (in, out) matrix): a zero update is the base
            folded = block.T.contiguous()
            chunks.append(x @ folded if bias_rows is None else torch.addmm(bias_rows, x, folded))
        else:
            chunks.append(torch.nn.functional.linear(x, block, bias_rows))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)


class FusedLoranMatmul(torch.autograd.Function):
    """``x @ (W + D)^T + bias`` (``weight`` given, "folded") or ``x @ D^T`` (no weight), ``D`` the update.

    ``x`` is 2-D ``(N, in)`` in the compute dtype. ``weight`` is the frozen base weight in its own layout:
    ``(out, in)``, or ``(in, out)`` when ``weight_in_out`` (GPT-2's ``Conv1D``); each block is computed with the
    same operation the base layer uses (``F.linear`` / ``addmm``), so a zero update reproduces the base output
    bit for bit. ``update`` (a :class:`LowRankUpdate`) and ``plan`` (its :class:`BlockPlan`) say what and how;
    ``tensors`` are the update's own (``update.tensors()``), passed so that autograd sees them. Saves only ``x``,
    ``weight`` (a reference) and the factors, and rebuilds ``D`` block by block in backward with the same plan:
    ``dH = G^T x`` per block, chained back to ``A``, ``B``, ``P``, ``b`` by the plan's kernel; ``dx = G (W + D)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_in_out, update, plan, *tensors):
        out = fused_forward(x, weight, bias, weight_in_out, update, plan)
        ctx.save_for_backward(x, weight, *tensors)
        ctx.weight_in_out, ctx.has_bias, ctx.plan = weight_in_out, bias is not None, plan
        ctx.update = update.with_tensors([None] * len(tensors))  # the settings; the tensors are saved above
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *flat = ctx.saved_tensors
        update = ctx.update.with_tensors(flat)
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_factors = any(ctx.needs_input_grad[6:])
        g = grad_out.to(x.dtype)
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        base = _base_in_update_layout(weight, ctx.weight_in_out) if need_x else None
        upstream = (lambda i0, i1: at_least_float32(g[:, i0:i1].T @ x)) if need_factors else None
        grad_x = None
        grads = [None if t is None else torch.zeros_like(at_least_float32(t)) for t in flat] if need_factors else []
        for i0, i1, value, block_grads in update.blocks(ctx.plan, base=base, grad_h=upstream, need_value=need_x,
                                                        out_dtype=x.dtype):
            if need_x:
                part = g[:, i0:i1] @ value
                grad_x = part.to(acc_dtype) if grad_x is None else grad_x.add_(part)
            del value
            if need_factors:
                dB, dA, dP, db = block_grads
                grads[1][i0:i1] = dB
                grads[0] += dA
                for k, (gp, gb) in enumerate(zip(dP, db)):
                    if gp is not None:
                        grads[2 + 2 * k] += gp
                    if gb is not None:
                        grads[3 + 2 * k] += gb
        grad_bias = grad_out.sum(0) if (need_bias and ctx.has_bias) else None
        factor_grads = [None if g_ is None else g_.to(t.dtype) for g_, t in zip(grads, flat)] or [None] * len(flat)
        return (None if grad_x is None else grad_x.to(x.dtype), None, grad_bias, None, None, None, *factor_grads)


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def loran_matmul(x: torch.Tensor, update: LowRankUpdate, weight: Optional[torch.Tensor] = None,
                 bias: Optional[torch.Tensor] = None, weight_in_out: bool = False) -> torch.Tensor:
    """``x @ (W + D)^T + bias`` for ``x`` of shape ``(..., in)`` and the update ``D`` (a :class:`LowRankUpdate`),
    through the fused Function, with the update's one plan for this call. Without ``weight`` only the adapter's
    contribution ``x @ D^T`` is returned. Runs in the autocast dtype when autocast is active, with autocast itself
    switched off inside so the float32 non-linearity is not downcast."""
    dtype = compute_dtype_for(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = weight.to(dtype) if weight is not None else None
    b = bias.to(dtype) if (bias is not None and weight is not None) else None
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled():
            # the Function's forward and backward run without grad (the plan may use the compiled kernel), and its
            # backward rebuilds the blocks with the same plan
            plan = update.plan(x.device, needs_grad=True, autograd=False)
            y = FusedLoranMatmul.apply(x2, w, b, weight_in_out, update, plan, *update.tensors())
        else:
            y = fused_forward(x2, w, b, weight_in_out, update, update.plan(x.device, needs_grad=False, autograd=False))
    return y.reshape(*lead, y.shape[-1])
