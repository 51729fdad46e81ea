"""Shared helpers: tiny models built from configs (no downloads) and the reference fixtures' location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import peft_loran  # noqa: F401  (registers LoRAN with PEFT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PEFT_LORAN_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference_mlora"))
if not FIXTURES.exists():  # the repository ships a copy for machines without ../shared
    FIXTURES = REPO / "tests" / "fixtures" / "reference_mlora"


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 101, intermediate: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 101):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
