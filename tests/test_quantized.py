"""bitsandbytes 8-bit and 4-bit bases (bitsandbytes 0.50 runs both on CPU)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'peft-loran[quant]')")

from peft import get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft_loran import LoranConfig  # noqa: E402

from .reference import activation, layer_factors, naive_update  # noqa: E402

QUANT = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    # the paper's QLoRA setting
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def quantized_loran(path, kind, seed=0, **kw):
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(path, quantization_config=QUANT[kind]())
    config = LoranConfig(target_modules=["q_proj", "v_proj"], init_weights=False, sinter_amplitude=0.5,
                         sinter_frequency=3.0, loran_alpha=12, **kw)  # r = 8: scaling 1.5
    return get_peft_model(base, config)


def repack_for_cpu(base) -> None:
    """bitsandbytes' in-place CPU repacking of a 4-bit weight, done here explicitly: bitsandbytes does it on the first
    no-grad CPU forward only on CPUs with AVX512-BF16, so without this the tests that need it would pass vacuously
    on other machines."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    if not getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu(base.weight.data,
                                                                                   base.weight.quant_state)


def dequantized(layer):
    return layer.get_base_weight().float()


def plain_update(layer):
    """s f(BA) from tests/reference.py, not from the code under test."""
    A, B, Ps, bs, s = layer_factors(layer)
    return naive_update(A, B, Ps, bs, activation("sinter", 0.5, 3.0), s).detach()


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_forward_and_backward_match_reference(saved_llama, kind):
    model = quantized_loran(saved_llama, kind, chain_dims=[16], use_P=True, use_b=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.quantization_backend is not None
    x = torch.randn(2, 5, 64)
    y = layer(x)
    A, B, Ps, bs, s = layer_factors(layer)
    D = naive_update(A, B, Ps, bs, activation("sinter", 0.5, 3.0), s)
    with torch.no_grad():
        base_out = layer.get_base_layer()(x).double()
    ref = base_out + x.double() @ D.T
    tol = 1e-4 if kind == "8bit" else 3e-2  # 4-bit computes in bf16
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y.double(), [A, B, *Ps, *bs], grad)
    want = torch.autograd.grad(ref, [A, B, *Ps, *bs], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=tol, rtol=tol * 10)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_training_steps_on_quantized_base(saved_llama, kind):
    model = quantized_loran(saved_llama, kind)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(1, 13).repeat(2, 1)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_8bit_merge_equals_unmerged(saved_llama):
    model = quantized_loran(saved_llama, "8bit").eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected_weight = dequantized(layer) + plain_update(layer).float()
        unmerged = layer(x)
        layer.merge(safe_merge=True)
        merged = layer(x)
    # re-quantizing to int8 costs up to half a quantization step per weight
    torch.testing.assert_close(dequantized(layer), expected_weight, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(merged, unmerged, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("after_forward", [False, True])
def test_4bit_merge(saved_llama, after_forward):
    # bitsandbytes repacks a 4-bit weight on its first no-grad CPU forward; the merge must read the real weight
    # either way. Checked against dequantize(W) + the plain reference update, re-quantized to nf4
    model = quantized_loran(saved_llama, "4bit").eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        expected_weight = dequantized(layer) + plain_update(layer).float()
        if after_forward:
            layer(torch.randn(2, 64))
            repack_for_cpu(layer.get_base_layer())  # what that forward does on CPUs with AVX512-BF16
        layer.merge()
    got = dequantized(layer)
    # nf4 keeps ~16 levels per block: compare at that resolution
    assert (got - expected_weight).abs().max() < 0.1 * expected_weight.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected_weight.flatten(), dim=0) > 0.99
    assert layer.merged_adapters == ["default"]


def test_4bit_weight_read_after_a_cpu_inference_call_is_the_real_weight(saved_llama):
    # bitsandbytes repacks a 4-bit weight in place on its first no-grad CPU forward; merges and exports read the
    # weight afterwards and must still get the real one, not the repacked bytes dequantized as if unpacked
    model = quantized_loran(saved_llama, "4bit")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    from peft.utils.integrations import dequantize_module_weight

    before = dequantize_module_weight(layer.get_base_layer()).float().clone()
    with torch.no_grad():
        layer(torch.randn(2, 3, 64))
    repack_for_cpu(layer.get_base_layer())  # bitsandbytes does this in that forward only on CPUs with AVX512-BF16
    garbage = dequantize_module_weight(layer.get_base_layer()).float()
    assert (garbage - before).abs().max() > 0.1 * before.abs().max(), "the repacked bytes must read as garbage"
    # (the backend dequantizes in the compute dtype, bf16: agreement to that precision; the repacked bytes are O(1) off)
    torch.testing.assert_close(layer.get_base_weight().float(), before, atol=2e-3, rtol=2e-2)
