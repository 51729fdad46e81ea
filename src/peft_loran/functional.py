"""The LoRAN math on plain tensors, in one place. Layers and tools call these functions; nothing here knows
about modules, adapters or PEFT.

Row view of the (original MLoRA) chain, for a layer ``W`` of shape ``(out, in)``::

    H_0 = B @ A                                  B: (out, r), A: (r, d_1)
    H_k = f(H_{k-1}) @ P_k + b_k                 P_k: (d_k, d_{k+1}) optional, b_k: (d_{k+1},) optional
    delta_W = scaling * H_K                      last width is ``in``

Plain LoRAN is one stage with neither ``P`` nor ``b``: ``delta_W = scaling * f(B @ A)``.

Every row of ``delta_W`` depends only on the same row of ``B``. :class:`FusedLoranMatmul` uses that to work on
blocks of output rows: it builds one block of ``f(BA)``, uses it and drops it, both in forward and (rebuilt) in
backward. Autograd then keeps only the small factors and the input alive, never a dense ``(out, in)`` tensor.
The non-linearity always runs in float32 (with ``w = 1e4`` half precision leaves nothing of ``sin(w x)``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from . import kernels
from .activations import Activation

# A stage of the chain: (P or None, b or None).
Stage = tuple[Optional[torch.Tensor], Optional[torch.Tensor]]

#: Elements of one transient ``(rows, in)`` float32 block on CPU; backward keeps about five such temporaries alive.
#: The eager kernels make several passes over a block, which stay in cache at 2**18 (1 MiB); the compiled kernels
#: make one pass and their per-block GEMMs are wider at 2**19. On accelerators 2**22 (16 MiB) keeps the GEMMs wide.
#: Override per layer with ``LoranConfig(block_rows=...)`` or for the process with ``PEFT_LORAN_BLOCK_ELEMENTS``.
BLOCK_ELEMENTS = {"cpu": 2**18}
BLOCK_ELEMENTS_COMPILED = {"cpu": 2**19}
DEFAULT_BLOCK_ELEMENTS_ACCELERATOR = 2**22
#: ... but on layers at least :data:`MIN_BLOCK_ROWS_FROM_COLS` wide, at least this many rows per block (compiled,
#: eager), up to :data:`MAX_BLOCK_ELEMENTS`: every block costs a pass over the whole ``(tokens, in)`` input gradient
#: and a repacking of the input for its GEMMs, so on wide layers short blocks spend more on those passes than on the
#: update itself (a 4096-wide layer at 512 tokens: 128-row blocks took 1.5x the fused step time of 512-row ones).
#: Narrower layers keep the budget's blocks: there the floor bought no measurable speed and cost memory
#: (docs/design.md, "Blocks").
MIN_BLOCK_ROWS = {True: 512, False: 256}
MIN_BLOCK_ROWS_FROM_COLS = 4096
MAX_BLOCK_ELEMENTS = 2**21


def block_elements(device: torch.device, compiled: bool = False) -> int:
    """The block budget: ``PEFT_LORAN_BLOCK_ELEMENTS`` (read on each use, so it can change within a process), else
    the device's default, which on CPU depends on whether the layer runs on the compiled kernels. A per-layer
    ``LoranConfig(block_rows=...)`` takes precedence over both."""
    env = _env_block_elements()
    if env:
        return env
    if compiled and device.type in BLOCK_ELEMENTS_COMPILED:
        return BLOCK_ELEMENTS_COMPILED[device.type]
    return BLOCK_ELEMENTS.get(device.type, DEFAULT_BLOCK_ELEMENTS_ACCELERATOR)


def _env_block_elements() -> Optional[int]:
    env = os.environ.get("PEFT_LORAN_BLOCK_ELEMENTS", "").strip()
    if not env:
        return None
    if not env.isdigit() or int(env) <= 0:
        raise ValueError(f"PEFT_LORAN_BLOCK_ELEMENTS={env!r} must be a positive integer (elements per block).")
    return int(env)


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


#: Default block heights are rounded down to a multiple of this (when at least four multiples fit): the blocks are
#: one dimension of the per-block GEMMs, and MKL ran them about 10% slower at 93 rows (2^18 / 2816, a Llama-shaped
#: down projection) than at 80 or 96 (an ad-hoc interleaved timing loop; docs/benchmarks.md).
GEMM_ROW_MULTIPLE = 16


def default_block_rows(
    cols: int, device: torch.device, elements: Optional[int] = None, compiled: bool = False
) -> int:
    """Rows per block for a ``cols``-wide matrix: as many as the block budget (``elements``, default the device's)
    allows; on CPU and at least :data:`MIN_BLOCK_ROWS_FROM_COLS` wide, at least :data:`MIN_BLOCK_ROWS` within
    :data:`MAX_BLOCK_ELEMENTS` (unless a budget is given); GEMM-friendly."""
    cols = max(cols, 1)
    budget = elements or _env_block_elements()  # an explicit budget is used as given
    rows = max(1, (budget or block_elements(device, compiled)) // cols)
    if budget is None and device.type == "cpu" and cols >= MIN_BLOCK_ROWS_FROM_COLS:
        rows = max(rows, min(MIN_BLOCK_ROWS[compiled], MAX_BLOCK_ELEMENTS // cols))
    return rows - rows % GEMM_ROW_MULTIPLE if rows >= 4 * GEMM_ROW_MULTIPLE else rows


def row_blocks(
    rows: int, cols: int, block_rows: Optional[int] = None, device: torch.device = torch.device("cpu"),
    compiled: bool = False,
) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` row ranges of ``block_rows`` rows, or by default as many as fit the block budget of
    a layer on the compiled kernels or not (:func:`default_block_rows`)."""
    step = block_rows if block_rows else default_block_rows(cols, device, compiled=compiled)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def uses_compiled_kernels(activation: Activation, stages: Sequence[Stage], rows: int, cols: int,
                          device: torch.device) -> bool:
    """Whether a ``(rows, cols)`` update runs on the compiled kernels (plain ``f(B A)`` only): the shape, the
    activation, the device and the mode decide, never the clock (:func:`peft_loran.kernels.compiles`)."""
    return is_plain(stages) and kernels.compiles(activation, rows, cols, device)


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
    compiled: bool = False,
) -> tuple[torch.Tensor, list[tuple]]:
    """``base_rows + scaling * H`` (``base_rows`` None: just the scaled update) for a block of rows, plus what
    :func:`chain_rows_backward` needs when ``keep``. The plain case goes through the compiled kernel when
    ``compiled`` (:func:`uses_compiled_kernels`), else eagerly through the activation's ``scaled_add``; chains
    through :func:`chain_rows`."""
    if compiled and not keep and is_plain(stages):
        fused = kernels.value(activation, base_rows, at_least_float32(B_rows), at_least_float32(A), scaling)
        if fused is not None:
            return fused, []
    if is_plain(stages):
        return _plain_block_update(base_rows, B_rows, A, activation, scaling, keep)
    h, saved = chain_rows(B_rows, A, stages, activation, keep=keep)
    return (h.mul_(scaling) if base_rows is None else torch.add(base_rows, h, alpha=scaling)), saved


