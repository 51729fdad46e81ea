"""Loading a base model for a task: the right head (classification or causal LM), its tokenizer, QLoRA's 4-bit
quantization, and the length cap of its position table."""

from __future__ import annotations

import sys
import torch

from .data import TaskData
from .errors import UserError
from .models import generation_model_problem

from .settings import Settings


def load_base(model_path: str, task: TaskData, settings: Settings):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import peft_loran  # noqa: F401  (registers LoRAN)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"quantization_config": qlora_quantization()} if settings.load_in_4bit else {}
    if task.kind == "classify":
        labels = task.labels
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **kwargs)
    else:
        problem = generation_model_problem(model_path, task)
        if problem:
            raise UserError(problem)
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
        tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if settings.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model, tokenizer


def cap_max_length(settings: "Settings", model) -> None:
    """Texts longer than the model's position table cannot be encoded: cap ``max_length`` there, and say so once."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and settings.max_length > limit:
        print(f"note: --max-length {settings.max_length} is more than the model's {limit} positions; using {limit}",
              file=sys.stderr, flush=True)
        settings.max_length = limit


def qlora_quantization():
    """The paper's QLoRA base: nf4 with double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


