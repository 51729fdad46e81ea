"""Block kernels: what computes one block of rows of an update ``D = s chain(B A)``, behind one interface.

A :class:`BlockKernel` has two operations on the rows of a block, given the block's rows of ``B``, the factor ``A``,
the chain's stages (float32, or float64 for float64 factors: the update promotes them once), the activation and the
scaling:

* ``value`` -> ``base_rows + D[rows]`` (``base_rows`` None: ``D[rows]``), cast to ``out_dtype``;
* ``value_and_grads`` -> the same value (or None) and the block's gradients ``(dB[rows], dA, [dP_k], [db_k])``, given
  ``grad_h``, the unscaled gradient of the block's rows of ``D / s``.

Two implementations compute the same function. :class:`EagerKernel` runs plain torch operations, for every chain
(and differentiable by autograd, where autograd must see them). :class:`CompiledKernel` serves the plain update
``f(B A)``: ``torch.compile`` turns ``B A``, ``f``, ``f'``, the scaling, the base and the output cast of a block into
one fused pass (C++ on CPUs, Triton on GPUs), and the factor gradients into two more GEMMs in the same graph. It
traces the activation's one definition with every constant as an argument: one compiled kernel per function serves
every layer with dynamic shapes, and compiles once per setting (its floats become literals: :data:`WITH_COMPILE_SETTINGS`).

``torch.compile`` compiles on a kernel's first call, so a compilation that fails (no working compiler, an inductor
error) can only show there, inside a call. The compiled kernel then computes that block eagerly (the same numbers),
warns once with the reason and records the failure, and every later plan chooses the eager kernel for that
activation. Any other error (out of memory, a bug) is raised as it is.

Switch: ``set_kernel_compilation("auto" | "0" | "1")`` for this process, else ``PEFT_LORAN_COMPILE`` (read once)
= ``auto`` (default) / ``0`` (never) / ``1`` (every plain update).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .activations import Activation
from .trig import MAX_ARGUMENT, VectorTrig


class Stage(NamedTuple):
    """One stage of the original's chain: ``H_k = f(H_{k-1}) @ P + b`` (``P``, ``b`` None where absent)."""

    P: Optional[torch.Tensor]
    b: Optional[torch.Tensor]


#: The gradients of one block: ``(dB rows, dA, [dP_k or None], [db_k or None])``, float32 (float64 stays).
BlockGrads = tuple[torch.Tensor, torch.Tensor, list, list]

#: ``auto`` compiles the CPU plan's kernel for updates (out x in) of at least this many elements (1024 x 1024):
#: compiling costs seconds once per process, which pays back within a few dozen training steps there; on the
#: narrower layers of the models the command line ships (384 and 576 wide) it would not pay within a run
#: (docs/benchmarks.md, "The plan's constants").
AUTO_COMPILE_MIN_ELEMENTS = 2**20

#: Up to this rank the compiled kernels form ``B A`` on CPUs inside their element-wise loop (``r`` multiply-adds per
#: element) instead of as a GEMM whose ``(rows, in)`` result is written out and read back; each such rank compiles
#: once. Measured at rank 8 only (docs/design.md, "The constants and what each is worth"); above it, and on GPUs
#: (not measured), ``B A`` stays a GEMM.
INLINE_PRODUCT_MAX_RANK = 8

MODES = ("auto", "0", "1")
_mode: Optional[str] = None  # set_kernel_compilation's choice; None: the environment's
_failures: dict[str, str] = {}  # activation name -> why compiling its kernels failed
_compiled: dict[Callable, dict[str, Callable]] = {}  # activation function -> its compiled kernels
_kernels: dict[Activation, "CompiledKernel"] = {}  # one kernel object per activation setting
#: What a failed compilation raises: the backend compiler or inductor failing (no compiler, unsupported code).
COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError,
)


# ------------------------------------------------------------------------------------------------------ mode
def set_kernel_compilation(mode: "str | bool | None") -> None:
    """``"auto"``/``True`` (compile where it pays), ``"1"`` (always), ``"0"``/``False`` (never: eager only), ``None``
    (back to ``PEFT_LORAN_COMPILE``). Also forgets earlier compile failures."""
    global _mode
    if mode is None:
        _mode = None
    else:
        value = {True: "auto", False: "0"}[mode] if isinstance(mode, bool) else str(mode).strip().lower()
        if value not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, a bool or None, got {mode!r}.")
        _mode = value
    _failures.clear()


