"""Adapters in the original code's formats, built from the fixture README's description (key names, shapes, math)
and checked against a plain implementation of the original's formula written here; loading that would leave
adapter weights behind is an error; split checkpoints; the original's MLoraConfig arguments and defaults."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_loran
from peft_loran import LoranConfig, MLoraConfig

from .conftest import FIXTURES, tiny_llama
from .reference import activation

PREFIX = "base_model.model.model."


def original_update(A, B, Ps, bs, f, scaling):
    """The original's D for one layer, verbatim from the fixture README: (in, out) for linear layers, i.e.
    (num_embeddings, embedding_dim) for embeddings."""
    D = (B @ A).T
    for i in range(max(len(Ps), len(bs), 1)):
        D = f(D)
        if Ps:
            D = Ps[i].T @ D
        if bs:
            D = D + bs[i]
    return D * scaling


def write_original_adapter(folder, tensors, r, af, use_P, use_b, targets, alpha=4, A=5e-4, omega=1e3):
    folder.mkdir(parents=True)
    config = {
        "peft_type": "MLORA", "task_type": "CAUSAL_LM", "r": r, "mlora_alpha": alpha, "mlora_af": af,
        "mlora_af_sin_A": A, "mlora_af_sin_omega": omega, "mlora_use_P": use_P, "mlora_use_b": use_b,
        "mlora_dropout": 0.0, "target_modules": targets, "bias": "none", "base_model_name_or_path": "",
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.save(tensors, folder / "adapter_model.bin")


def make_original_tensors(r, modules, use_P, use_b, seed=0):
    """Random non-zero tensors in the original's layout for ``{key_prefix: (rows, cols, embedding?)}``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, (out_f, in_f, is_embedding) in modules.items():
        kind = "mlora_embedding_" if is_embedding else "mlora_"
        tensors[f"{prefix}.{kind}A"] = torch.randn(r[0], r[1], generator=g) * 0.3
        tensors[f"{prefix}.{kind}B"] = torch.randn(out_f, r[0], generator=g) * 0.3
        widths = r[1:] + [in_f]  # with P: stage i maps widths[i - 1] -> widths[i]
        for i in range(1, len(r)):
            if use_P:
                tensors[f"{prefix}.{kind}P_{i}"] = torch.randn(widths[i - 1], widths[i], generator=g) * 0.3
            if use_b:
                width = widths[i] if use_P else r[i]
                tensors[f"{prefix}.{kind}b_{i}"] = torch.randn(width, 1, generator=g) * 0.1
    return tensors


def split_by_stage(tensors, prefix, kind):
    A, B = tensors[f"{prefix}.{kind}A"], tensors[f"{prefix}.{kind}B"]
    Ps = [tensors[k] for k in sorted(t for t in tensors if t.startswith(f"{prefix}.{kind}P_"))]
    bs = [tensors[k] for k in sorted(t for t in tensors if t.startswith(f"{prefix}.{kind}b_"))]
    return A, B, Ps, bs


ORIGINAL_F = {  # the fixture README's table, written out again
    "Sin": lambda x: 5e-4 * x * torch.sin(1e3 * x) + 1.0 * x,
    "Sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "Swish": lambda x: x * torch.sigmoid(25 * x),
    "Gaussian": lambda x: 0.5 * x * torch.exp(-(x**2)),
}


