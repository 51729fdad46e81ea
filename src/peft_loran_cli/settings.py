"""One run's settings (shared by every method of a comparison) and its result."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .errors import UserError


@dataclass
class Settings:
    """One training run's knobs (shared by all methods of a comparison)."""

    model: str = "minilm"
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: Optional[list[str]] = None
    steps: int = 60
    epochs: Optional[float] = None  # when given, train this many passes over the data instead of `steps`
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    lr: float = 1e-3
    seed: int = 0
    eval_limit: Optional[int] = None
    gen_tokens: int = 24
    sinter_amplitude: float = 5e-5
    sinter_frequency: float = 1e4
    sine_frequency: float = 200.0
    eval_split: str = "test"  # "validation" to choose settings (learning rate, rank) without touching the test split
    load_in_4bit: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    quiet: bool = False
    command: str = ""  # the command line that started the run, for the model card

    def check(self) -> None:
        from .options import number_problem

        for name, value in asdict(self).items():
            problem = number_problem(name, value)
            if problem:
                raise UserError(problem)
        if self.eval_split not in ("test", "validation"):
            raise UserError(f"--eval-split must be test or validation, got {self.eval_split}")


@dataclass
class RunResult:
    method: str
    metrics: dict
    trainable_params: int
    train_seconds: float
    peak_memory_mb: float
    memory_kind: str
    loss_curve: list = field(default_factory=list)
    #: per adapted module: non-linear share of the update's energy, effective rank (peft_loran.diagnostics)
    update_statistics: list = field(default_factory=list)
    nonlinear_share: Optional[float] = None  # the largest over modules
    nonlinear_beyond_scale: Optional[float] = None  # the same, beyond the best multiple of B A (the largest)
    effective_rank: Optional[float] = None  # the mean over modules

    def as_dict(self) -> dict:
        return asdict(self)


def settings_from(args: argparse.Namespace):
    """The run's Settings: the profile's defaults, then what was given (the first value of a list option)."""
    from .options import LIST_OPTIONS, PROFILES, checked_values

    values = dict(PROFILES[args.profile])
    values.pop("task", None)
    for f in fields(Settings):
        given = getattr(args, f.name, None)
        if f.name in LIST_OPTIONS:
            given = (checked_values(args, f.name) or [None])[0]
        if given is not None and given is not False:
            values[f.name] = given
    if isinstance(values.get("targets"), str):
        values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
    settings = Settings(**{k: v for k, v in values.items() if k in {f.name for f in fields(Settings)}})
    settings.quiet = bool(args.quiet)
    settings.command = getattr(args, "command_line", "peft-loran")
    settings.check()
    return settings