@functools.cache
def _environment_mode() -> str:
    value = os.environ.get("PEFT_LORAN_COMPILE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"PEFT_LORAN_COMPILE={value!r} is not one of {MODES}; set it to auto, 0 or 1.")
    return value


def kernel_compilation() -> str:
    """The mode in force: :func:`set_kernel_compilation`'s, else ``PEFT_LORAN_COMPILE`` as first read."""
    return _mode if _mode is not None else _environment_mode()


def compile_failures() -> dict[str, str]:
    """Activations whose kernels failed to compile in this process, with the reason (they run eagerly)."""
    return dict(_failures)


@functools.cache
def can_compile(device_type: str) -> bool:
    """Whether ``torch.compile`` has a backend for the device type here: a C++ compiler for CPUs, Triton for GPUs."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def choose_kernel(activation: Activation, plain: bool, elements: int, device: torch.device, target: str,
                  autograd: bool) -> "BlockKernel":
    """The kernel for an update of ``elements`` (out x in) on ``device``: the compiled one for the plain update
    ``f(B A)`` where the mode allows it (``1``: always; ``auto``: where the device can compile, on the CPU plan from
    :data:`AUTO_COMPILE_MIN_ELEMENTS`), else the eager one. Always eager where autograd must see the operations,
    under an outer ``torch.compile`` (which fuses the eager code itself), for chains, for activations without a
    known derivative, and for activations whose kernels failed to compile in this process."""
    mode = _mode if _mode is not None else _environment_mode()
    definition = activation.definition
    if (mode == "0" or not plain or autograd or torch.compiler.is_compiling() or not definition.derivative_known
            or definition.name in _failures):
        return EAGER
    if mode == "auto" and (not can_compile(device.type) or (target == "cpu" and elements < AUTO_COMPILE_MIN_ELEMENTS)):
        return EAGER
    kernel = _kernels.get(activation)
    if kernel is None:
        kernel = _kernels[activation] = CompiledKernel(activation)
    return kernel


# ----------------------------------------------------------------------------------------------- the eager math
def chain_rows(B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage], activation: Activation,
               keep: bool = False) -> tuple[torch.Tensor, list[tuple]]:
    """Unscaled update rows ``H_K`` for the given rows of ``B`` (factors already in float32 or float64). With
    ``keep`` also, per stage, ``(Z_k, U_k, f'(Z_k))`` for :func:`chain_rows_backward`. Plain torch operations."""
    h = B_rows @ A
    saved = []
    for P, b in stages:
        z = h
        if keep:
            u, fprime = activation.value_and_derivative(z)
            # keep only what the backward needs: Z for activations without an analytic f', U for dP
            saved.append((z if fprime is None else None, u if P is not None else None, fprime))
        else:
            u = activation(z)
        h = u @ P if P is not None else u
        if b is not None:
            h = h + b
    return h, saved


def chain_rows_backward(grad_h: torch.Tensor, B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage],
                        activation: Activation, saved: Sequence[tuple]) -> BlockGrads:
    """Analytic vector-Jacobian product of :func:`chain_rows`: grads of ``B_rows``, ``A``, each ``P`` and ``b``.
    May overwrite ``grad_h`` (a temporary of the caller)."""
    grad_P: list[Optional[torch.Tensor]] = [None] * len(stages)
    grad_b: list[Optional[torch.Tensor]] = [None] * len(stages)
    for k in reversed(range(len(stages))):
        P, b = stages[k]
        z, u, fprime = saved[k]
        if b is not None:
            grad_b[k] = grad_h.sum(0)
        if P is not None:
            grad_P[k] = u.T @ grad_h
            grad_u = grad_h @ P.T
        else:
            grad_u = grad_h
        grad_h = activation.grad(z, grad_u) if fprime is None else grad_u.mul_(fprime)
    return grad_h @ A.T, B_rows.T @ grad_h, grad_P, grad_b


def block_update(base_rows: Optional[torch.Tensor], B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage],
                 activation: Activation, scaling: float, keep: bool = False) -> tuple[torch.Tensor, list[tuple]]:
    """``base_rows + scaling * H`` (``base_rows`` None: the scaled update alone) for a block of rows, plus what
    :func:`chain_rows_backward` needs when ``keep``: the plain case through the activation's ``scaled_add``."""
    if len(stages) == 1 and stages[0].P is None and stages[0].b is None:
        m = B_rows @ A
        out, fprime = activation.scaled_add(base_rows, m, scaling, with_derivative=keep)
        if keep and fprime is None:  # no analytic derivative: keep Z for autograd (m untouched by scaled_add)
            return out, [(m, None, None)]
        return out, [(None, None, fprime)] if keep else []
    h, saved = chain_rows(B_rows, A, stages, activation, keep=keep)
    return (h.mul_(scaling) if base_rows is None else torch.add(base_rows, h, alpha=scaling)), saved