@pytest.mark.parametrize("af", list(ORIGINAL_F))
@pytest.mark.parametrize("use_P,use_b", [(False, False), (True, True), (False, True)])
def test_original_embedding_adapter_with_linear_targets(tmp_path, af, use_P, use_b):
    hidden = vocab = 32  # without P the original needs every width equal for both kinds of layer
    base = tiny_llama(0, hidden=hidden, vocab=vocab, layers=1)
    r = [4, 6] if use_P else [4, hidden]
    emb_key, q_key = PREFIX + "embed_tokens", PREFIX + "layers.0.self_attn.q_proj"
    modules = {emb_key: (hidden, vocab, True), q_key: (hidden, hidden, False)}
    tensors = make_original_tensors(r, modules, use_P, use_b, seed=1)
    write_original_adapter(tmp_path / "adapter", tensors, r, af, use_P, use_b, ["embed_tokens", "q_proj"])

    ids = torch.tensor([[3, 7, 7, 31, 0], [1, 2, 3, 4, 5]])
    scaling = 4 / r[0]
    f = ORIGINAL_F[af]
    # the plain reference: the original's D folded by hand into a copy of the base model's weights
    reference = tiny_llama(0, hidden=hidden, vocab=vocab, layers=1)
    with torch.no_grad():
        D_emb = original_update(*split_by_stage(tensors, emb_key, "mlora_embedding_"), f, scaling)
        D_q = original_update(*split_by_stage(tensors, q_key, "mlora_"), f, scaling)
        assert D_emb.shape == (vocab, hidden)
        reference.model.embed_tokens.weight += D_emb
        reference.model.layers[0].self_attn.q_proj.weight += D_q.T  # y = x W^T + x D
        want = reference(ids).logits

    model = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-4)

    # gradients of the embedding factors against autograd through the plain formula
    layer = model.base_model.model.model.embed_tokens
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items() if k.startswith(emb_key)}
    A, B, Ps, bs = split_by_stage(leaves, emb_key, "mlora_embedding_")
    plain = layer.get_base_layer().weight[ids] + F.embedding(ids, original_update(A, B, Ps, bs, f, scaling))
    grad = torch.randn_like(plain)
    ours = layer(ids)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)
    params = [layer.loran_A["default"], layer.loran_B["default"], *layer.loran_P["default"], *layer.loran_bias["default"]]
    got = torch.autograd.grad(ours, params, grad)
    expected = torch.autograd.grad(plain, [A, B, *Ps, *bs], grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.reshape(g.shape), atol=1e-5, rtol=1e-4)

    # merging works for them as for any other adapter
    with torch.no_grad():
        torch.testing.assert_close(model.merge_and_unload()(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_unmatched_original_embedding_keys_are_an_error_not_a_silent_no_op(tmp_path):
    base = tiny_llama(0, hidden=32, vocab=32, layers=1)
    tensors = make_original_tensors([4, 32], {PREFIX + "embed_tokens": (32, 32, True)}, False, False)
    tensors = {k.replace("embed_tokens", "embed_tokenz"): v for k, v in tensors.items()}  # a renamed module
    write_original_adapter(tmp_path / "adapter", tensors, [4, 32], "Sin", False, False, ["embed_tokens"])
    with pytest.raises(ValueError, match=r"2 LoRAN parameter\(s\) of the model are not in the checkpoint.*"
                                         r"match no module.*embed_tokenz.*wrong|another base model"):
        PeftModel.from_pretrained(base, tmp_path / "adapter")


def test_loran_adapter_on_another_base_model_is_an_error(tmp_path):
    model = get_peft_model(tiny_llama(0, layers=2), LoranConfig(target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"4 LoRAN parameter\(s\) of the model are not in the checkpoint: "
                                         r".*layers\.2\..*another base model"):
        PeftModel.from_pretrained(tiny_llama(0, layers=3), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"another shape.*checkpoint \(32, 8\), model \(48, 8\)"):
        PeftModel.from_pretrained(tiny_llama(0, hidden=48), tmp_path / "adapter")


def test_adapter_saved_with_the_old_bias_name_loads(tmp_path):
    """peft-loran 0.1 and 0.2 saved the chain's biases as ``loran_b`` (beside the factor ``loran_B``); 0.3 calls
    them ``loran_bias`` and still loads the old name: same outputs as the model that saved them."""
    config = LoranConfig(target_modules=["q_proj", "v_proj"], r=4, chain_dims=[16], use_P=True, use_b=True,
                         activation="tanh", init_weights=False)
    model = get_peft_model(tiny_llama(0), config).eval()
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert any(".loran_bias." in k for k in tensors)
    save_file({k.replace(".loran_bias.", ".loran_b."): v for k, v in tensors.items()}, weights)  # as 0.2 wrote it
    ids = torch.tensor([[1, 5, 7, 29, 3]])
    loaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        assert not torch.equal(loaded(input_ids=ids).logits, tiny_llama(0)(input_ids=ids).logits)


def test_loran_adapter_with_a_renamed_module_is_an_error(tmp_path):
    model = get_peft_model(tiny_llama(0), LoranConfig(target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.value"): v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"not in the checkpoint: .*layers\.1\.self_attn\.v_proj.*"
                                         r"match no module: .*self_attn\.value"):
        PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")


def test_original_checkpoint_on_the_wrong_base_model_is_an_error():
    with pytest.raises(ValueError, match="Cannot load adapter 'default'.*another shape"):
        PeftModel.from_pretrained(tiny_llama(0, hidden=48, vocab=99), FIXTURES / "llama_sigmoid_P_b_3layer" / "adapter")
    # without P the chain width is checked against the layer first
    with pytest.raises(ValueError, match="in_features=48.*got widths \\[32\\]"):
        PeftModel.from_pretrained(tiny_llama(0, hidden=48, vocab=99), FIXTURES / "llama_sinter_paper" / "adapter")


def split_into_parts(folder, n=3):
    data = (folder / "adapter_model.bin").read_bytes()
    (folder / "adapter_model.bin").unlink()
    size = -(-len(data) // n)
    names = []
    for i in range(n):
        name = "adapter_model.bin.a" + "abcdefgh"[i]
        (folder / name).write_bytes(data[i * size:(i + 1) * size])
        names.append(name)
    return names


def test_split_original_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    case = FIXTURES / "llama_sigmoid_P_b_3layer"
    expected = load_file(case / "expected.safetensors")
    adapter = tmp_path / "adapter"
    shutil.copytree(case / "adapter", adapter)
    parts = split_into_parts(adapter)
    with pytest.raises(FileNotFoundError, match="cat " + " ".join(parts) + " > adapter_model.bin"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case / "base"), adapter)
    # converting reads the parts in order, without joining them on disk
    converted = peft_loran.convert_original_checkpoint(str(adapter), str(tmp_path / "converted"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case / "base"), converted).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["adapter_logits"],
                                   atol=1e-5, rtol=1e-4)
    # the command the error gives works
    (adapter / "adapter_model.bin").write_bytes(b"".join((adapter / p).read_bytes() for p in parts))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case / "base"), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=expected["input_ids"]).logits, expected["adapter_logits"],
                                   atol=1e-5, rtol=1e-4)


