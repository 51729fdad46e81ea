"""Sine-LoRA (``activation="sine"``: ``s sin(w B A) / g``, ``g = sqrt(in_features)``) against the plain reference,
and the non-linear share / effective rank diagnostics against dense computations written out here."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model, LoraConfig, PeftModel

from peft_loran import LoranConfig
from peft_loran import update as LF
from peft_loran.diagnostics import effective_rank, update_statistics

from .reference import activation, layer_factors, naive_linear_output, naive_update
from .test_layers import Toy, weight_out_in

W = 3.0  # a frequency at which sin is far from linear for |BA| ~ 1


def make(targets, seed=0, **kw):
    torch.manual_seed(seed)
    config = LoranConfig(target_modules=targets, activation="sine", sine_frequency=W, init_weights=False,
                         loran_alpha=12, block_rows=7, **kw)
    return inject_adapter_in_model(config, Toy())


def reference_sine(in_features: int, gain=None):
    return activation("sine", 1.0 / (gain or math.sqrt(in_features)), W)


@pytest.mark.parametrize("target", ["lin", "conv"])
@pytest.mark.parametrize("train", [True, False])
def test_sine_linear_and_conv1d_match_reference(target, train):
    model = make([target])
    layer = getattr(model, target)
    layer.train(train)
    x = torch.randn(3, 4, 12, requires_grad=True)
    y = layer(x)
    A, B, Ps, bs, s = layer_factors(layer)
    ref = naive_linear_output(x, weight_out_in(layer), layer.get_base_layer().bias, A, B, Ps, bs,
                              reference_sine(12), s)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    params = [x, A, B]
    for g, w in zip(torch.autograd.grad(y.double(), params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-5, rtol=1e-4)


def test_sine_gain_override_and_embedding_width():
    lin = make(["lin"], sine_gain=2.5).lin
    A, B, Ps, bs, s = layer_factors(lin)
    D = naive_update(A, B, Ps, bs, reference_sine(12, gain=2.5), s)
    torch.testing.assert_close(lin.get_delta_weight("default").double(), D, atol=1e-6, rtol=1e-5)
    emb = make(["emb"]).emb  # A is (r, num_embeddings = 30): g = sqrt(30)
    A, B, Ps, bs, s = layer_factors(emb)
    D = naive_update(A, B, Ps, bs, reference_sine(30), s)
    ids = torch.tensor([[1, 5, 29]])
    torch.testing.assert_close(emb(ids).double(), emb.get_base_layer().weight.double()[ids] + D.T[ids],
                               atol=1e-5, rtol=1e-5)


def test_sine_eval_cache_merge_and_save_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2))

    torch.manual_seed(1)
    model = get_peft_model(base(), LoranConfig(target_modules=["q_proj", "down_proj"], activation="sine",
                                               sine_frequency=W, init_weights=False))
    model.eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        cached = model(input_ids=ids).logits
        layer = model.base_model.model.model.layers[0].mlp.down_proj  # in_features 40: its own g = sqrt(40)
        A, B, Ps, bs, s = layer_factors(layer)
        torch.testing.assert_close(layer.get_delta_weight("default").double(),
                                   naive_update(A, B, Ps, bs, reference_sine(40), s), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached, unmerged)
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(base(), tmp_path / "a").eval()
    assert reloaded.peft_config["default"].activation == "sine"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_sine_starts_as_scaled_lora():
    """Near zero sin(w x) / g ~ (w / g) x: with a tiny B the update is LoRA's times w / g (the issue's warning that a
    fair comparison must separate this scale from the non-linearity)."""
    lin = make(["lin"]).lin
    with torch.no_grad():
        lin.loran_B["default"].mul_(1e-6)
    A, B = lin.loran_A["default"], lin.loran_B["default"]
    s = lin.loran_scaling["default"]
    torch.testing.assert_close(lin.get_delta_weight("default"), s * (W / math.sqrt(12)) * (B @ A), rtol=1e-4,
                               atol=1e-12)


def test_bad_sine_settings_name_the_parameter():
    with pytest.raises(ValueError, match="sine_frequency"):
        LoranConfig(activation="sine", sine_frequency=0.0)
    with pytest.raises(ValueError, match="sine_gain"):
        LoranConfig(activation="sine", sine_gain=-1.0)


# ----------------------------------------------------------------------------------------------- diagnostics
def dense_share(lin) -> float:
    A, B, Ps, bs, s = layer_factors(lin)
    f = activation("sinter", 0.5, 3.0)
    update = naive_update(A, B, Ps, bs, f, s)
    linear = s * (B.double() @ A.double())
    return float((update - linear).pow(2).sum() / update.pow(2).sum())


def test_share_beyond_scale_separates_sine_scale_from_nonlinearity():
    """Near zero Sine-LoRA is LoRA times w / g: the literal share (vs s BA) is about (1 - g / w)^2, while the share
    beyond the best multiple of BA (dense projection here) is close to zero."""
    lin = make(["lin"]).lin
    with torch.no_grad():
        lin.loran_B["default"].mul_(1e-3)
    (row,) = update_statistics(lin)
    A, B, Ps, bs, s = layer_factors(lin)
    D = naive_update(A, B, Ps, bs, reference_sine(12), s)
    BA = B.double() @ A.double()
    c = float((D * BA).sum() / BA.pow(2).sum())
    assert row["nonlinear_beyond_scale"] == pytest.approx(float((D - c * BA).pow(2).sum() / D.pow(2).sum()),
                                                          rel=1e-6, abs=1e-12)
    assert row["nonlinear_beyond_scale"] < 1e-6
    assert row["nonlinear_share"] == pytest.approx((1 - math.sqrt(12) / W) ** 2, rel=1e-3)


def test_nonlinear_share_against_dense_and_its_bound():
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoranConfig(target_modules=["lin"], init_weights=False, sinter_amplitude=0.5,
                                                sinter_frequency=3.0, block_rows=7), Toy())
    rows = update_statistics(model)
    assert [r["module"] for r in rows] == ["lin"]
    assert rows[0]["nonlinear_share"] == pytest.approx(dense_share(model.lin), rel=1e-9)
    assert 1e-3 < rows[0]["nonlinear_share"] <= 0.5**2 / (1 - 0.5) ** 2  # |a x sin(wx)| <= a |x|
    # the paper's setting: the share is below a^2 = 2.5e-9
    paper = inject_adapter_in_model(LoranConfig(target_modules=["lin"], init_weights=False), Toy())
    assert update_statistics(paper)[0]["nonlinear_share"] <= 2.5e-9


def test_effective_rank_and_lora_rows():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    torch.manual_seed(0)
    lora = get_peft_model(Toy(), LoraConfig(target_modules=["lin"], r=2, init_lora_weights=False))
    (row,) = update_statistics(lora)
    assert row["nonlinear_share"] == 0.0 and row["r"] == 2
    assert 1.0 <= row["effective_rank"] <= 2.0 + 1e-9 and row["energy_beyond_r"] < 1e-12
    loran = inject_adapter_in_model(LoranConfig(target_modules=["lin"], r=2, init_weights=False, activation="sine",
                                                sine_frequency=30.0), Toy())
    (row,) = update_statistics(loran)
    assert row["effective_rank"] > 2.5 and row["energy_beyond_r"] > 1e-3  # sin(w BA) is far above rank 2


def test_paired_init_gives_every_method_the_same_initial_A():
    """A paired comparison isolates the method: the command line gives LoRA, LoRAN, Sine-LoRA and HiRA the same
    initial A per module (PEFT's LoRA alone draws more random numbers while building its layers)."""
    from peft import HiraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_loran_cli.training import paired_init

    def build(config, pair=True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
        model = get_peft_model(base, config)
        if pair:
            paired_init(model, seed=3)
        return model

    def first_factors(model):
        out = []
        for m in model.modules():
            for attribute in ("lora_A", "loran_A", "hira_A"):
                factors = getattr(m, attribute, None)
                if factors is not None and "default" in factors:
                    A = factors["default"]
                    out.append(A.weight if isinstance(A, torch.nn.Linear) else A)
        return out

    targets = ["q_proj", "v_proj"]
    unpaired = [first_factors(build(c, pair=False)) for c in (LoraConfig(r=4, target_modules=targets),
                                                            LoranConfig(r=4, target_modules=targets))]
    assert not torch.equal(unpaired[0][0], unpaired[1][0])  # why paired_init exists
    models = [build(LoraConfig(r=4, target_modules=targets)), build(LoranConfig(r=4, target_modules=targets)),
              build(LoranConfig(r=4, target_modules=targets, activation="sine")),
              build(HiraConfig(r=4, target_modules=targets))]
    factors = [first_factors(m) for m in models]
    assert all(len(f) == 4 for f in factors)
    for other in factors[1:]:
        for a, b in zip(factors[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    bound = 1 / math.sqrt(32)
    assert float(factors[0][0].abs().max()) <= bound and float(factors[0][0].std()) > bound / 3
    assert not torch.equal(factors[0][0], factors[0][1])  # each module its own draw


def test_sign_flip_p_value_by_enumeration():
    from peft_loran_cli.report import sign_flip_p

    # five positive differences: only "all +" and "all -" are as extreme, 2 of 32 sign patterns
    assert sign_flip_p([0.1, 0.2, 0.3, 0.1, 0.2]) == pytest.approx(2 / 32)
    # symmetric differences: every pattern is at least as extreme as a zero sum
    assert sign_flip_p([0.1, -0.1]) == 1.0
    assert sign_flip_p([0.5]) is None
