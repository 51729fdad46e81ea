"""Block kernels: what computes one block of rows of an update, behind one interface.

A :class:`BlockKernel` has two operations on the rows ``[i0, i1)`` of an update ``D = s chain(B A)``:

* ``value(update, i0, i1, base_rows, out_dtype)`` -> ``base_rows + D[i0:i1]`` (``base_rows`` None: ``D[i0:i1]``);
* ``value_and_grads(update, i0, i1, base_rows, grad_h, need_value, out_dtype)`` -> the same value (or None when not
  needed) and the gradients ``(dB[i0:i1], dA, [dP_k], [db_k])`` of the block, given ``grad_h``, the unscaled
  gradient of the block's rows of ``D / s`` (``G[:, i0:i1]^T x``: the scaling is applied inside the kernel).

Two implementations compute the same function. :class:`EagerKernel` (in :mod:`peft_loran.functional`, with the
rest of the eager math) runs plain torch operations, for every chain. :class:`CompiledKernel` (here) serves the
plain update ``f(B A)``: ``torch.compile`` turns ``B A``, ``f``, ``f'``, the scaling, the base and the output cast of
a block into one fused pass (C++ on CPUs, Triton on GPUs), and the factor gradients into two more GEMMs inside the
same graph. It traces the activation's one definition (``ActivationDefinition.function``) with every constant as an
argument, so one compiled kernel per function serves every setting and layer, compiled once with dynamic shapes
(no recompilation per block, layer or step).

Which kernel computes an update is decided by the update's block plan (:meth:`peft_loran.functional.LowRankUpdate.
plan`), from the mode below, the device, the shape, and whether autograd must see the operations; see
:func:`compiled_kernel_for`. If compiling fails (no working compiler, an inductor error), a warning gives the reason
and that activation runs on the eager kernel for the rest of the process (:func:`compile_failures`); any other
error (out of memory, a bug) is raised as it is.

Switch: ``set_kernel_compilation("auto" | "0" | "1")`` for this process, else the environment variable
``PEFT_LORAN_COMPILE`` (read on each use) = ``auto`` (default) / ``0`` (never) / ``1`` (every plain update).
"""

from __future__ import annotations

import os
import shutil
import warnings
from abc import ABC, abstractmethod
from typing import Callable, Optional, Protocol, Sequence

import torch

from .activations import Activation


class Update(Protocol):
    """What a kernel reads of an update (``functional.LowRankUpdate`` is the one implementation)."""

    A: torch.Tensor
    B: torch.Tensor
    stages: Sequence
    activation: Activation
    scaling: float

    def factors_at_least_float32(self) -> tuple[torch.Tensor, torch.Tensor]: ...

#: The gradients of one block: ``(dB rows, dA, [dP_k or None], [db_k or None])``, float32 (float64 stays).
BlockGrads = tuple[torch.Tensor, torch.Tensor, list, list]

#: ``auto`` compiles the CPU plan's kernel for updates (out x in) of at least this many elements (1024 x 1024).
#: Compiling costs seconds once per process (docs/benchmarks.md, one-time costs). On two cores at hidden 1024 with
#: all seven projections adapted the kernel took a training step from 2.1x to 1.8x LoRA's and an evaluation forward
#: from 1.55x to 1.36x the base model's, so it pays back within a few dozen steps there; on narrower layers (the
#: 384- and 576-wide models the command line ships) the eager kernel is kept, where compiling would not pay.
AUTO_COMPILE_MIN_ELEMENTS = 2**20

_MODES = ("auto", "0", "1")
_mode: Optional[str] = None  # set_kernel_compilation's choice; None: the environment decides
_failures: dict[str, str] = {}  # activation name -> why compiling its kernels failed
_compiled: dict[Callable, dict[str, Callable]] = {}  # activation function -> its compiled kernels
_can_compile: dict[str, bool] = {}  # device type -> a compiler backend is there
#: What a failed compilation raises: the backend compiler or inductor failing (no compiler, unsupported code).
COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError,
)


