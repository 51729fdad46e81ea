"""Adapters saved by the original LoRAN code load here and compute the original's outputs and gradients."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_loran.compat import convert_original_state_dict

from .conftest import FIXTURES

CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.exists() else []


pytestmark = pytest.mark.usefixtures("on_device")  # conftest: --device / PEFT_LORAN_TEST_DEVICE


def load_case(name):
    """The case's files and base model, on the tests' device (torch's default device, see conftest)."""
    device = torch.empty(0).device
    case = FIXTURES / name
    expected = load_file(case / "expected.safetensors", device=str(device))
    grads = load_file(case / "expected_grads.safetensors", device=str(device))
    meta = json.loads((case / "meta.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(case / "base").to(device).eval()
    return case, expected, grads, meta, base


def test_all_four_cases_present():
    assert set(CASES) >= {"gpt2_conv1d_tanh_P", "llama_sigmoid_P_b_3layer", "llama_sinter_paper", "llama_sinter_strong"}


@pytest.mark.parametrize("name", CASES)
def test_outputs_disabled_and_merge(name):
    case, expected, _, _, base = load_case(name)
    ids = expected["input_ids"]
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, expected["base_logits"], atol=1e-5)
        model = PeftModel.from_pretrained(base, case / "adapter").eval()
        out = model(input_ids=ids).logits
        torch.testing.assert_close(out, expected["adapter_logits"], atol=1e-5, rtol=1e-4)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, expected["disabled_logits"], atol=1e-5, rtol=1e-4)
        # the original's merge was wrong; ours gives the unmerged output
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, expected["adapter_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_init_is_identity(name):
    from peft import PeftConfig, get_peft_model

    case, expected, _, _, base = load_case(name)
    config = PeftConfig.from_pretrained(case / "adapter")
    config.inference_mode = False
    model = get_peft_model(base, config)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["init_logits"], atol=1e-5,
                                   rtol=1e-4)


def test_every_case_has_dropout_off_so_train_mode_is_deterministic():
    # the fixture README: every base-model dropout and mlora_dropout are 0, so train-mode numbers are exact
    for name in CASES:
        config = json.loads((FIXTURES / name / "base" / "config.json").read_text())
        probabilities = {k: v for k, v in config.items() if ("pdrop" in k or "dropout" in k) and isinstance(v, float)}
        assert all(v == 0.0 for v in probabilities.values()), (name, probabilities)


@pytest.mark.parametrize("name", CASES)
def test_loss_gradients_and_one_sgd_step(name):
    case, expected, grads, meta, base = load_case(name)
    ids = expected["input_ids"]
    model = PeftModel.from_pretrained(base, case / "adapter", is_trainable=True)
    model.train()
    loss = model(input_ids=ids).logits.pow(2).mean()
    torch.testing.assert_close(loss.reshape(1), expected["loss"], atol=1e-6, rtol=1e-4)
    loss.backward()

    # map our parameter names to the original's checkpoint keys
    ours = {}
    for name_, p in model.named_parameters():
        if p.requires_grad:
            key = name_.replace(".default", "")
            ours[key] = p
    expected_grads = convert_original_state_dict(grads)
    assert set(expected_grads) == set(ours), set(expected_grads) ^ set(ours)
    for key, g in expected_grads.items():
        torch.testing.assert_close(ours[key].grad, g, rtol=1e-4, atol=1e-6, msg=key)

    lr = meta["case"].get("lr", 5.0)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr).step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected["after_step_logits"], atol=1e-5, rtol=1e-4)