def _plain_block_update(base_rows, B_rows, A, activation, scaling, keep):
    """:func:`block_update` of one stage without P or b, in eager PyTorch."""
    m = at_least_float32(B_rows) @ at_least_float32(A)
    out, fprime = activation.scaled_add(base_rows, m, scaling, with_derivative=keep)
    if keep and fprime is None:  # no analytic derivative: keep Z for autograd (m untouched by scaled_add)
        return out, [(m, None, None)]
    return out, [(None, None, fprime)] if keep else []


def block_update_and_grads(
    base_rows: Optional[torch.Tensor],
    B_rows: torch.Tensor,
    A: torch.Tensor,
    stages: Sequence[Stage],
    activation: Activation,
    scaling: float,
    grad_h: Optional[torch.Tensor],
    need_update: bool = True,
    compiled: bool = False,
) -> tuple[Optional[torch.Tensor], Optional[tuple]]:
    """One block of the backward: the update as :func:`block_update` builds it (when ``need_update``; it feeds
    ``dx``) and, given ``grad_h`` (the gradient of the block's ``H_K`` rows), :func:`chain_rows_backward`'s
    ``(grad_B_rows, grad_A, grad_P, grad_b)``. The plain case runs as one compiled kernel where available
    (:mod:`peft_loran.kernels`), which is why ``grad_h`` comes in before the update is built."""
    if grad_h is None:
        update = block_update(base_rows, B_rows, A, stages, activation, scaling, compiled=compiled)[0] \
            if need_update else None
        return update, None
    B32, A32 = at_least_float32(B_rows), at_least_float32(A)
    if compiled and is_plain(stages):
        fused = kernels.value_and_grad(activation, base_rows, B32, A32, scaling, grad_h, need_update)
        if fused is not None:
            update, grad_z = fused
            return update, (grad_z @ A32.T, B32.T @ grad_z, [None], [None])
    update, saved = block_update(base_rows, B_rows, A, stages, activation, scaling, keep=True)
    grads = chain_rows_backward(grad_h, B_rows, A, stages, activation, saved)
    return (update if need_update else None), grads