# -------------------------------------------------------------------------------------------- the interface
class BlockKernel(ABC):
    """One block of an update: see the module docstring."""

    name: str = ""

    @abstractmethod
    def value(self, B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage], activation: Activation,
              scaling: float, base_rows: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """``base_rows + D[rows]`` in ``out_dtype``."""

    @abstractmethod
    def value_and_grads(self, B_rows: torch.Tensor, A: torch.Tensor, stages: Sequence[Stage], activation: Activation,
                        scaling: float, base_rows: Optional[torch.Tensor], out_dtype: torch.dtype,
                        grad_h: torch.Tensor, need_value: bool) -> tuple[Optional[torch.Tensor], BlockGrads]:
        """``(value or None, gradients)`` of the block; may overwrite ``grad_h``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EagerKernel(BlockKernel):
    """The block in plain torch operations: every chain, every activation; what autograd differentiates when it
    must see the operations, and what runs where nothing is compiled."""

    name = "eager"

    def value(self, B_rows, A, stages, activation, scaling, base_rows, out_dtype):
        return block_update(base_rows, B_rows, A, stages, activation, scaling)[0].to(out_dtype)

    def value_and_grads(self, B_rows, A, stages, activation, scaling, base_rows, out_dtype, grad_h, need_value):
        out, saved = block_update(base_rows, B_rows, A, stages, activation, scaling, keep=True)
        grads = chain_rows_backward(grad_h.mul_(scaling), B_rows, A, stages, activation, saved)
        return (out.to(out_dtype) if need_value else None), grads


#: The one eager kernel (it holds no state).
EAGER = EagerKernel()


#: Settings of dynamo under which the kernels compile and run, scoped to each call (``torch._dynamo.config.patch``
#: sets them for the calling context only and restores them on return). Shapes stay dynamic, but the float arguments
#: (the scaling, the offset, the activation's parameters) are compiled in as literals: as dynamic scalars the
#: generated C++ loads each of them inside its vector loop, and the fused pass ran 1.14-1.19x slower
#: (``benchmarks/compiled_constants.py``). Each new setting then compiles once more, and the kernels of every
#: activation share one code object and so one recompile budget (torch's default: 8), which a process's scalings
#: (``+s`` to merge, ``-s`` to unmerge), base or none, dtypes, shapes, ranks up to
#: :data:`INLINE_PRODUCT_MAX_RANK` and the inline sine or torch's (``vector_trig``) would use up: past it torch would
#: run the kernels' Python eagerly for the rest of the process. Hence the budget of 64. Names missing from an older
#: torch are left out (it then compiles as before).
COMPILE_SETTINGS = {"specialize_float": True, "recompile_limit": 64}
WITH_COMPILE_SETTINGS = torch._dynamo.config.patch(
    {name: value for name, value in COMPILE_SETTINGS.items() if hasattr(torch._dynamo.config, name)})


def _product(B_rows: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``B_rows @ A`` as the compiled kernels trace it: on CPUs, up to :data:`INLINE_PRODUCT_MAX_RANK`, a sum of ``r``
    outer products, which inductor fuses into the element-wise loop (the rank is specialized: one compilation per
    rank); a GEMM otherwise, and always where the kernel runs eagerly (torch's fallback once its recompile budget is
    spent), where the unrolled sum would build ``r`` full-size temporaries."""
    rank = B_rows.shape[1]
    if rank > INLINE_PRODUCT_MAX_RANK or B_rows.device.type != "cpu" or not torch.compiler.is_compiling():
        return B_rows @ A
    z = B_rows[:, :1] * A[:1]
    for k in range(1, rank):
        z = z + B_rows[:, k:k + 1] * A[k:k + 1]
    return z


