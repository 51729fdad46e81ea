"""How one call computes an update: rows per block and the kernel, decided once per call (:func:`make_plan`).

The decision uses the device, the update's shape and activation, whether autograd must see the operations, an explicit
block height or budget, and the environment (read once per process, :func:`environment`); never a clock or what ran
before. Every path (training forward and backward, no-grad evaluation, mixed batches, merging, export, diagnostics)
then runs the one block loop, :meth:`peft_loran.update.LowRankUpdate.blocks`, with it.

* CPU plan: blocks of :data:`CPU_BLOCK_ELEMENTS` (one budget for every kernel and every kind of call: an evaluation's
  blocks are no larger than training's, so evaluating inside training needs no memory training did not).
* Accelerator plan (the default wherever the device is not a CPU; ``PEFT_LORAN_PLAN=accelerator`` runs it on a CPU):
  on a GPU the arithmetic of a block takes microseconds and every block costs several kernel launches, so a layer
  is computed in as few equal blocks as :data:`ACCELERATOR_BLOCK_ELEMENTS` allows.

Each constant's measurement is in docs/benchmarks.md ("The plan's constants").
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .activations import Activation
from .kernels import BlockKernel, choose_kernel

#: Elements of one ``(rows, in)`` float32 block on the CPU plan (8 MiB). At Llama-2-7B's widths (4096) that is 512
#: rows per block, the height below which each block's extra pass over the ``(tokens, in)`` input cost more than the
#: update itself; at hidden 1024 it is the whole layer.
CPU_BLOCK_ELEMENTS = 2**21
#: The accelerator plan's bound on one float32 temporary (2**24 elements = 64 MiB): a whole 4096 x 4096 layer is one
#: block, 11008 x 4096 four. A memory bound (backward holds about three such temporaries), not a speed setting.
ACCELERATOR_BLOCK_ELEMENTS = 2**24
TARGETS = ("auto", "cpu", "accelerator")


@dataclass(frozen=True)
class Environment:
    """The plan's environment variables, read once per process: ``PEFT_LORAN_PLAN`` (``auto``, ``cpu`` or
    ``accelerator``) and ``PEFT_LORAN_BLOCK_ELEMENTS`` (elements per block, overriding the plan's budget)."""

    target: str = "auto"
    block_elements: Optional[int] = None


@functools.cache
def environment() -> Environment:
    """The environment as it was when first asked (``environment.cache_clear()`` reads it again)."""
    target = os.environ.get("PEFT_LORAN_PLAN", "auto").strip().lower() or "auto"
    if target not in TARGETS:
        raise ValueError(f"PEFT_LORAN_PLAN={target!r} is not one of {TARGETS}.")
    raw = os.environ.get("PEFT_LORAN_BLOCK_ELEMENTS", "").strip()
    if raw and (not raw.isdigit() or int(raw) <= 0):
        raise ValueError(f"PEFT_LORAN_BLOCK_ELEMENTS={raw!r} must be a positive integer (elements per block).")
    return Environment(target, int(raw) if raw else None)


class BlockPlan(NamedTuple):
    """How one call computes an update: ``block_rows`` rows per block, each computed by ``kernel``."""

    block_rows: int
    kernel: BlockKernel
    target: str

    @property
    def compiled(self) -> bool:
        return self.kernel.name == "compiled"

    def ranges(self, rows: int) -> list[tuple[int, int]]:
        """The blocks' ``(first row, end)`` for an update of ``rows`` rows (what the block loop walks)."""
        return [(i0, min(i0 + self.block_rows, rows)) for i0 in range(0, rows, self.block_rows)]


def make_plan(rows: int, cols: int, activation: Activation, plain: bool, device: torch.device, autograd: bool,
              block_rows: Optional[int] = None, budget: Optional[int] = None,
              target: Optional[str] = None) -> BlockPlan:
    """The plan for an update of shape ``(rows, cols)``: ``plain`` is the paper's ``f(B A)`` (no chain), ``autograd``
    says that autograd must see the operations (the eager kernel then runs them); ``block_rows`` (the config's)
    beats ``budget`` (elements per block) beats ``PEFT_LORAN_BLOCK_ELEMENTS`` beats the target's budget."""
    env = environment()
    target = target or (env.target if env.target != "auto" else ("cpu" if device.type == "cpu" else "accelerator"))
    kernel = choose_kernel(activation, plain, rows * cols, device, target, autograd)
    budget = budget or env.block_elements
    if block_rows:
        height = block_rows
    elif target == "cpu":
        height = max(1, (budget or CPU_BLOCK_ELEMENTS) // max(cols, 1))
    else:
        height = equal_blocks(rows, cols, budget or ACCELERATOR_BLOCK_ELEMENTS)
    return BlockPlan(min(height, max(rows, 1)), kernel, target)


def equal_blocks(rows: int, cols: int, budget: int) -> int:
    """Rows per block for the fewest blocks of at most ``budget`` elements, of equal height where a divisor of
    ``rows`` allows (one block shape per layer)."""
    need = max(1, math.ceil(rows * max(cols, 1) / budget))
    for n in range(need, min(rows, 4 * need) + 1):
        if rows % n == 0:
            return rows // n
    return math.ceil(rows / need)
