"""Configuration: :class:`LoranConfig` (PEFT style) and :class:`MLoraConfig` (the original's argument names).

PEFT's ``PeftType`` is a closed enum and ``register_peft_method`` refuses names outside it, so the method is
registered through PEFT's mapping tables (see :mod:`peft_loran.model`) with a ``peft_type`` that is a ``str``
subclass behaving like an enum member (``.value``, ``.name``): PEFT and transformers call ``.value`` on it, and
dictionary look-ups by the plain string ``"LORAN"`` still work because it hashes and compares as that string.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from peft.config import PeftConfig

from .activations import Activation, canonical_name, definition, get_activation


class ExternalPeftType(str):
    """A PEFT method name that lives outside ``peft.PeftType`` but quacks like one of its members."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return f"PeftType.{self.value}"

    def __repr__(self) -> str:
        return f"<PeftType.{self.value}: '{self.value}'>"

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __reduce__(self):
        return (ExternalPeftType, (self.value,))

    def __deepcopy__(self, memo):
        return self


LORAN = ExternalPeftType("LORAN")


@dataclass
class LoranConfig(PeftConfig):
    """Configuration of a LoRAN adapter: ``W + (loran_alpha / r) * f(B A)``.

    Args:
        r: Rank of ``B`` (out x r) and ``A`` (r x in).
        loran_alpha: Scale numerator; the update is multiplied by ``loran_alpha / r`` as in LoRA.
        loran_dropout: Dropout on the layer input of the adapter branch, in [0, 1).
        activation: Name of the element-wise non-linearity ``f`` (default ``"sinter"``:
            ``x + a x sin(w x)``). See :func:`peft_loran.available_activations` and ``register_activation``.
        sinter_amplitude: ``a`` of Sinter (also used by ``"cosinter"``); paper: 5e-5.
        sinter_frequency: ``w`` of Sinter (also used by ``"cosinter"``); paper: 1e4.
        sine_frequency: ``w`` of ``activation="sine"`` (Sine-LoRA: ``sin(w B A) / g``).
        sine_gain: ``g`` of ``activation="sine"``; ``None`` (default, as Sine-LoRA's code): ``sqrt(in_features)`` of
            each adapted layer. Near zero the update is ``(w / g) B A``: LoRA with its scale times ``w / g``.
        activation_params: The activation's other parameters by name, e.g. ``{"beta": 10.0}`` for ``swish`` or
            those a registered activation declares (see ``docs/activations.md``); unnamed ones keep their defaults.
        chain_dims: The original MLoRA chain's widths after the rank, ``r[1:]`` in its notation. ``None`` means
            plain LoRAN (``A`` is r x in_features of each layer). Without ``use_P`` every width must equal the
            layer's ``in_features``; with ``use_P`` the last ``P`` maps the last width to ``in_features``.
        use_P: Insert trainable matrices ``P_k`` after each activation (the original's ``mlora_use_P``).
        use_b: Add trainable biases ``b_k`` after each stage (the original's ``mlora_use_b``).
        zero_centered: Use ``f(x) - f(0)`` so that an all-zero ``B`` gives an all-zero update for every
            activation (the original's Sigmoid/Cos/Gaussian adapters did not start at zero). Checkpoints of the
            original are loaded with ``False`` so they compute what they computed there.
        init_weights: ``True``: ``B = 0`` (``A = 0`` for embeddings), so the model starts exactly as the base.
            ``False``: random non-zero factors (for tests).
        target_modules / exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as in LoRA.
        fan_in_fan_out: ``True`` for layers that store the weight as (in, out), e.g. GPT-2's ``Conv1D``.
        bias: ``"none"``, ``"all"`` or ``"loran_only"``: which biases are trained.
        block_rows: Output rows per block in the fused computation (``None``: from the block budget, 1-8 MiB of
            float32 per block on CPU, 16 MiB on GPUs). Smaller saves transient memory, larger saves passes.
        eval_cache: Keep the dense update (or the effective weight) between no-grad calls, so generation with an
            unmerged adapter runs at the base model's speed. Off by default: it holds one weight-sized tensor per
            adapted layer (in the compute dtype: 4-8x the weights of a 4-bit base), more than training needs, so
            an evaluation inside training could run out of memory where LoRA does not. Without it each no-grad
            call builds the update block by block (no extra memory). For fast inference merge the adapter, or turn
            the cache on (``set_eval_cache(model, True, max_mb=...)``) where the memory is there.
    """

    r: int = field(default=8, metadata={"help": "Rank of the LoRAN factors."})
    loran_alpha: float = field(default=8, metadata={"help": "Scaling numerator: update * loran_alpha / r."})
    loran_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input."})
    activation: str = field(default="sinter", metadata={"help": "Element-wise non-linearity f."})
    sinter_amplitude: float = field(default=5e-5, metadata={"help": "Sinter amplitude a."})
    sinter_frequency: float = field(default=1e4, metadata={"help": "Sinter frequency w."})
    sine_frequency: float = field(default=200.0, metadata={"help": "Sine-LoRA frequency w."})
    sine_gain: Optional[float] = field(default=None, metadata={"help": "Sine-LoRA divisor g (None: sqrt(in))."})
    activation_params: Optional[dict[str, float]] = field(
        default=None, metadata={"help": "Other parameters of the activation by name (e.g. a registered one's)."})
    chain_dims: Optional[list[int]] = field(default=None, metadata={"help": "MLoRA chain widths after r."})
    use_P: bool = field(default=False, metadata={"help": "Trainable P_k after each activation."})
    use_b: bool = field(default=False, metadata={"help": "Trainable b_k after each stage."})
    zero_centered: bool = field(default=True, metadata={"help": "Use f(x) - f(0)."})
    init_weights: bool = field(default=True, metadata={"help": "True: the update starts at exactly zero."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt; 'all-linear' for every linear layer."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    fan_in_fan_out: bool = field(default=False)
    bias: Literal["none", "all", "loran_only"] = field(default="none")
    modules_to_save: Optional[list[str]] = field(default=None)
    block_rows: Optional[int] = field(default=None)
    eval_cache: bool = field(default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LORAN
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer (the rank), got {self.r!r}.")
        if not isinstance(self.loran_alpha, (int, float)) or not math.isfinite(self.loran_alpha):
            raise ValueError(f"`loran_alpha` must be a finite number, got {self.loran_alpha!r}.")
        for name in ("sinter_amplitude", "sinter_frequency"):  # checked whatever the activation: a saved config
            value = getattr(self, name)                          # must not carry a NaN into a later change of f
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if not (isinstance(self.loran_dropout, (int, float)) and 0.0 <= self.loran_dropout < 1.0):
            raise ValueError(f"`loran_dropout` must be in [0, 1), got {self.loran_dropout!r}.")
        if self.bias not in ("none", "all", "loran_only"):
            raise ValueError(
                f"`bias` must be 'none', 'all' or 'loran_only' ('mlora_only' in MLoraConfig), got {self.bias!r}."
            )
        if not isinstance(self.sine_frequency, (int, float)) or not math.isfinite(self.sine_frequency) or \
                self.sine_frequency == 0:
            raise ValueError(f"`sine_frequency` must be a finite non-zero number, got {self.sine_frequency!r}.")
        if self.sine_gain is not None and not (isinstance(self.sine_gain, (int, float)) and
                                               math.isfinite(self.sine_gain) and self.sine_gain > 0):
            raise ValueError(
                f"`sine_gain` must be a positive number or None (sqrt(in_features)), got {self.sine_gain!r}."
            )
        if self.block_rows is not None and (not isinstance(self.block_rows, int) or self.block_rows <= 0):
            raise ValueError(f"`block_rows` must be a positive integer or None, got {self.block_rows!r}.")
        if self.chain_dims is not None:
            dims = list(self.chain_dims)
            if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
                raise ValueError(
                    f"`chain_dims` must be a non-empty list of positive integers (or None), got {self.chain_dims!r}."
                )
            self.chain_dims = dims
        elif self.use_P:
            raise ValueError("`use_P=True` needs `chain_dims` (the widths P maps between), e.g. chain_dims=[64].")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self.activation = canonical_name(self.activation)
        act = self.build_activation()
        if self.init_weights and self.zero_centered and float(act.grad(torch.zeros(()), torch.ones(()))) == 0.0:
            # attributed to this line (stacklevel 1), so Python's default filter shows it once per process: PEFT
            # and the Trainer build the same config more than once (copies, loading), and the same advice twice
            # reads like two problems
            warnings.warn(
                f"activation={self.activation!r} has f'(0) = 0: with init_weights=True (B = 0) no gradient reaches "
                "A or B and they never train. Use init_weights=False or another activation.",
                stacklevel=1,
            )

    @property
    def scaling(self) -> float:
        return self.loran_alpha / self.r

    def build_activation(self, in_features: Optional[int] = None) -> Activation:
        """The configured ``f`` with its parameters (the fields its definition names, then ``activation_params``),
        shifted to ``f(x) - f(0)`` when ``zero_centered``: what every layer applies. ``in_features`` (the width ``A``
        multiplies) sets Sine-LoRA's default ``g = sqrt(in_features)``."""
        spec = definition(self.activation)
        values = {param: getattr(self, name) for param, name in spec.config_fields.items()}
        if spec.name == "sine":
            values["a"] = 1.0 / (self.sine_gain or math.sqrt(in_features or 1))
        act = get_activation(spec.name, params={**values, **(self.activation_params or {})})
        return act.centered() if self.zero_centered else act

    def chain_widths(self, rows: int, cols: int, width_name: str, where: str) -> tuple[list[int], list[int]]:
        """The chain's widths for a ``(rows, cols)`` update: ``A``'s and each stage's input width, and each stage's
        output width. Without ``use_P`` every width must be ``cols`` (the layer's ``width_name``); ``where`` names
        the layer in the error."""
        dims = list(self.chain_dims) if self.chain_dims else [cols]
        if not self.use_P and any(d != cols for d in dims):
            raise ValueError(
                f"LoRAN without P matrices needs every chain width (r[1:] in MLoraConfig, `chain_dims` in "
                f"LoranConfig) to equal the layer's {width_name}; {where} has {width_name}={cols} and output size "
                f"{rows}, got widths {dims}. Use r=[{self.r}, {cols}] / chain_dims=None, or use_P=True "
                "(mlora_use_P=True) to map the widths with P matrices."
            )
        return dims, (dims[1:] + [cols] if self.use_P else dims)

    def describe_activation(self) -> str:
        """``f`` in words for reports and model cards, e.g. ``x + a x sin(w x), a = 5e-05, w = 10000``."""
        if self.activation == "sine" and not self.sine_gain:
            return (f"sin(w x) / g, w = {self.sine_frequency:g}, g = sqrt(in_features) of each layer (Sine-LoRA)")
        text = self.build_activation().describe()
        return text + (" (minus f(0), so the update starts at zero)" if self.zero_centered and
                       self.build_activation().offset else "")