@dataclass(frozen=True)
class LowRankUpdate:
    """One adapter's update of one layer, ``D = scaling * chain(B A)`` of shape ``(out, in)``: its factors and how
    they combine, so callers pass one object instead of six arguments. Every method works block by block (one block
    of ``D`` alive at a time), with autocast off: under it ``B @ A`` would run in half precision and ``f``
    (``sin(w x)``) on its rounding."""

    A: torch.Tensor
    B: torch.Tensor
    stages: Sequence[Stage]
    activation: Activation
    scaling: float
    block_rows: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], _last_width(self.A, self.stages)

    def detached(self) -> "LowRankUpdate":
        return self._with(lambda t: t.detach())

    def in_float64(self) -> "LowRankUpdate":
        """Detached float64 factors (for statistics that resolve Sinter's 2.5e-9 share at the paper's setting)."""
        return self._with(lambda t: t.detach().double())

    def _with(self, fn) -> "LowRankUpdate":
        stages = [(None if P is None else fn(P), None if b is None else fn(b)) for P, b in self.stages]
        return dataclasses.replace(self, A=fn(self.A), B=fn(self.B), stages=stages)

    def blocks(self, base: Optional[torch.Tensor] = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, base[start:stop] + D[start:stop])`` per row block (``base`` None: ``D``'s rows alone)."""
        rows, cols = self.shape
        compiled = uses_compiled_kernels(self.activation, self.stages, rows, cols, self.A.device)
        for i0, i1 in row_blocks(rows, cols, self.block_rows, self.A.device, compiled):
            with torch.autocast(self.A.device.type, enabled=False):
                block = block_update(None if base is None else base[i0:i1], self.B[i0:i1], self.A, self.stages,
                                     self.activation, self.scaling, compiled=compiled)[0]
            yield i0, i1, block

    def dense(self, add_to: Optional[torch.Tensor] = None, sign: float = 1.0) -> torch.Tensor:
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
        for i0, i1, block in update.blocks(add_to):
            result[i0:i1] = block
        return result

    @torch.no_grad()
    def matmul(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``D @ X`` (``X``: ``(cols, k)``) or, with ``transpose``, ``D^T @ X`` (``X``: ``(rows, k)``), in ``X``'s dtype
        (float64 for the export's SVD)."""
        rows, cols = self.shape
        out = X.new_zeros((cols if transpose else rows, X.shape[1]))
        for i0, i1, block in self.blocks():
            if transpose:
                out += block.to(X.dtype).T @ X[i0:i1]
            else:
                out[i0:i1] = block.to(X.dtype) @ X
        return out

    @torch.no_grad()
    def sq_norm(self) -> float:
        """``||D||_F^2``, accumulated in float64."""
        return float(sum(block.double().pow(2).sum() for *_, block in self.blocks()))

    @torch.no_grad()
    def distance(self, left: torch.Tensor, right: torch.Tensor) -> float:
        """``||D - left @ right||_F^2`` (``left``: ``(rows, k)``, ``right``: ``(k, cols)``) in float64."""
        return float(sum((block.double() - left[i0:i1].double() @ right.double()).pow(2).sum()
                         for i0, i1, block in self.blocks()))

    @torch.no_grad()
    def nonlinear_share(self, write_dense_to: Optional[torch.Tensor] = None) -> Optional[dict]:
        """How much of ``D = s f(BA)`` the non-linearity makes, in float64:

        * ``share``: ``||D - s BA||^2 / ||D||^2`` (0 for LoRA; for Sinter with amplitude ``a < 1`` at most
          ``a^2 / (1 - a)^2``; it counts a mere change of scale as non-linear: Sine-LoRA's ``sin(w x) / g ~ (w / g)
          x`` gives about ``(1 - g / w)^2`` even where it is linear);
        * ``beyond_scale``: ``min_c ||D - c BA||^2 / ||D||^2 = 1 - <D, BA>^2 / (||D||^2 ||BA||^2)``: what no multiple
          of ``BA`` explains, the part of the update a rescaled LoRA could not give.

        None for chains with ``P``/``b`` (no linear counterpart) and for an all-zero update. ``write_dense_to`` (a
        float64 ``(out, in)`` tensor) also receives ``D``, from the same pass (see :meth:`dense_and_share`)."""
        if not is_plain(self.stages):
            return None
        update = self.in_float64()
        A64, B64, scaling = update.A, update.B, self.scaling
        total = inner = distance = 0.0
        for i0, i1, block in update.blocks():
            if write_dense_to is not None:
                write_dense_to[i0:i1] = block
            linear = B64[i0:i1] @ A64
            total += float(block.pow(2).sum())
            inner += float((block * linear).sum())
            distance += float((block - scaling * linear).pow(2).sum())
        if total == 0.0:
            return None
        linear_sq = float(((B64.T @ B64) * (A64 @ A64.T)).sum())  # ||BA||^2 = trace(B^T B A A^T)
        beyond = 1.0 - inner * inner / (total * linear_sq) if linear_sq > 0 else 1.0
        return {"share": distance / total, "beyond_scale": max(0.0, beyond)}

    @torch.no_grad()
    def dense_and_share(self) -> tuple[torch.Tensor, Optional[dict]]:
        """``D`` in float64 and :meth:`nonlinear_share`, from one pass over the blocks (what the diagnostics need:
        their SVD runs in float64 anyway)."""
        if not is_plain(self.stages):
            return self.in_float64().dense(), None
        dense = empty_page_aligned(self.shape, torch.float64, self.A.device)
        return dense, self.nonlinear_share(write_dense_to=dense)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(entropy(sigma / sum(sigma)))``: between 1 and the number of non-zero
    singular values, equal to k for k equal ones; it counts directions with real weight, not rounding noise."""
    sv = singular_values.double().clamp_min(0)
    if float(sv.sum()) == 0.0:
        return 0.0
    p = sv / sv.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _last_width(A: torch.Tensor, stages: Sequence[Stage]) -> int:
    for P, b in reversed(stages):
        if P is not None:
            return P.shape[1]
        if b is not None:
            return b.shape[0]
    return A.shape[1]


def flatten_stages(stages: Sequence[Stage]) -> list[Optional[torch.Tensor]]:
    return [t for stage in stages for t in stage]


def unflatten_stages(flat: Sequence[Optional[torch.Tensor]]) -> list[Stage]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def fused_forward(x, weight, bias, weight_in_out, scaling, activation, block_rows, A, B, stages) -> torch.Tensor:
    """The forward of :class:`FusedLoranMatmul` (see there) without autograd: what no-grad calls run, eager or
    compiled (``torch.compile`` traces it as plain tensor code)."""
    chunks = []
    compiled = uses_compiled_kernels(activation, stages, B.shape[0], x.shape[-1], x.device)
    for i0, i1 in row_blocks(B.shape[0], x.shape[-1], block_rows, x.device, compiled):
        bias_block = bias[i0:i1] if bias is not None else None
        if weight is None:
            update = block_update(None, B[i0:i1], A, stages, activation, scaling, compiled=compiled)[0]
            chunks.append(x @ update.to(x.dtype).T)
        elif weight_in_out:
            folded = block_update(weight[:, i0:i1].T, B[i0:i1], A, stages, activation, scaling, compiled=compiled)[0]
            folded = folded.T.to(x.dtype).contiguous()
            chunks.append(x @ folded if bias_block is None else torch.addmm(bias_block, x, folded))
        else:
            folded = block_update(weight[i0:i1], B[i0:i1], A, stages, activation, scaling, compiled=compiled)[0]
            chunks.append(torch.nn.functional.linear(x, folded.to(x.dtype), bias_block))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)


class FusedLoranMatmul(torch.autograd.Function):
    """``x @ (W + scaling * H)^T + bias`` (``weight`` given, "folded") or ``x @ (scaling * H)^T`` (no weight).

    ``x`` is 2-D ``(N, in)`` in the compute dtype. ``weight`` is the frozen base weight in its own layout:
    ``(out, in)``, or ``(in, out)`` when ``weight_in_out`` (GPT-2's ``Conv1D``); each block is computed with the
    same operation the base layer uses (``F.linear`` / ``addmm``), so a zero update reproduces the base output
    bit for bit. Saves only ``x``, ``weight``/``bias`` (references) and the factors; rebuilds ``H`` block by block
    in backward: ``dH = scaling * G^T x`` per block, chained back analytically to ``A``, ``B``, ``P``, ``b``;
    ``dx = G (W + scaling H)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_in_out, scaling, activation, block_rows, A, B, *flat_stages):
        out = fused_forward(x, weight, bias, weight_in_out, scaling, activation, block_rows, A, B,
                            unflatten_stages(flat_stages))
        ctx.save_for_backward(x, weight, A, B, *flat_stages)
        ctx.weight_in_out, ctx.has_bias = weight_in_out, bias is not None
        ctx.scaling, ctx.activation, ctx.block_rows = scaling, activation, block_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, *flat_stages = ctx.saved_tensors
        stages = unflatten_stages(flat_stages)
        scaling, activation = ctx.scaling, ctx.activation
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_factors = any(ctx.needs_input_grad[7:])
        grad_out = grad_out.to(x.dtype)
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        grad_x = None
        grad_B = torch.zeros_like(at_least_float32(B)) if need_factors else None
        grad_A = torch.zeros_like(at_least_float32(A)) if need_factors else None
        grad_flat = [torch.zeros_like(at_least_float32(t)) if t is not None else None
                     for t in flat_stages] if need_factors else [None] * len(flat_stages)

        compiled = uses_compiled_kernels(activation, stages, B.shape[0], x.shape[-1], x.device)
        for i0, i1 in row_blocks(B.shape[0], x.shape[-1], ctx.block_rows, x.device, compiled):
            g = grad_out[:, i0:i1]
            # W + s f(BA) is only needed for dx; the factor gradients need only f'
            base_rows = None
            if need_x and weight is not None:
                base_rows = weight[:, i0:i1].T if ctx.weight_in_out else weight[i0:i1]
            grad_h = at_least_float32((g * scaling).T @ x) if need_factors else None
            update, block_grads = block_update_and_grads(
                base_rows, B[i0:i1], A, stages, activation, scaling, grad_h, need_update=need_x, compiled=compiled
            )
            del grad_h
            if need_x:
                update = update.to(x.dtype)
                if grad_x is None:
                    grad_x = (g @ update).to(acc_dtype)
                elif acc_dtype == x.dtype:
                    grad_x.addmm_(g, update)
                else:  # half precision: accumulate the blocks in float32
                    grad_x += (g @ update).to(acc_dtype)
            del update
            if need_factors:
                dB, dA, dP, db = block_grads
                del block_grads
                grad_B[i0:i1] = dB
                grad_A += dA
                for k, (gp, gb) in enumerate(zip(dP, db)):
                    if gp is not None:
                        grad_flat[2 * k] += gp
                    if gb is not None:
                        grad_flat[2 * k + 1] += gb

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        grad_bias = grad_out.sum(0) if (need_bias and ctx.has_bias) else None
        return (
            cast(grad_x, x),
            None,
            grad_bias,
            None,
            None,
            None,
            None,
            cast(grad_A, A),
            cast(grad_B, B),
            *[cast(g, t) if t is not None else None for g, t in zip(grad_flat, flat_stages)],
        )


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for ``x``'s device, else ``x.dtype``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def loran_matmul(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    stages: Sequence[Stage],
    activation: Activation,
    scaling: float,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    weight_in_out: bool = False,
    block_rows: Optional[int] = None,
) -> torch.Tensor:
    """``x @ (W + scaling * chain(BA))^T + bias`` for ``x`` of shape ``(..., in)`` through the fused Function.

    Without ``weight`` only the adapter's contribution ``scaling * x @ chain(BA)^T`` is returned. Runs in the
    autocast dtype when autocast is active, with autocast itself switched off inside so the float32
    non-linearity is not downcast.
    """
    dtype = compute_dtype_for(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = weight.to(dtype) if weight is not None else None
    b = bias.to(dtype) if (bias is not None and weight is not None) else None
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled():
            y = FusedLoranMatmul.apply(
                x2, w, b, weight_in_out, scaling, activation, block_rows, A, B, *flatten_stages(stages)
            )
        else:
            y = fused_forward(x2, w, b, weight_in_out, scaling, activation, block_rows, A, B, stages)
    return y.reshape(*lead, y.shape[-1])
