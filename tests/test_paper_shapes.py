"""The paper's recipe at its real sizes, end to end: ``MLoraConfig(r=[64, 4096], ...)`` as users write it, on a
2-layer Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32 heads) with a 4-bit NF4 base (double
quantization, bf16 compute, as in QLoRA): train a step, evaluate, export to LoRA, merge; and an original-format
checkpoint with the published adapters' key names and shapes loads into it."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peft-loran[quant]')")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft_loran import MLoraConfig, export_lora  # noqa: E402

from .reference import activation, layer_factors, naive_update  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("on_device")]

HIDDEN, LAYERS = 4096, 2
PAPER = dict(r=[64, 4096], mlora_alpha=16, mlora_af="Sin", mlora_af_sin_A=5e-5, mlora_af_sin_omega=1e4,
             mlora_use_P=False, mlora_use_b=False, mlora_dropout=0.2, bias="none", task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def seven_b_shaped(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=11008, num_hidden_layers=LAYERS,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("llama-2-7b-shaped")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def nf4_base(path):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": torch.empty(0).device})


def check_layer_against_reference(layer, x):
    """The adapted layer's no-grad output = the 4-bit base layer's own output + s f(BA) x (float64, tests' reference)."""
    A, B, Ps, bs, s = layer_factors(layer)
    with torch.no_grad():
        got = layer(x).double()
        expected = layer.get_base_layer()(x).double() + x.double() @ naive_update(
            A, B, Ps, bs, activation("sinter"), s).T
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16 compute of the base output
    adapter_effect = (got - layer.get_base_layer()(x).double()).abs().max()
    assert adapter_effect > 0.05, "the check needs an adapter that changes the output"


def test_paper_recipe_trains_evaluates_exports_and_merges_on_an_nf4_7b_shaped_model(seven_b_shaped, tmp_path):
    model = get_peft_model(nf4_base(seven_b_shaped), MLoraConfig(**PAPER))  # the users' line, unchanged
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == LAYERS * 2 * 2 * 64 * HIDDEN  # q/v, A and B, r = 64
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert tuple(q_proj.loran_A["default"].shape) == (64, HIDDEN) and q_proj.loran_scaling["default"] == 16 / 64

    model.train()
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0), device="cpu")
    ids = ids.to(torch.empty(0).device)  # the default device (--device): the CPU generator draws the same ids
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad_A = q_proj.loran_A["default"].grad
    assert torch.isfinite(loss) and grad_A is not None and float(grad_A.abs().sum()) == 0.0  # B = 0: dA = 0
    assert float(q_proj.loran_B["default"].grad.abs().sum()) > 0
    optimizer.step()
    assert float(q_proj.loran_B["default"].detach().abs().sum()) > 0  # the step moved the adapter

    with torch.no_grad():  # an adapter large enough to see, for evaluation and export, and above NF4's resolution
        for name, p in model.named_parameters():  # for the merge (entries of s f(BA) near the weights' own size)
            if "loran_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator(p.device).manual_seed(1))
    model.eval()
    x = torch.randn(3, HIDDEN, dtype=torch.bfloat16)
    check_layer_against_reference(q_proj, x)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()

    report = export_lora(model, str(tmp_path / "lora"), 64)
    # at the paper's a = 5e-5, f(BA) is BA to 5e-5: a rank-64 LoRA holds it almost exactly
    assert report["max_relative_error"] < 1e-3
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 64

    expected = q_proj.get_base_weight().float() + q_proj.get_delta_weight("default").float()
    before = q_proj.get_base_weight().float()
    merged = model.merge_and_unload()
    weight = merged.model.layers[0].self_attn.q_proj
    after = bnb.functional.dequantize_4bit(weight.weight.data, weight.weight.quant_state).float()
    # re-quantized to NF4: closer to W + s f(BA) than the old weight was, by most of the update
    assert (after - expected).norm() < 0.5 * (before - expected).norm()


def test_an_original_checkpoint_with_the_published_key_names_loads(seven_b_shaped, tmp_path):
    """The original's q/v adapters for Llama-2-7B: ``...q_proj.mlora_A`` (64, 4096) and ``...mlora_B`` (4096, 64)
    in a pickled ``adapter_model.bin``, with its ``mlora_*`` config."""
    generator = torch.Generator().manual_seed(2)
    state = {}
    for i in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            # drawn on the CPU (as the original saved them) whatever the tests' default device
            state[f"{key}.mlora_A"] = torch.randn(64, HIDDEN, generator=generator, device="cpu") * 0.02
            state[f"{key}.mlora_B"] = torch.randn(HIDDEN, 64, generator=generator, device="cpu") * 0.05
    folder = tmp_path / "original"
    folder.mkdir()
    torch.save(state, folder / "adapter_model.bin")
    config = {**PAPER, "peft_type": "MLORA", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "",
              "fan_in_fan_out": False, "inference_mode": True, "init_mlora_weights": True, "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))

    model = PeftModel.from_pretrained(nf4_base(seven_b_shaped), folder).eval()
    v_proj = model.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(v_proj.loran_A["default"].detach().cpu(), state[
        "base_model.model.model.layers.1.self_attn.v_proj.mlora_A"])
    torch.testing.assert_close(v_proj.loran_B["default"].detach().cpu(), state[
        "base_model.model.model.layers.1.self_attn.v_proj.mlora_B"])
    check_layer_against_reference(v_proj, torch.randn(3, HIDDEN, dtype=torch.bfloat16))
