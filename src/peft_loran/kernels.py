"""Compiled element-wise kernels for the plain LoRAN update ``f(B A)`` of one block of rows.

Why this exists: per block, the fused path's dense work is the rank-r product ``u = B A``, ``f(u)``, ``f'(u)``
and a few element-wise combinations with the base weight and the gradient. In eager PyTorch each of those is a
separate pass over the block (and ``B A`` with a tiny inner dimension is a GEMM that BLAS does badly).
``torch.compile`` (inductor) turns the whole sequence into one loop (docs/benchmarks.md measures what it saves).

The kernels trace each activation's one definition (``ActivationDefinition.function``, the same function the
eager path runs): every float constant (Sinter's ``a`` and ``w``, the scaling, the zero-centring offset) is an
argument, so one compiled kernel per function serves every setting and layer, and nothing global is patched per
call. Registered activations compile like the built-ins; chains with ``P``/``b`` stay on the eager path (``P``
mixes columns). By default the kernels
serve wide layers on CPUs with a C++ compiler (:func:`compiles`; on GPUs only with ``PEFT_LORAN_COMPILE=1``: on an
H200 they were slower than the eager path, docs/benchmarks.md), and never while an outer ``torch.compile`` is tracing
(it fuses the eager code itself).

If compiling fails (no working compiler, an inductor error), a warning gives the whole reason and that function
runs on the eager kernels, which compute the same thing; other functions and other processes are unaffected
(:func:`compile_failures` lists what failed). Any other error (out of memory, a bug) is raised as it is.

Switch: ``set_kernel_compilation("auto" | "0" | "1")`` for this process, else the environment variable
``PEFT_LORAN_COMPILE`` (read on each use) = ``auto`` (default: compile for layers whose update has at least
:data:`AUTO_COMPILE_MIN_ELEMENTS` elements, on CPUs with a C++ compiler) / ``0`` (never) / ``1`` (every plain layer,
any size, any device). Which kernels run is decided by that mode, the activation, the device and the layer's shape,
never by a clock or by how long the process has run: the same configuration always runs the same kernels, so a
seeded run reproduces bit for bit.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable, Optional

import torch

from .activations import Activation

#: ``auto`` compiles the kernels for layers whose update (out x in) has at least this many elements (2048 x 2048).
#: Compiling costs about 15 s once per process on an empty inductor cache (docs/benchmarks.md, one-time costs); at
#: 4096-wide layers the kernels save about a third of a second per adapted layer and training step, at 1024-wide
#: ones a few milliseconds, so wide layers pay it back within a few steps and narrow ones would not.
AUTO_COMPILE_MIN_ELEMENTS = 2**22

_MODES = ("auto", "0", "1")
_mode: Optional[str] = None  # set_kernel_compilation's choice; None: the environment decides
_failures: dict[str, str] = {}  # activation name -> why compiling its kernels failed
_kernels: dict[Callable, dict[str, Callable]] = {}
_device_ok: dict[str, bool] = {}
#: What a failed compilation raises: the backend compiler or inductor failing (no compiler, unsupported code).
COMPILE_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError, torch._inductor.exc.CppCompileError,
)


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


def _auto_device(device: torch.device) -> bool:
    if device.type not in _device_ok:
        if device.type == "cpu":
            compiler = os.environ.get("CXX", "g++")
            ok = any(shutil.which(c) for c in (compiler, "g++", "c++", "clang++"))
        else:  # GPUs: the Triton kernels ran slower than the eager path on an H200 (docs/benchmarks.md): on request
            ok = False
        _device_ok[device.type] = ok
    return _device_ok[device.type]


def compiles(activation: Activation, rows: int, cols: int, device: torch.device) -> bool:
    """Whether the compiled kernels serve a plain update ``f(B A)`` of shape ``(rows, cols)`` on ``device``: decided
    by the mode, the activation, the device and the shape alone (the block budget depends on it too)."""
    if activation.name in _failures:
        return False
    mode = kernel_compilation()
    if mode == "0":
        return False
    return mode == "1" or (_auto_device(device) and rows * cols >= AUTO_COMPILE_MIN_ELEMENTS)


def _usable(activation: Activation, need_derivative: bool) -> bool:
    # Only in no-grad code (the fused Function's forward/backward, merges, the eval cache): with grad enabled the
    # caller wants autograd through the eager ops; under an outer torch.compile the eager code is traced instead.
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return not (need_derivative and not activation.has_derivative) and activation.name not in _failures


#: Up to this rank the kernels form ``B A`` inside their loop (r multiply-adds per element) instead of calling a
#: GEMM: BLAS is slow for such a thin inner dimension. Above it the GEMM wins (measured at r = 16 and 32).
INLINE_PRODUCT_MAX_RANK = 8


def _low_rank_product(B_rows: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    # the broadcast form is only cheap once inductor fuses it; run eagerly it would materialise (rows, r, cols)
    if B_rows.shape[1] <= INLINE_PRODUCT_MAX_RANK and torch.compiler.is_compiling():
        return (B_rows[:, :, None] * A[None, :, :]).sum(1)
    return B_rows @ A


def _build(activation: Activation) -> dict[str, Callable]:
    f = activation.definition.function

    def update_from(base, y, scaling, offset):
        y = y - offset
        return y * scaling if base is None else base + scaling * y

    def value(base, B_rows, A, scaling, offset, *params):
        return update_from(base, f(_low_rank_product(B_rows, A), *params)[0], scaling, offset)

    def value_and_grad(base, B_rows, A, scaling, offset, grad_h, *params):
        y, d = f(_low_rank_product(B_rows, A), *params, derivative=True)
        return update_from(base, y, scaling, offset), grad_h * d

    def grad_only(B_rows, A, grad_h, *params):
        return grad_h * f(_low_rank_product(B_rows, A), *params, derivative=True)[1]

    kernels = {"value": value}
    if activation.has_derivative:
        kernels.update(value_and_grad=value_and_grad, grad_only=grad_only)
    return {name: torch.compile(k, dynamic=True) for name, k in kernels.items()}


def _run(activation: Activation, name: str, *args):
    """Run kernel ``name`` of the activation's function; None (use the eager path) if compiling it failed."""
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # no-grad kernels
    key = activation.definition.function
    try:
        if key not in _kernels:
            _kernels[key] = _build(activation)
        return _kernels[key][name](*args, *activation.values)
    except COMPILE_ERRORS as exc:
        _failures[activation.name] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"peft-loran: compiling the fused LoRAN kernel for {activation.name!r} failed, so it runs on the eager "
            f"kernels in this process (same results, slower). Set PEFT_LORAN_COMPILE=0 to skip the attempt. "
            f"Reason: {type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def value(
    activation: Activation, base: Optional[torch.Tensor], B_rows: torch.Tensor, A: torch.Tensor, scaling: float
) -> Optional[torch.Tensor]:
    """``base + scaling * f(B_rows A)`` (``base`` None: 0) in one compiled pass, or None: use the eager path. The
    caller has decided with :func:`compiles` that this layer uses the kernels.

    ``B_rows`` and ``A`` are float32 (or float64); so is the result."""
    if not _usable(activation, need_derivative=False):
        return None
    return _run(activation, "value", base, B_rows, A, scaling, activation.offset)


def value_and_grad(
    activation: Activation,
    base: Optional[torch.Tensor],
    B_rows: torch.Tensor,
    A: torch.Tensor,
    scaling: float,
    grad_h: torch.Tensor,
    need_value: bool,
) -> Optional[tuple[Optional[torch.Tensor], torch.Tensor]]:
    """``(base + scaling * f(B_rows A) or None, grad_h * f'(B_rows A))`` in one compiled pass, or None: use the
    eager path. The value is skipped (None) when ``need_value`` is False."""
    if not _usable(activation, need_derivative=True):
        return None
    if need_value:
        return _run(activation, "value_and_grad", base, B_rows, A, scaling, activation.offset, grad_h)
    grad = _run(activation, "grad_only", B_rows, A, grad_h)
    return None if grad is None else (None, grad)
