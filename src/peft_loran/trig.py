"""Sine and cosine as plain tensor arithmetic, for the compiled CPU kernels (:mod:`peft_loran.kernels`).

Inside a kernel that inductor compiles for a CPU, ``torch.sin`` becomes a call of Sleef's vectorised ``sinf``, an
out-of-line function, once per vector of 8 or 16 floats. The same algorithm written as tensor operations
(Cody-Waite reduction by ``pi`` in four parts, then Sleef's degree-9 minimax polynomial) is fused into the loop
instead, with the rest of ``f`` (docs/benchmarks.md, "The compiled kernels' sine", has what it is worth).

The reduction subtracts ``q pi`` (the cosine: ``q pi / 2``, ``q`` odd) in four parts, the first three of 8 or 9
significant bits, so their products with ``q`` are exact while ``|q| < 2**15``. That holds for ``|t| <=
MAX_ARGUMENT`` (Sleef's own bound for this reduction; ``|q| <= 24830`` for the cosine). There the absolute error
is below 1.2e-7 (torch's float32 ``sin`` here: 3.6e-8; Sleef's bound for the compiled one: 3.5 ulp), tested over
the whole range in tests/test_trig.py; far beyond it the result is unbounded, so a kernel must not use it there:
:class:`VectorTrig` is entered only for blocks whose arguments are bounded within it.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

#: Where the four-part reduction stays exact (see the module docstring).
MAX_ARGUMENT = 39000.0

# pi in four parts: the first three have 8, 9 and 9 significant bits, so q * part is exact for |q| < 2**15
_PI_PARTS = (3.140625, 0.0009670257568359375, 6.2771141529083251953e-07, 1.2154201256553420762e-10)
# sin(r) = r + r^3 P(r^2) on [-pi/2, pi/2] (Sleef's single-precision u35 coefficients)
_POLY = (2.6083159809786593541503e-06, -0.0001981069071916863322258, 0.00833307858556509017944336,
         -0.166666597127914428710938)


def _sin_reduced(t: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """``sin(t - q scale pi)`` for ``|t - q scale pi| <= pi / 2``."""
    r = t
    for part in _PI_PARTS:
        r = r - q * (part * scale)
    s = r * r
    u = _POLY[0] * s + _POLY[1]
    u = u * s + _POLY[2]
    u = u * s + _POLY[3]
    return s * (u * r) + r


def _odd(n: torch.Tensor) -> torch.Tensor:
    """0 where the integer-valued ``n`` is even, 0.5 where it is odd."""
    half = n * 0.5
    return half - torch.floor(half)


def sin(t: torch.Tensor) -> torch.Tensor:
    """``sin(t)`` for ``|t| <= MAX_ARGUMENT``: ``(-1)^q sin(t - q pi)``, ``q = round(t / pi)``."""
    q = torch.round(t * (1 / math.pi))
    u = _sin_reduced(t, q, 1.0)
    return u - 4 * _odd(q) * u


def cos(t: torch.Tensor) -> torch.Tensor:
    """``cos(t)`` for ``|t| <= MAX_ARGUMENT``: ``-(-1)^n sin(t - (2n + 1) pi / 2)``, ``n = round(t / pi - 1/2)``."""
    n = torch.round(t * (1 / math.pi) - 0.5)
    u = _sin_reduced(t, 2 * n + 1, 0.5)
    return 4 * _odd(n) * u - u


_REPLACEMENTS = {torch.sin: sin, torch.Tensor.sin: sin, torch.cos: cos, torch.Tensor.cos: cos}


class VectorTrig(TorchFunctionMode):
    """Within it, ``torch.sin`` / ``Tensor.sin`` and ``cos`` of one float32 tensor are :func:`sin` and :func:`cos`
    (float64 keeps torch's: the polynomial is float32's): a compiled kernel traces the activation's one definition
    under it. Only where every argument is within :data:`MAX_ARGUMENT` (the caller bounds them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = _REPLACEMENTS.get(func)
        if replacement is not None and not kwargs and len(args) == 1 and args[0].dtype == torch.float32:
            return replacement(args[0])
        return func(*args, **(kwargs or {}))