def test_truncated_checkpoint_is_reported_as_corrupt_not_unsafe(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "llama_sinter_paper" / "adapter", adapter)
    data = (adapter / "adapter_model.bin").read_bytes()
    (adapter / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(peft_loran.CorruptCheckpointError, match="truncated, damaged"):
        PeftModel.from_pretrained(tiny_llama(0), adapter)
    split_into_parts(adapter, 2)
    (adapter / "adapter_model.bin.ab").unlink()  # a part missing
    with pytest.raises(peft_loran.CorruptCheckpointError, match="parts must all be present"):
        peft_loran.convert_original_checkpoint(str(adapter), str(tmp_path / "out"))


def test_mlora_config_has_every_original_argument_and_default():
    config = MLoraConfig(r=[2, 4, 8], mlora_alpha=16, target_modules=["q_proj"], mlora_af="Sigmoid")
    assert (config.use_P, config.use_b, config.r, config.chain_dims) == (True, True, 2, [4, 8])
    defaults = MLoraConfig(r=[2, 4])
    assert (defaults.loran_alpha, defaults.loran_dropout, defaults.activation, defaults.sinter_amplitude,
            defaults.sinter_frequency, defaults.use_P, defaults.use_b, defaults.init_weights) == (
        8, 0.0, "sigmoid", 5e-4, 1000.0, True, True, True)
    assert MLoraConfig(r=[2, 4], bias="mlora_only").bias == "loran_only"
    # a script relying on those defaults builds the P/b chain and trains
    model = get_peft_model(tiny_llama(0), config)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert [tuple(p.shape) for p in q.loran_P["default"]] == [(4, 8), (8, 32)]
    assert [tuple(b.shape) for b in q.loran_bias["default"]] == [(8,), (32,)]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # zero-centred, so a new adapter starts exactly at the base model
        assert torch.equal(model(input_ids=ids).logits, tiny_llama(0)(ids).logits)


def test_mlora_only_bias_trains_the_adapted_layers_biases():
    from torch import nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    model = get_peft_model(Two(), MLoraConfig(r=[2, 8], mlora_use_P=False, mlora_use_b=False, target_modules=["a"],
                                              bias="mlora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("a.base_layer.bias") for n in trainable)
    assert not any(n.endswith("b.bias") for n in trainable)


@pytest.mark.parametrize("chain", [{}, dict(chain_dims=[6], use_P=True, use_b=True)])
def test_new_embedding_adapter_zeroes_the_per_token_factor(chain):
    model = get_peft_model(tiny_llama(0), LoranConfig(target_modules=["embed_tokens"], **chain))
    layer = model.base_model.model.model.embed_tokens
    per_token = layer.loran_P["default"][-1] if chain else layer.loran_A["default"]
    assert per_token.shape[-1] == 101 and torch.count_nonzero(per_token) == 0
    assert torch.count_nonzero(layer.loran_B["default"]) == layer.loran_B["default"].numel()
    ids = torch.tensor([[1, 2, 3, 100]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama(0)(ids).logits)


def _train_embedding_only(config, steps=15):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 101, (4, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return {n.rsplit(".", 2)[-2]: (p.detach() - before[n]).norm().item()
            for n, p in model.named_parameters() if p.requires_grad}


def test_embedding_adapter_trains_like_peft_lora():
    from peft import LoraConfig

    ours = _train_embedding_only(LoranConfig(r=4, loran_alpha=8, target_modules=["embed_tokens"]))
    lora = _train_embedding_only(LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]))
    moved = {"loran_A": lora["lora_embedding_A"], "loran_B": lora["lora_embedding_B"]}
    for name, distance in ours.items():
        assert 0.67 < distance / moved[name] < 1.5, (name, distance, moved[name])


def test_transformers_load_adapter_refuses_missing_loran_keys_too(tmp_path):
    model = get_peft_model(tiny_llama(0, layers=2), LoranConfig(target_modules=["q_proj"], init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    base = tiny_llama(0, layers=3)
    with pytest.raises(ValueError, match=r"1 LoRAN tensor\(s\) missing from the checkpoint|2 LoRAN tensor\(s\) missing"):
        base.load_adapter(str(tmp_path / "adapter"))
    assert not any("loran_" in n for n, _ in base.named_parameters()), "the half-loaded adapter was left in place"
    ok = tiny_llama(0, layers=2)
    ok.load_adapter(str(tmp_path / "adapter"))  # the right base loads as before
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ok(ids).logits, model(input_ids=ids).logits)
