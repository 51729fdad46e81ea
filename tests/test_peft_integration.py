"""The PEFT / transformers contract: a LoRAN adapter behaves like a LoRA adapter wherever the method allows."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

import peft_loran
from peft_loran import LORAN, LoranConfig, MLoraConfig

from .reference import activation, layer_factors, naive_update
from .conftest import FIXTURES, tiny_gpt2, tiny_llama

IDS = torch.tensor([[1, 5, 9, 22, 7, 3], [4, 4, 8, 15, 16, 23]])


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def loran_llama(seed=0, **kw):
    base = tiny_llama(seed)
    kw.setdefault("init_weights", False)
    kw.setdefault("sinter_amplitude", 0.5)
    kw.setdefault("sinter_frequency", 3.0)
    return get_peft_model(base, LoranConfig(**kw))


def test_peft_type_behaves_like_an_enum_member():
    assert LORAN == "LORAN" and LORAN.value == "LORAN" and LORAN.name == "LORAN"
    assert str(LORAN) == "PeftType.LORAN"
    assert pickle.loads(pickle.dumps(LORAN)) == LORAN
    config = LoranConfig()
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LORAN"


def test_default_targets_follow_lora_table():
    model = loran_llama()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert names == {"q_proj", "v_proj"}


def test_save_load_roundtrip_safetensors(tmp_path):
    model = loran_llama(chain_dims=[8], use_P=True, use_b=True, activation="tanh").eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoranConfig) and config.activation == "tanh" and config.chain_dims == [8]
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path).eval()
    assert torch.equal(logits(loaded), expected)
    state = get_peft_model_state_dict(loaded)
    assert any(k.endswith("loran_P.0") for k in state) and all("loran_" in k for k in state)


def test_inject_adapter_in_model_and_transformers_load_adapter(tmp_path):
    model = loran_llama().eval()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    # transformers' own PEFT integration
    base = tiny_llama(0)
    base.load_adapter(str(tmp_path), adapter_name="default")
    torch.testing.assert_close(logits(base), expected)
    # low-level injection keeps the model class
    injected = inject_adapter_in_model(LoranConfig(target_modules=["q_proj"]), tiny_llama(0))
    assert isinstance(injected.model.layers[0].self_attn.q_proj, peft_loran.Linear)


def test_transformers_add_adapter_and_set_adapter():
    base = tiny_llama(0)
    before = logits(base)
    base.add_adapter(LoranConfig(target_modules=["q_proj", "v_proj"], init_weights=False), adapter_name="a")
    after = logits(base)
    assert not torch.allclose(before, after)
    base.add_adapter(LoranConfig(target_modules=["q_proj"], init_weights=True), adapter_name="b")
    base.set_adapter("b")
    torch.testing.assert_close(logits(base), before)


def test_add_set_delete_disable_enable():
    model = loran_llama().eval()
    with model.disable_adapter():
        base_out = logits(model)
    a_out = logits(model)
    model.add_adapter("other", LoranConfig(init_weights=False, activation="tanh", r=4))
    model.set_adapter("other")
    other_out = logits(model)
    assert not torch.allclose(other_out, a_out)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model), a_out)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    torch.testing.assert_close(logits(model), a_out)
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(model), base_out)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(logits(model), a_out)


def test_merge_and_unload_and_unload():
    model = loran_llama(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]).eval()
    adapted = logits(model)
    with model.disable_adapter():
        base_out = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)
    unloaded = loran_llama(target_modules=["q_proj"]).unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded), base_out)  # the same seed-0 base model, adapter removed


def test_merge_adapter_then_unmerge_and_disable_while_merged():
    model = loran_llama().eval()
    adapted = logits(model)
    with model.disable_adapter():
        base_out = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_mixed_batch_adapter_names():
    model = loran_llama().eval()
    model.add_adapter("other", LoranConfig(init_weights=False, activation="tanh", r=4))
    ids = torch.cat([IDS, IDS[:1]])
    model.set_adapter("default")
    out_default = logits(model, ids)
    model.set_adapter("other")
    out_other = logits(model, ids)
    with model.disable_adapter():
        out_base = logits(model, ids)
    mixed = logits(model, ids, adapter_names=["default", "other", "__base__"])
    torch.testing.assert_close(mixed[0], out_default[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], out_other[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], out_base[2], atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors_like_lora():
    model = loran_llama().eval()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        logits(model, adapter_names=["default"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        logits(model, adapter_names=["default", "typo"])
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        logits(model, adapter_names=["default", "default"])
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=IDS, adapter_names=["default", "default"])


def test_modules_to_save_and_bias_modes(tmp_path):
    model = loran_llama(modules_to_save=["lm_head"], bias="none")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert all("loran_" in n or "modules_to_save" in n for n in trainable)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))

    from torch import nn

    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)

    # bias modes are applied by the tuner (inject_adapter_in_model only marks the adapters trainable)
    from peft_loran import LoranModel

    tuner = LoranModel(WithBias(), LoranConfig(target_modules=["a"], bias="loran_only"), "default")
    grads = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert "model.a.base_layer.bias" in grads and "model.b.bias" not in grads
    tuner = LoranModel(WithBias(), LoranConfig(target_modules=["a"], bias="all"), "default")
    grads = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert {"model.a.base_layer.bias", "model.b.bias"} <= grads


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_training_lowers_loss_and_changes_only_adapter(make):
    torch.manual_seed(0)
    base = make(0)
    model = get_peft_model(base, LoranConfig(target_modules="all-linear", r=4, loran_alpha=8, activation="sinter"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(1, 13).repeat(4, 1)  # a learnable pattern
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_seed_readme_mlora_example_runs_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = MLoraConfig(r=[64, 4096], mlora_alpha=16, mlora_af="Sin", mlora_af_sin_A=5e-5, mlora_af_sin_omega=1e4,
                         mlora_use_P=False, mlora_use_b=False, mlora_dropout=0.2, bias="none", task_type="CAUSAL_LM")
    assert (config.r, config.chain_dims, config.loran_alpha, config.activation) == (64, [4096], 16, "sinter")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=4096, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16))
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    ids = torch.randint(0, 64, (1, 6))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = q.loran_A["default"], q.loran_B["default"]
    assert A.shape == (64, 4096) and B.shape == (4096, 64)
    # B = 0 at the start: dA = B^T dM is exactly zero, dB is not; after one step both train
    assert float(A.grad.abs().sum()) == 0.0 and float(B.grad.abs().sum()) > 0
    torch.optim.SGD([A, B], lr=1.0).step()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert float(A.grad.abs().sum()) > 0


def test_mlora_config_saved_as_loran(tmp_path):
    config = MLoraConfig(r=[4, 32], mlora_af="Tanh", target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(0), config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAN" and saved["activation"] == "tanh" and saved["zero_centered"] is True
    assert not any(k.startswith("mlora_") for k in saved)


def test_malicious_pickle_is_refused(tmp_path):
    import shutil

    case = FIXTURES / "llama_sinter_paper"
    adapter = tmp_path / "adapter"
    shutil.copytree(case / "adapter", adapter)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(adapter / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(case / "base")
    with pytest.raises(peft_loran.UnsafeCheckpointError, match="Refusing to load"):
        PeftModel.from_pretrained(base, adapter)
    assert not (tmp_path / "pwned").exists()


def test_convert_original_checkpoint_gives_same_outputs(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    case = FIXTURES / "llama_sigmoid_P_b_3layer"
    expected = load_file(case / "expected.safetensors")
    out = peft_loran.convert_original_checkpoint(str(case / "adapter"), str(tmp_path / "converted"))
    assert json.loads(open(os.path.join(out, "adapter_config.json")).read())["peft_type"] == "LORAN"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case / "base"), out).eval()
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["adapter_logits"], atol=1e-5, rtol=1e-4)
    with pytest.raises(FileExistsError):
        peft_loran.convert_original_checkpoint(str(case / "adapter"), out)


def test_layers_to_transform_and_exclude_modules():
    model = loran_llama(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    adapted = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == {"base_model.model.model.layers.1.self_attn.q_proj",
                       "base_model.model.model.layers.1.self_attn.v_proj"}
    model = loran_llama(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert names == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def test_half_precision_base_gets_float32_adapters_and_runs():
    base = tiny_llama(0).to(torch.bfloat16)
    model = get_peft_model(base, LoranConfig(chain_dims=[8], use_P=True, use_b=True, init_weights=False))
    dtypes = {p.dtype for n, p in model.named_parameters() if "loran_" in n}
    assert dtypes == {torch.float32}  # PEFT's autocast_adapter_dtype, P and b lists included
    out = model(input_ids=IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    # against the same model with the update merged by the plain reference formula, in float32
    reference = tiny_llama(0)
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if hasattr(layer, "loran_A"):
                A, B, Ps, bs, s = layer_factors(layer)
                cfg = model.peft_config["default"]
                D = naive_update(A, B, Ps, bs, activation(cfg.activation, cfg.sinter_amplitude, cfg.sinter_frequency), s)
                reference.get_submodule(name).weight += D.float()
    want = reference(input_ids=IDS, labels=IDS)
    # the adapter's own effect on the logits, ours (bf16 base, float32 adapter) against the float32 reference (a
    # tolerance relative to that effect: comparing whole logits would pass with the adapter removed)
    with torch.no_grad(), model.disable_adapter():
        ours_base = model(input_ids=IDS).logits.float()
    ref_effect = want.logits - tiny_llama(0)(input_ids=IDS).logits
    ours_effect = out.logits.float() - ours_base
    assert ref_effect.abs().max() > 0.2, "the adapter must change the logits for this check to mean anything"
    assert (ours_effect - ref_effect).abs().max() < 0.1 * ref_effect.abs().max()
    out.loss.backward()
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.loran_P["default"][0].grad.dtype == torch.float32 and q.loran_P["default"][0].grad.abs().sum() > 0