def _build(activation: Activation) -> dict[str, Callable]:
    """The compiled kernels of the activation's function (one set per function; each setting compiles once).
    ``vector_trig``: trace ``f`` under :class:`trig.VectorTrig` (its sines and cosines inline; a Python bool, so each
    value is its own compiled graph)."""
    f = activation.definition.function

    def f_with_trig(z, params, derivative, vector_trig):
        if vector_trig and torch.compiler.is_compiling():  # torch's eager fallback: its own sine, no mode
            with VectorTrig():
                return f(z, *params, derivative=derivative)
        return f(z, *params, derivative=derivative)

    def update_from(base, y, scaling, offset, out_dtype):
        y = y - offset
        y = y * scaling if base is None else base + scaling * y
        return y.to(out_dtype)

    def value(B_rows, A, vector_trig, base, scaling, offset, out_dtype, *params):
        y = f_with_trig(_product(B_rows, A), params, False, vector_trig)[0]
        return update_from(base, y, scaling, offset, out_dtype)

    def value_and_grads(B_rows, A, vector_trig, base, scaling, offset, out_dtype, grad_h, *params):
        y, d = f_with_trig(_product(B_rows, A), params, True, vector_trig)
        grad_z = grad_h * d * scaling
        return update_from(base, y, scaling, offset, out_dtype), grad_z @ A.T, B_rows.T @ grad_z

    def grads_only(B_rows, A, vector_trig, scaling, grad_h, *params):
        grad_z = grad_h * f_with_trig(_product(B_rows, A), params, True, vector_trig)[1] * scaling
        return grad_z @ A.T, B_rows.T @ grad_z

    kernels = {"value": value, "value_and_grads": value_and_grads, "grads_only": grads_only}
    return {name: WITH_COMPILE_SETTINGS(torch.compile(k, dynamic=True)) for name, k in kernels.items()}


class CompiledKernel(BlockKernel):
    """The plain update's block as one compiled pass (see the module docstring); a block whose compilation fails is
    computed by the eager kernel."""

    name = "compiled"

    def __init__(self, activation: Activation) -> None:
        self.activation = activation
        #: ``|w|`` of an activation whose sines and cosines are of ``w x`` (None: others)
        self.trig_frequency = activation.trig_frequency

    def _run(self, kernel: str, B_rows: torch.Tensor, A: torch.Tensor, *args) -> Optional[tuple]:
        """The compiled ``kernel`` on the block (the no-grad kernels: detached), or None if it failed to compile. On
        CPUs the activation's sines and cosines are computed inline (:mod:`peft_loran.trig`) when the block's
        arguments ``w (B A)`` are bounded within ``trig.MAX_ARGUMENT``, by ``max_i sum_k |B_ik| max_j |A_kj|``."""
        B_rows, A = B_rows.detach(), A.detach()
        vector_trig = (self.trig_frequency is not None and A.device.type == "cpu" and A.dtype == torch.float32
                       and self.trig_frequency * float((B_rows.abs() @ A.abs().amax(dim=1)).amax()) <= MAX_ARGUMENT)
        detached = []
        for a in args:
            detached.append(a.detach() if isinstance(a, torch.Tensor) else a)
        key = self.activation.definition.function
        try:
            if key not in _compiled:
                _compiled[key] = _build(self.activation)
            return _compiled[key][kernel](B_rows, A, vector_trig, *detached, *self.activation.values)
        except COMPILE_ERRORS as exc:
            _failures[self.activation.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"peft-loran: compiling the fused LoRAN kernel for {self.activation.name!r} failed, so it runs on the "
                f"eager kernel in this process (same results, slower). Set PEFT_LORAN_COMPILE=0 to skip the attempt. "
                f"Reason: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=4)
            return None

    def value(self, B_rows, A, stages, activation, scaling, base_rows, out_dtype):
        out = self._run("value", B_rows, A, base_rows, scaling, activation.offset, out_dtype)
        return out if out is not None else EAGER.value(B_rows, A, stages, activation, scaling, base_rows, out_dtype)

    def value_and_grads(self, B_rows, A, stages, activation, scaling, base_rows, out_dtype, grad_h, need_value):
        if need_value:
            out = self._run("value_and_grads", B_rows, A, base_rows, scaling, activation.offset, out_dtype, grad_h)
            value, grads = (out[0], out[1:]) if out is not None else (None, None)
        else:
            value, grads = None, self._run("grads_only", B_rows, A, scaling, grad_h)
        if grads is None:
            return EAGER.value_and_grads(B_rows, A, stages, activation, scaling, base_rows, out_dtype, grad_h,
                                         need_value)
        return value, (grads[0], grads[1], [None], [None])

    def __eq__(self, other) -> bool:
        return isinstance(other, CompiledKernel) and other.activation == self.activation

    def __hash__(self) -> int:
        return hash(("compiled", self.activation))
