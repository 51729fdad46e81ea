"""Compiled element-wise kernels for the plain LoRAN update ``f(B A)`` of one block of rows.

Why this exists: per block, the fused path's dense work is the rank-r product ``u = B A``, ``f(u)``, ``f'(u)``
and a few element-wise combinations with the base weight and the gradient. In eager PyTorch each of those is a
separate pass over the block (and ``B A`` with a tiny inner dimension is a GEMM that BLAS does badly).
``torch.compile`` (inductor) turns the whole sequence into one loop; on 2 CPU cores this took all seven
projections of the headline benchmark from 1.70x to 1.48x LoRA's step time (docs/benchmarks.md).

The kernels are built from the activation's own ``fn`` and ``derivative``, so every activation with an analytic
derivative gets them; chains with ``P``/``b`` stay on the eager path (``P`` mixes columns). They are used only for
blocks of at least :data:`MIN_ELEMENTS` elements (below that, compiling and calling cost more than they save), on
CPUs with a C++ compiler (on GPUs only with ``PEFT_LORAN_COMPILE=1``: not yet run there), and never while an outer
``torch.compile`` is tracing (it fuses the eager code itself). If compiling fails, a warning says why and the
process goes on with the eager kernels, which compute the same function.

Switch: environment variable ``PEFT_LORAN_COMPILE`` = ``auto`` (default) / ``0`` (never) / ``1`` (always, any
block size: used by the tests), or :func:`set_kernel_compilation` at run time.
"""

from __future__ import annotations

import os
import shutil
import warnings
import weakref
from typing import Callable, Optional

import torch

from .activations import Activation

#: Smallest block (rows x cols) worth a compiled call; tiny test models stay eager.
MIN_ELEMENTS = 2**15

_MODES = ("auto", "0", "1")
_mode = os.environ.get("PEFT_LORAN_COMPILE", "auto").strip().lower() or "auto"
if _mode not in _MODES:
    warnings.warn(f"PEFT_LORAN_COMPILE={_mode!r} is not one of {_MODES}; using 'auto'.", RuntimeWarning, stacklevel=1)
    _mode = "auto"
_failed: Optional[str] = None
_kernels: "weakref.WeakKeyDictionary[Activation, dict[str, Callable]]" = weakref.WeakKeyDictionary()
_device_ok: dict[str, bool] = {}


def set_kernel_compilation(mode: str | bool) -> None:
    """``"auto"``/``True`` (compile where it pays), ``"1"`` (always), ``"0"``/``False`` (never: eager only)."""
    global _mode, _failed
    value = {True: "auto", False: "0"}.get(mode, mode) if isinstance(mode, bool) else str(mode).strip().lower()
    if value not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES} or a bool, got {mode!r}.")
    _mode, _failed = value, None


def kernel_compilation() -> str:
    """The current mode; ``"0"`` after a compile failure switched the kernels off for this process."""
    return "0" if _failed else _mode


def _auto_device(device: torch.device) -> bool:
    if device.type not in _device_ok:
        if device.type == "cpu":
            compiler = os.environ.get("CXX", "g++")
            ok = any(shutil.which(c) for c in (compiler, "g++", "c++", "clang++"))
        else:  # GPUs: inductor would use Triton, but that has not been run and measured yet, so only on request
            ok = False
        _device_ok[device.type] = ok
    return _device_ok[device.type]


def _usable(activation: Activation, reference: torch.Tensor, numel: int, need_derivative: bool) -> bool:
    mode = kernel_compilation()
    # Only in no-grad code (the fused Function's forward/backward, merges, the eval cache): with grad enabled the
    # caller wants autograd through the eager ops.
    if mode == "0" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if need_derivative and activation.derivative is None:
        return False
    if mode == "auto" and (numel < MIN_ELEMENTS or not _auto_device(reference.device)):
        return False
    return True


#: Up to this rank the kernels form ``B A`` inside their loop (r multiply-adds per element) instead of calling a
#: GEMM: BLAS is slow for such a thin inner dimension. Above it the GEMM wins (measured at r = 16 and 32).
INLINE_PRODUCT_MAX_RANK = 8


def _low_rank_product(B_rows: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    # the broadcast form is only cheap once inductor fuses it; run eagerly it would materialise (rows, r, cols)
    if B_rows.shape[1] <= INLINE_PRODUCT_MAX_RANK and torch.compiler.is_compiling():
        return (B_rows[:, :, None] * A[None, :, :]).sum(1)
    return B_rows @ A


def _build(activation: Activation) -> dict[str, Callable]:
    fn, derivative, offset = activation.fn, activation.derivative, activation.offset

    def update_from(base: Optional[torch.Tensor], u: torch.Tensor, scaling: float) -> torch.Tensor:
        y = fn(u) - offset if offset else fn(u)
        return y * scaling if base is None else base + scaling * y

    def value(base, B_rows, A, scaling):
        return update_from(base, _low_rank_product(B_rows, A), scaling)

    def value_and_grad(base, B_rows, A, scaling, grad_h):
        u = _low_rank_product(B_rows, A)
        return update_from(base, u, scaling), grad_h * derivative(u)

    def grad_only(B_rows, A, grad_h):
        return grad_h * derivative(_low_rank_product(B_rows, A))

    kernels = {"value": value}
    if derivative is not None:
        kernels.update(value_and_grad=value_and_grad, grad_only=grad_only)
    return {name: torch.compile(k, dynamic=True) for name, k in kernels.items()}


def _run(activation: Activation, name: str, *args):
    global _failed
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # no-grad kernels
    try:
        if activation not in _kernels:
            _kernels[activation] = _build(activation)
        # Float constants (Sinter's a and w, the scaling) go into the graph as constants. With torch 2.13's default
        # (floats as symbolic inputs) the inductor caches handed a kernel traced for one Sinter setting to another
        # (its derivative off by 3e3 here): specialising keys every compiled kernel on its constants.
        # All layers share these kernels' code objects, so dynamo compiles once per setting and shape pattern;
        # the recompile limit is raised from 8 so that a process with many settings (tests) keeps them compiled.
        with torch._dynamo.config.patch(specialize_float=True, recompile_limit=64):
            return _kernels[activation][name](*args)
    except Exception as exc:  # no compiler, unsupported backend, ...: the eager kernels compute the same thing
        _failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(
            f"peft-loran: compiling the fused LoRAN kernels failed ({_failed}); using the eager kernels for the "
            "rest of this process (same results, slower). Set PEFT_LORAN_COMPILE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def value(
    activation: Activation, base: Optional[torch.Tensor], B_rows: torch.Tensor, A: torch.Tensor, scaling: float
) -> Optional[torch.Tensor]:
    """``base + scaling * f(B_rows A)`` (``base`` None: 0) in one compiled pass, or None: use the eager path.

    ``B_rows`` and ``A`` are float32 (or float64); so is the result."""
    if not _usable(activation, A, B_rows.shape[0] * A.shape[1], need_derivative=False):
        return None
    return _run(activation, "value", base, B_rows, A, scaling)


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
    if not _usable(activation, A, grad_h.numel(), need_derivative=True):
        return None
    if need_value:
        return _run(activation, "value_and_grad", base, B_rows, A, scaling, grad_h)
    grad = _run(activation, "grad_only", B_rows, A, grad_h)
    return None if grad is None else (None, grad)
