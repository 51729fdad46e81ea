"""Named element-wise activations for LoRAN: the value ``f(x)`` and its derivative ``f'(x)``.

The fused backward (see :mod:`peft_loran.functional`) rebuilds ``f(BA)`` block by block and needs ``f'`` without
keeping autograd graphs alive, so every built-in activation carries an analytic derivative. A user activation
registered without a derivative still works: its derivative is taken with autograd on one block at a time.

Names are case-insensitive. The original code's nine names ("Sin", "Sigmoid", "Tanh", "Relu", "Silu", "Identity",
"Swish", "Cos", "Gaussian") compute exactly what the original computes (its ``Swish`` is ``x sigmoid(25 x)``, its
``Cos`` is ``x cos(1e4 x) + x`` with fixed constants, its ``Gaussian`` is ``0.5 x exp(-x^2)``); ``cosinter`` is our
own Sinter-style cosine with configurable ``a`` and ``w``; ``sine`` is Sine-LoRA's ``sin(w x) / g`` (Ji et al., ICLR
2025). See ``docs/activations.md`` for the formulas.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

TensorFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """An element-wise function with (optionally) its analytic derivative.

    ``offset`` is subtracted from the value so that ``f(0) == 0`` when the adapter is zero-centred; it does not
    change the derivative.
    """

    name: str
    fn: TensorFn
    derivative: Optional[TensorFn] = None
    offset: float = 0.0
    #: optional ``x -> (f(x), f'(x))`` sharing work between the two (Sinter computes sin and cos once)
    both: Optional[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
    #: optional ``(base, B_rows, A, alpha, with_derivative) -> (base + alpha f(B_rows A), apply)`` where
    #: ``apply(g)`` returns ``g * f'(B_rows A)`` (may overwrite ``g``): the fused path's hot loop, free to
    #: rearrange the product (Sinter folds ``w`` into ``A``)
    block_fn: Optional[Callable] = None
    #: the same ``f`` and ``f'`` with every float constant as an argument: ``param_fn(x, *params)``. The compiled
    #: kernels (:mod:`peft_loran.kernels`) use these: torch.compile mis-caches kernels whose float constants live
    #: in closures (a kernel traced for one Sinter setting served another), while float arguments are proper
    #: inputs, so one compiled kernel serves every setting. Activations without them run eagerly.
    param_fn: Optional[Callable] = None
    param_derivative: Optional[Callable] = None
    params: tuple = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        return y - self.offset if self.offset else y

    def grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Return ``grad_out * f'(x)``; falls back to autograd when no analytic derivative is known."""
        if self.derivative is not None:
            return grad_out * self.derivative(x)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.fn(leaf), leaf, grad_out)
        return g

    def value_and_derivative(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(f(x), f'(x))``; ``f'`` is None when no analytic derivative is known (use :meth:`grad`)."""
        if self.both is not None:
            y, d = self.both(x)
        else:
            y = self.fn(x)
            d = self.derivative(x) if self.derivative is not None else None
        return (y - self.offset if self.offset else y), d

    def scaled_add(
        self, base: Optional[torch.Tensor], x: torch.Tensor, alpha: float, with_derivative: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(base + alpha * f(x), f'(x) if with_derivative)``; ``base`` None means 0. Overwrites ``x`` only if
        ``f`` returns ``x`` itself (the identity, whose derivative does not depend on ``x``)."""
        if with_derivative:
            y, d = self.value_and_derivative(x)
        else:
            y, d = self(x), None
        out = y.mul_(alpha) if base is None else torch.add(base, y, alpha=alpha)
        return out, d

    def value_at_zero(self) -> float:
        return float(self.fn(torch.zeros((), dtype=torch.float32)))

    def centered(self) -> "Activation":
        """The same activation shifted so that ``f(0) == 0`` (an all-zero ``B`` then gives an all-zero update)."""
        offset = self.value_at_zero()
        return dataclasses.replace(self, offset=offset, block_fn=self.block_fn if not offset else None)


# A factory builds an Activation from the two Sinter-style parameters (ignored by most activations).
ActivationFactory = Callable[[float, float], Activation]

_REGISTRY: dict[str, ActivationFactory] = {}
# the original implementation's spellings and a few obvious synonyms
_ALIASES: dict[str, str] = {"sin": "sinter"}


def _sinter(amplitude: float, frequency: float) -> Activation:
    a, w = amplitude, frequency

    def fn(x: torch.Tensor) -> torch.Tensor:
        # x * (1 + a sin(w x)), in three passes over x
        return torch.sin(x * w).mul_(a).add_(1).mul_(x)

    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x) and f'(x) = 1 + a sin(wx) + a wx cos(wx), sharing 1 + a sin(wx)."""
        wx = w * x
        one_plus = torch.sin(wx).mul_(a).add_(1)
        value = one_plus * x
        return value, one_plus.addcmul_(wx, torch.cos(wx), value=a)

    def derivative(x: torch.Tensor) -> torch.Tensor:
        return both(x)[1]

    def block(base, B_rows, A, alpha, with_derivative):
        # work on u = w B A (w folded into the small A): base + alpha f(BA) = base + k u + k a u sin(u), k = alpha/w
        u = B_rows @ (A * w)
        sin_u = torch.sin(u)
        k = alpha / w
        out = u * k if base is None else torch.add(base, u, alpha=k)
        out.addcmul_(u, sin_u, value=k * a)
        if not with_derivative:
            return out, None
        t = sin_u.addcmul_(u, torch.cos(u))  # sin(u) + u cos(u), so f'(BA) = 1 + a t
        del u

        def apply_derivative(g: torch.Tensor) -> torch.Tensor:
            return g.addcmul_(g, t, value=a)

        return out, apply_derivative

    return Activation("sinter", fn, derivative, both=both, block_fn=block, param_fn=_sinter_value,
                      param_derivative=_sinter_derivative, params=(a, w))


def _sinter_value(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    return x + a * x * torch.sin(w * x)


def _sinter_derivative(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    wx = w * x
    return 1 + a * torch.sin(wx) + a * wx * torch.cos(wx)


def _cosinter_value(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    return x + a * x * torch.cos(w * x)


def _cosinter_derivative(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    wx = w * x
    return 1 + a * torch.cos(wx) - a * wx * torch.sin(wx)


def _cosinter(amplitude: float, frequency: float) -> Activation:
    a, w = amplitude, frequency
    return Activation("cosinter", lambda x: _cosinter_value(x, a, w), lambda x: _cosinter_derivative(x, a, w),
                      param_fn=_cosinter_value, param_derivative=_cosinter_derivative, params=(a, w))


def _sine_value(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    return a * torch.sin(w * x)


def _sine_derivative(x: torch.Tensor, a: float, w: float) -> torch.Tensor:
    return (a * w) * torch.cos(w * x)


def _sine(amplitude: float, frequency: float) -> Activation:
    """Sine-LoRA's ``a sin(w x)``; ``a`` is ``1 / g`` (``g = sqrt(in_features)`` per layer by default, set by the
    layer from ``LoranConfig.sine_gain``), ``w`` is ``sine_frequency``. Near zero it is ``(a w) x``: LoRA with its
    scale multiplied by ``w / g``."""
    a, w = amplitude, frequency
    return Activation("sine", lambda x: _sine_value(x, a, w), lambda x: _sine_derivative(x, a, w),
                      param_fn=_sine_value, param_derivative=_sine_derivative, params=(a, w))


def _sigmoid_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


#: The original's Swish has its steepness fixed in the code: ``x * sigmoid(25 x)``.
SWISH_BETA = 25.0
#: The original's Cos has amplitude and frequency fixed in the code (``mlora_af_sin_*`` are not passed to it).
COS_FREQUENCY = 1e4


def _swish(x: torch.Tensor, beta: float = SWISH_BETA) -> torch.Tensor:
    return x * torch.sigmoid(beta * x)


def _swish_derivative(x: torch.Tensor, beta: float = SWISH_BETA) -> torch.Tensor:
    s = torch.sigmoid(beta * x)
    return s + beta * x * s * (1 - s)


def _cos(x: torch.Tensor, w: float = COS_FREQUENCY) -> torch.Tensor:
    return x * torch.cos(w * x) + x


def _cos_derivative(x: torch.Tensor, w: float = COS_FREQUENCY) -> torch.Tensor:
    wx = w * x
    return torch.cos(wx) - wx * torch.sin(wx) + 1


def _gaussian(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * torch.exp(-x * x)


def _gaussian_derivative(x: torch.Tensor) -> torch.Tensor:
    return (0.5 - x * x) * torch.exp(-x * x)


def _fixed(name: str, fn: TensorFn, derivative: Optional[TensorFn], *params: float) -> ActivationFactory:
    """A built-in without configurable parameters; ``params`` are its fixed float constants (arguments of ``fn``
    and ``derivative`` after ``x``, passed as such to the compiled kernels)."""
    def build(amplitude: float, frequency: float) -> Activation:
        value = (lambda x: fn(x, *params)) if params else fn
        slope = (lambda x: derivative(x, *params)) if params else derivative
        return Activation(name, value, slope, param_fn=fn, param_derivative=derivative, params=params)

    return build


def _user(name: str, fn: TensorFn, derivative: Optional[TensorFn]) -> ActivationFactory:
    """A registered activation: eager only (its closures may hold floats the compiled kernels would mis-cache)."""
    return lambda amplitude, frequency: Activation(name, fn, derivative)


# The original's nine (as its code computes them: fixture README) plus ``cosinter`` and Sine-LoRA's ``sine``.
_BUILTINS: dict[str, ActivationFactory] = {
    "sinter": _sinter,
    "cosinter": _cosinter,
    "sine": _sine,
    "sigmoid": _fixed("sigmoid", torch.sigmoid, _sigmoid_derivative),
    "tanh": _fixed("tanh", torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
    "relu": _fixed("relu", torch.relu, lambda x: (x > 0).to(x.dtype)),
    "silu": _fixed("silu", torch.nn.functional.silu, _silu_derivative),
    "swish": _fixed("swish", _swish, _swish_derivative, SWISH_BETA),
    "identity": _fixed("identity", lambda x: x, torch.ones_like),
    "cos": _fixed("cos", _cos, _cos_derivative, COS_FREQUENCY),
    "gaussian": _fixed("gaussian", _gaussian, _gaussian_derivative),
}
_REGISTRY.update(_BUILTINS)


def available_activations() -> list[str]:
    """Names accepted by :func:`get_activation` (aliases not included)."""
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """Map a user-supplied name (any case, original spellings) to the registry key, or raise a clear error."""
    if not isinstance(name, str):
        raise ValueError(f"`activation` must be a string naming an activation, got {name!r}.")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown activation {name!r} (parameter `activation` / `mlora_af`). "
            f"Valid names: {', '.join(available_activations())} (the original's spellings such as 'Sin' and 'Swish' "
            "work too). Add your own with `peft_loran.register_activation(name, fn, derivative)`."
        )
    return key


def get_activation(name: str, amplitude: float = 5e-5, frequency: float = 1e4) -> Activation:
    """Build the activation ``name``; ``amplitude``/``frequency`` are used by Sinter and its cosine sibling, and by
    ``sine`` as ``1 / g`` and ``w``."""
    for param, value in (("sinter_amplitude", amplitude), ("sinter_frequency", frequency)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{param}` must be a finite number, got {value!r}.")
    return _REGISTRY[canonical_name(name)](float(amplitude), float(frequency))


def register_activation(
    name: str, fn: TensorFn, derivative: Optional[TensorFn] = None, *, overwrite: bool = False
) -> None:
    """Make ``fn`` available as ``LoranConfig(activation=name)``.

    ``fn`` must be element-wise. Give ``derivative`` (``f'(x)``) if you can: without it the backward pass
    uses autograd on each block, which is slower but exact. Registered names live for the Python process, so
    register before loading an adapter that names your activation.
    """
    key = name.strip().lower()
    if not key:
        raise ValueError("`name` must be a non-empty string.")
    if not callable(fn) or (derivative is not None and not callable(derivative)):
        raise ValueError("`fn` and `derivative` must be callables taking and returning a tensor.")
    if (key in _REGISTRY or key in _ALIASES) and not overwrite:
        raise ValueError(f"Activation {name!r} is already registered; pass `overwrite=True` to replace it.")
    _REGISTRY[key] = _user(key, fn, derivative)


def unregister_activation(name: str) -> None:
    """Remove a user activation (built-ins cannot be removed)."""
    key = name.strip().lower()
    if key in _BUILTINS:
        raise ValueError(f"Built-in activation {name!r} cannot be unregistered.")
    _REGISTRY.pop(key, None)
