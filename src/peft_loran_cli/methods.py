"""The methods the command line trains: PEFT's LoRA family (the baselines) and LoRAN with any activation, and the
PEFT config each one gets from the run's settings (same rank, alpha, dropout and targets for all)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .errors import UserError
from .models import default_targets

if TYPE_CHECKING:
    from .settings import Settings


#: The methods ``compare`` and ``train`` know: PEFT's LoRA family as users would pick them, and ours.
METHODS = {
    "lora": "PEFT LoRA: s B A",
    "rslora": "PEFT LoRA with rank-stabilised scaling alpha / sqrt(r)",
    "dora": "PEFT DoRA: LoRA with a learned per-row magnitude",
    "hira": "PEFT HiRA: W0 * (B A), element-wise (high rank, linear in B A)",
    "loran": "LoRAN: s f(B A), f = Sinter x + a x sin(w x) (--sinter-amplitude, --sinter-frequency)",
    "sine": "Sine-LoRA: s sin(w B A) / sqrt(in_features) (--sine-frequency); the same as loran:sine",
}


def parse_method(method: str) -> tuple[str, Optional[str]]:
    """``(kind, activation)``: kind is a PEFT method (lora, rslora, dora, hira) or ``loran``; ``sine`` is
    ``loran:sine``; ``loran:<activation>`` picks any registered activation."""
    kind, _, activation = method.partition(":")
    if kind == "sine" and not activation:
        return "loran", "sine"
    if kind not in METHODS or kind == "sine" or (kind != "loran" and activation):
        raise UserError(f"unknown method '{method}'; use {', '.join(METHODS)} or loran:<activation> (e.g. loran:tanh)")
    if activation:
        try:
            activation = activation_registry().canonical_name(activation)
        except ValueError as exc:
            raise UserError(str(exc).splitlines()[0]) from None
    return kind, activation or None


def methods_problem(args) -> Optional[str]:
    """What is wrong with ``--methods`` / ``--method``, or None (checked before torch is imported)."""
    methods = (getattr(args, "methods", None) or "").split(",") + [getattr(args, "method", None) or ""]
    for method in filter(None, (m.strip() for m in methods)):
        try:
            parse_method(method)
        except UserError as exc:
            return str(exc)
    return None


def activation_registry():
    """``peft_loran.activations`` without importing torch (:func:`peft_loran_cli.light.library_module`); the command
    line knows only the built-ins, which both the light and the real module hold."""
    from .light import library_module

    return library_module("activations")


def peft_config(method: str, settings: Settings, task_kind: str, model_type: str):
    from peft import LoraConfig, TaskType

    from peft_loran import LoranConfig

    kind, activation = parse_method(method)
    targets = settings.targets or default_targets(model_type)
    task_type = TaskType.SEQ_CLS if task_kind == "classify" else TaskType.CAUSAL_LM
    if kind in ("lora", "rslora", "dora"):
        return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=targets, task_type=task_type, use_rslora=kind == "rslora",
                          use_dora=kind == "dora")
    if kind == "hira":
        try:
            from peft import HiraConfig
        except ImportError:
            raise UserError("method hira needs PEFT >= 0.20 (pip install -U peft)") from None
        return HiraConfig(r=settings.rank, hira_dropout=settings.dropout, target_modules=targets,
                          task_type=task_type)
    return LoranConfig(r=settings.rank, loran_alpha=settings.alpha, loran_dropout=settings.dropout,
                       target_modules=targets, task_type=task_type, activation=activation or "sinter",
                       sinter_amplitude=settings.sinter_amplitude, sinter_frequency=settings.sinter_frequency,
                       sine_frequency=settings.sine_frequency)