class CompileFailed(RuntimeError):
    """Compiling an activation's kernels failed in this process (recorded; its updates run eagerly)."""


# ------------------------------------------------------------------------------------------------------ mode
def set_kernel_compilation(mode: "str | bool | None") -> None:
    """``"auto"``/``True`` (compile where it pays), ``"1"`` (always), ``"0"``/``False`` (never: eager only), ``None``
    (back to the environment variable ``PEFT_LORAN_COMPILE``). Also forgets earlier compile failures."""
    global _mode
    if mode is None:
        _mode = None
    else:
        value = {True: "auto", False: "0"}[mode] if isinstance(mode, bool) else str(mode).strip().lower()
        if value not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, a bool or None, got {mode!r}.")
        _mode = value
    _failures.clear()


def kernel_compilation() -> str:
    """The mode in force: the one set with :func:`set_kernel_compilation`, else ``PEFT_LORAN_COMPILE``."""
    if _mode is not None:
        return _mode
    value = os.environ.get("PEFT_LORAN_COMPILE", "auto").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"PEFT_LORAN_COMPILE={value!r} is not one of {_MODES}; set it to auto, 0 or 1.")
    return value


def compile_failures() -> dict[str, str]:
    """Activations whose kernels failed to compile in this process, with the reason (they run eagerly)."""
    return dict(_failures)


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` has a backend for ``device`` here: a C++ compiler for CPUs, Triton for GPUs."""
    if device.type not in _can_compile:
        if device.type == "cpu":
            compiler = os.environ.get("CXX", "g++")
            ok = any(shutil.which(c) for c in (compiler, "g++", "c++", "clang++"))
        elif device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                ok = False
            else:
                ok = True
        else:
            ok = False
        _can_compile[device.type] = ok
    return _can_compile[device.type]


def compiled_kernel_for(activation: Activation, plain: bool, rows: int, cols: int, device: torch.device,
                        target: str, autograd: bool) -> Optional["CompiledKernel"]:
    """The compiled kernel for a plain update ``f(B A)`` of shape ``(rows, cols)``, or None (use the eager kernel).

    Decided by the mode, the activation, the device, the shape, the plan's target and whether autograd must see the
    operations (``autograd``: called with gradients enabled outside the fused Function, or under an outer
    ``torch.compile``, which fuses the eager code itself), never by a clock: ``0`` never; ``1`` every plain update;
    ``auto`` on the accelerator plan wherever the device can compile (one pass per block instead of several launches)
    and on the CPU plan for updates of at least :data:`AUTO_COMPILE_MIN_ELEMENTS`. An activation whose kernels
    failed to compile in this process, or that has no known derivative, runs eagerly."""
    if not plain or autograd or torch.compiler.is_compiling() or not activation.has_derivative:
        return None
    if activation.name in _failures:
        return None
    mode = kernel_compilation()
    if mode == "0":
        return None
    if mode == "auto":
        if not can_compile(device):
            return None
        if target == "cpu" and rows * cols < AUTO_COMPILE_MIN_ELEMENTS:
            return None
    return CompiledKernel(activation)


# -------------------------------------------------------------------------------------------- the interface
class BlockKernel(ABC):
    """One block of an update: see the module docstring."""

    name: str = ""

    @abstractmethod
    def value(self, update: Update, i0: int, i1: int, base_rows: Optional[torch.Tensor],
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``base_rows + D[i0:i1]`` in ``out_dtype`` (default: float32, float64 for float64 factors)."""

    @abstractmethod
    def value_and_grads(self, update: Update, i0: int, i1: int, base_rows: Optional[torch.Tensor],
                        grad_h: torch.Tensor, need_value: bool,
                        out_dtype: Optional[torch.dtype] = None) -> tuple[Optional[torch.Tensor], BlockGrads]:
        """``(value or None, gradients)`` of the block; may overwrite ``grad_h`` (a temporary of the caller)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Up to this rank the kernels form ``B A`` inside their loop (r multiply-adds per element) instead of calling a
#: GEMM: BLAS is slow for such a thin inner dimension. Above it the GEMM wins (measured at r = 16 and 32).
INLINE_PRODUCT_MAX_RANK = 8


def _low_rank_product(B_rows: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    # the broadcast form is only cheap once inductor fuses it; run eagerly it would materialise (rows, r, cols)
    if B_rows.shape[1] <= INLINE_PRODUCT_MAX_RANK and torch.compiler.is_compiling():
        return (B_rows[:, :, None] * A[None, :, :]).sum(1)
    return B_rows @ A


def _build(activation: Activation) -> dict[str, Callable]:
    """The compiled kernels of the activation's function (one set per function: every setting is an argument)."""
    f = activation.definition.function

    def update_from(base, y, scaling, offset, out_dtype):
        y = y - offset
        y = y * scaling if base is None else base + scaling * y
        return y if out_dtype is None else y.to(out_dtype)

    def value(base, B_rows, A, scaling, offset, out_dtype, *params):
        return update_from(base, f(_low_rank_product(B_rows, A), *params)[0], scaling, offset, out_dtype)

    def value_and_grads(base, B_rows, A, scaling, offset, out_dtype, grad_h, *params):
        y, d = f(_low_rank_product(B_rows, A), *params, derivative=True)
        grad_z = grad_h * d * scaling
        return update_from(base, y, scaling, offset, out_dtype), grad_z @ A.T, B_rows.T @ grad_z

    def grads_only(B_rows, A, scaling, grad_h, *params):
        grad_z = grad_h * f(_low_rank_product(B_rows, A), *params, derivative=True)[1] * scaling
        return grad_z @ A.T, B_rows.T @ grad_z

    kernels = {"value": value, "value_and_grads": value_and_grads, "grads_only": grads_only}
    return {name: torch.compile(k, dynamic=True) for name, k in kernels.items()}


class CompiledKernel(BlockKernel):
    """The plain update's block as one compiled pass (see the module docstring). Raises :class:`CompileFailed`
    (after recording and warning) when its kernels cannot be compiled; the caller then computes eagerly."""

    name = "compiled"

    def __init__(self, activation: Activation) -> None:
        self.activation = activation

    def _run(self, kernel: str, *args):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # no-grad kernels
        key = self.activation.definition.function
        try:
            if key not in _compiled:
                _compiled[key] = _build(self.activation)
            return _compiled[key][kernel](*args, *self.activation.values)
        except COMPILE_ERRORS as exc:
            _failures[self.activation.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"peft-loran: compiling the fused LoRAN kernel for {self.activation.name!r} failed, so it runs on the "
                f"eager kernels in this process (same results, slower). Set PEFT_LORAN_COMPILE=0 to skip the attempt. "
                f"Reason: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=4,
            )
            raise CompileFailed(self.activation.name) from None

    def value(self, update, i0, i1, base_rows, out_dtype=None):
        B, A = update.factors_at_least_float32()
        return self._run("value", base_rows, B[i0:i1], A, update.scaling, self.activation.offset, out_dtype)

    def value_and_grads(self, update, i0, i1, base_rows, grad_h, need_value, out_dtype=None):
        B, A = update.factors_at_least_float32()
        if need_value:
            value, grad_B, grad_A = self._run("value_and_grads", base_rows, B[i0:i1], A, update.scaling,
                                              self.activation.offset, out_dtype, grad_h)
        else:
            value, (grad_B, grad_A) = None, self._run("grads_only", B[i0:i1], A, update.scaling, grad_h)
        return value, (grad_B, grad_A, [None], [None])

    def __eq__(self, other) -> bool:
        return isinstance(other, CompiledKernel) and other.activation == self.activation

    def __hash__(self) -> int:
        return hash(("compiled", self.activation))
