"""Element-wise activations for LoRAN, each defined once.

An :class:`ActivationDefinition` holds everything there is to know about one ``f``: a single function that returns
``f(x)`` and, when asked, ``f'(x)`` (sharing the work between them), with every constant as a named parameter with
a default; its formula as text; and which :class:`~peft_loran.LoranConfig` fields set its parameters. Everything
else is derived from it: the eager blocks of the fused path, the compiled kernels (:mod:`peft_loran.kernels`, which
trace the same function with the parameters as arguments), the command line's per-method options, the reports and
the docs table (:func:`formula_table`). An :class:`Activation` is a definition with its parameter values bound.

Names are case-insensitive. The original code's nine names ("Sin", "Sigmoid", "Tanh", "Relu", "Silu", "Identity",
"Swish", "Cos", "Gaussian") compute exactly what the original computes (its ``Swish`` is ``x sigmoid(25 x)``, its
``Cos`` is ``x cos(1e4 x) + x`` with fixed constants, its ``Gaussian`` is ``0.5 x exp(-x^2)``); ``cosinter`` is our
own Sinter-style cosine; ``sine`` is Sine-LoRA's ``sin(w x) / g`` (Ji et al., ICLR 2025). Users add their own with
:func:`register_activation`, with parameters if they like; those run on the compiled kernels too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # no torch at import: the command line reads the registry before importing torch (methods.py)
    from torch import Tensor
#: ``function(x, *params, derivative=False) -> (f(x), f'(x) if derivative else None)``; plain torch operations on
#: tensors it may not modify (temporaries it creates may be updated in place).
ActivationFunction = Callable[..., "tuple[Tensor, Optional[Tensor]]"]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per registered definition
class ActivationDefinition:
    """One activation, defined once (see the module docstring).

    ``derivative_known``: False when ``function`` cannot give ``f'`` (a user activation without a derivative): the
    backward then takes it with autograd, one block at a time. ``config_fields`` maps parameters to the
    ``LoranConfig`` fields (and command-line options) that set them; the other parameters keep their defaults
    unless ``LoranConfig(activation_params=...)`` sets them."""

    name: str
    function: ActivationFunction
    params: tuple[tuple[str, float], ...] = ()
    formula: str = ""
    derivative_formula: str = ""
    derivative_known: bool = True
    config_fields: dict[str, str] = field(default_factory=dict)
    original_name: str = ""  # the original code's spelling, for its nine
    #: the parameters :func:`get_activation`'s ``amplitude`` and ``frequency`` set (Sinter-style activations)
    amplitude_frequency: tuple[str, ...] = ()
    #: the parameter ``w`` when every sine and cosine ``function`` takes is of ``w x``: the compiled CPU kernels then
    #: compute them inline where ``|w x|`` is bounded (:mod:`peft_loran.trig`); "" (users' activations): never
    trig_frequency: str = ""

    @property
    def defaults(self) -> dict[str, float]:
        return dict(self.params)


@dataclass(frozen=True)
class Activation:
    """A definition with its parameter values; ``offset`` (``f(0)`` for zero-centred adapters) is subtracted from
    the value so that an all-zero ``B`` gives an all-zero update. Frozen and compared by value: the eval cache uses
    equality to tell whether the activation of a layer changed."""

    definition: ActivationDefinition
    values: tuple[float, ...] = ()
    offset: float = 0.0

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def has_derivative(self) -> bool:
        return self.definition.derivative_known

    @property
    def trig_frequency(self) -> Optional[float]:
        """``|w|`` where the definition declares that its sines and cosines are of ``w x``, else None."""
        name = self.definition.trig_frequency
        return abs(self.values[[p for p, _ in self.definition.params].index(name)]) if name else None

    def __call__(self, x: Tensor) -> Tensor:
        y = self.definition.function(x, *self.values)[0]
        return y - self.offset if self.offset else y

    def value_and_derivative(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``(f(x), f'(x))`` in one pass where the definition shares the work; ``f'`` is None when unknown (then use
        :meth:`grad`)."""
        y, d = self.definition.function(x, *self.values, derivative=self.has_derivative)
        return (y - self.offset if self.offset else y), d

    def grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """``grad_out * f'(x)``, by autograd where the derivative is not known."""
        if self.has_derivative:
            return grad_out * self.definition.function(x, *self.values, derivative=True)[1]
        import torch

        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.definition.function(leaf, *self.values)[0], leaf, grad_out)
        return g

    def scaled_add(
        self, base: Optional[Tensor], x: Tensor, alpha: float, with_derivative: bool = False
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(base + alpha * f(x), f'(x) if with_derivative)``; ``base`` None means 0. Never modifies ``x``."""
        y, d = self.value_and_derivative(x) if with_derivative else (self(x), None)
        if base is not None:
            return base.add(y, alpha=alpha), d
        return (y * alpha if y is x else y.mul_(alpha)), d

    def value_at_zero(self) -> float:
        import torch

        return float(self.definition.function(torch.zeros((), dtype=torch.float64), *self.values)[0])

    def centered(self) -> "Activation":
        """The same activation shifted so that ``f(0) == 0``."""
        return dataclasses.replace(self, offset=self.value_at_zero())

    def describe(self) -> str:
        """``f(x) = <formula>`` with the parameter values, e.g. ``x + a x sin(w x), a = 5e-05, w = 10000``."""
        values = ", ".join(f"{name} = {value:g}" for (name, _), value in zip(self.definition.params, self.values))
        return self.definition.formula + (f", {values}" if values else "")


# ------------------------------------------------------------------------------------------------ the built-ins
def _sinter(x: Tensor, a: float, w: float, derivative: bool = False):
    wx = x * w
    s = wx.sin()
    value = x.addcmul(x, s, value=a)
    if not derivative:
        return value, None
    return value, wx.cos().mul_(wx).add_(s).mul_(a).add_(1)  # 1 + a (sin(wx) + wx cos(wx))


def _cosinter(x: Tensor, a: float, w: float, derivative: bool = False):
    wx = x * w
    c = wx.cos()
    value = x.addcmul(x, c, value=a)
    if not derivative:
        return value, None
    return value, wx.sin().mul_(wx).neg_().add_(c).mul_(a).add_(1)  # 1 + a (cos(wx) - wx sin(wx))


def _sine(x: Tensor, a: float, w: float, derivative: bool = False):
    wx = x * w
    return wx.sin().mul_(a), (wx.cos().mul_(a * w) if derivative else None)


def _sigmoid(x: Tensor, derivative: bool = False):
    s = x.sigmoid()
    return s, (s * (1 - s) if derivative else None)


def _tanh(x: Tensor, derivative: bool = False):
    t = x.tanh()
    return t, (1 - t * t if derivative else None)


def _relu(x: Tensor, derivative: bool = False):
    return x.relu(), ((x > 0).to(x.dtype) if derivative else None)


def _silu(x: Tensor, derivative: bool = False):
    s = x.sigmoid()
    return x * s, (s * (1 + x * (1 - s)) if derivative else None)


def _swish(x: Tensor, beta: float, derivative: bool = False):
    s = (beta * x).sigmoid()
    return x * s, (s + beta * x * s * (1 - s) if derivative else None)


def _identity(x: Tensor, derivative: bool = False):
    return x, (x.new_ones(x.shape) if derivative else None)


def _cos(x: Tensor, w: float, derivative: bool = False):
    wx = x * w
    c = wx.cos()
    value = x.addcmul(x, c)
    return value, (c - wx * wx.sin() + 1 if derivative else None)


def _gaussian(x: Tensor, derivative: bool = False):
    e = (-x * x).exp()
    return 0.5 * x * e, ((0.5 - x * x) * e if derivative else None)


SINTER_FIELDS = {"a": "sinter_amplitude", "w": "sinter_frequency"}

#: The original's nine (as its code computes them: the fixtures' README), ``cosinter`` and Sine-LoRA's ``sine``.
BUILTINS: dict[str, ActivationDefinition] = {d.name: d for d in [
    ActivationDefinition("sinter", _sinter, (("a", 5e-5), ("w", 1e4)), "x + a x sin(w x)",
                         "1 + a sin(w x) + a w x cos(w x)", config_fields=SINTER_FIELDS, original_name="Sin",
                         amplitude_frequency=("a", "w"), trig_frequency="w"),
    ActivationDefinition("sigmoid", _sigmoid, (), "1 / (1 + exp(-x))", "s (1 - s), s = sigmoid(x)",
                         original_name="Sigmoid"),
    ActivationDefinition("tanh", _tanh, (), "tanh(x)", "1 - tanh(x)^2", original_name="Tanh"),
    ActivationDefinition("relu", _relu, (), "max(x, 0)", "1 if x > 0 else 0", original_name="Relu"),
    ActivationDefinition("silu", _silu, (), "x sigmoid(x)", "s (1 + x (1 - s)), s = sigmoid(x)",
                         original_name="Silu"),
    ActivationDefinition("identity", _identity, (), "x", "1", original_name="Identity"),
    # the original fixes the steepness of its Swish at 25 and the frequency of its Cos at 1e4
    ActivationDefinition("swish", _swish, (("beta", 25.0),), "x sigmoid(beta x)",
                         "s + beta x s (1 - s), s = sigmoid(beta x)", original_name="Swish"),
    ActivationDefinition("cos", _cos, (("w", 1e4),), "x cos(w x) + x", "cos(w x) - w x sin(w x) + 1",
                         original_name="Cos", trig_frequency="w"),
    ActivationDefinition("gaussian", _gaussian, (), "0.5 x exp(-x^2)", "(0.5 - x^2) exp(-x^2)",
                         original_name="Gaussian"),
    ActivationDefinition("cosinter", _cosinter, (("a", 5e-5), ("w", 1e4)), "x + a x cos(w x)",
                         "1 + a cos(w x) - a w x sin(w x)", config_fields=SINTER_FIELDS,
                         amplitude_frequency=("a", "w"), trig_frequency="w"),
    # Sine-LoRA: a = 1 / g, set per layer from sine_gain (None: sqrt(in_features)) by LoranConfig.build_activation
    ActivationDefinition("sine", _sine, (("a", 1.0), ("w", 200.0)), "a sin(w x), a = 1 / g", "a w cos(w x)",
                         config_fields={"w": "sine_frequency"}, amplitude_frequency=("a", "w"), trig_frequency="w"),
]}

_REGISTRY: dict[str, ActivationDefinition] = dict(BUILTINS)
#: the original implementation's spellings that are not our names lower-cased
_ALIASES: dict[str, str] = {"sin": "sinter"}


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


def definition(name: str) -> ActivationDefinition:
    return _REGISTRY[canonical_name(name)]


def get_activation(
    name: str, amplitude: Optional[float] = None, frequency: Optional[float] = None,
    params: Optional[dict[str, float]] = None,
) -> Activation:
    """Build the activation ``name`` with its parameters: the defaults, then ``amplitude`` / ``frequency`` for the
    parameters ``a`` / ``w`` (Sinter, its cosine, Sine-LoRA), then ``params`` by name."""
    spec = definition(name)
    values = spec.defaults
    for param, given in zip(spec.amplitude_frequency, (amplitude, frequency)):
        if given is not None:
            values[param] = given
    unknown = sorted(set(params or {}) - set(values))
    if unknown:
        raise ValueError(f"`activation_params` names {', '.join(unknown)}, which activation {spec.name!r} does not "
                         f"have; its parameters: {', '.join(values) or 'none'}.")
    values.update(params or {})
    for param, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            field_name = spec.config_fields.get(param, f"activation_params['{param}']")
            raise ValueError(f"`{field_name}` ({spec.name}'s {param}) must be a finite number, got {value!r}.")
    return Activation(spec, tuple(float(v) for v in values.values()))


def register_activation(
    name: str, fn: Callable[..., Tensor], derivative: Optional[Callable[..., Tensor]] = None, *,
    params: Optional[dict[str, float]] = None, formula: str = "", overwrite: bool = False,
) -> None:
    """Make ``fn`` available as ``LoranConfig(activation=name)``.

    ``fn(x, *params)`` must be element-wise; ``params`` names its constants with their defaults (in argument order),
    set per adapter with ``LoranConfig(activation_params={...})``. Give ``derivative(x, *params)`` (``f'``) if you
    can: without it the backward pass uses autograd on each block, which is slower but exact. With the constants
    as parameters (not captured in a closure) the activation runs on the compiled kernels like a built-in. Names
    live for the Python process, so register before loading an adapter that names your activation."""
    key = name.strip().lower() if isinstance(name, str) else ""
    if not key:
        raise ValueError("`name` must be a non-empty string.")
    if not callable(fn) or (derivative is not None and not callable(derivative)):
        raise ValueError("`fn` and `derivative` must be callables taking and returning a tensor.")
    if (key in _REGISTRY or key in _ALIASES) and not overwrite:
        raise ValueError(f"Activation {name!r} is already registered; pass `overwrite=True` to replace it.")
    if key in BUILTINS:
        raise ValueError(f"{name!r} is a built-in activation and cannot be replaced; register it under another name.")

    user_derivative = derivative

    def function(x: Tensor, *values: float, derivative: bool = False):
        return fn(x, *values), (user_derivative(x, *values) if derivative and user_derivative else None)

    defaults = tuple((str(k), float(v)) for k, v in (params or {}).items())
    _REGISTRY[key] = ActivationDefinition(key, function, defaults, formula or f"{key} (registered)",
                                          derivative_known=derivative is not None)


def unregister_activation(name: str) -> None:
    """Remove a user activation (built-ins cannot be removed)."""
    key = name.strip().lower()
    if key in BUILTINS:
        raise ValueError(f"Built-in activation {name!r} cannot be unregistered.")
    _REGISTRY.pop(key, None)


def parameter_fields() -> dict[str, tuple[str, ...]]:
    """Per activation, the LoranConfig fields (and command-line options) that set its parameters."""
    return {name: tuple(spec.config_fields.values()) for name, spec in _REGISTRY.items()}


def formula_table() -> str:
    """The docs' table of the built-in activations (docs/activations.md holds it verbatim; a test checks that)."""
    lines = ["| name (original's spelling) | f(x) | f'(x) | parameters (defaults) | f(0) | f'(0) |",
             "|---|---|---|---|---|---|"]
    import torch

    for spec in BUILTINS.values():
        act = get_activation(spec.name)
        zero = torch.zeros((), dtype=torch.float64)
        f0, d0 = spec.function(zero, *act.values, derivative=True)
        params = ", ".join(f"{k} = {v:g}" + (f" (`{spec.config_fields[k]}`)" if k in spec.config_fields else "")
                           for k, v in spec.params) or "none"
        lines.append(f"| `{spec.name}`" + (f" (`{spec.original_name}`)" if spec.original_name else "")
                     + f" | {spec.formula} | {spec.derivative_formula} | {params} | {float(f0):g} | {float(d0):g} |")
    return "\n".join(lines)
