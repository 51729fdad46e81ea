"""Export: a LoRAN adapter as a standard PEFT LoRA adapter (loaded by plain PEFT, in a process that never imports
peft_loran) and as a merged transformers model; errors measured against the dense update computed plainly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from peft_loran import LoranConfig
from peft_loran.export import export_lora, export_merged

from .conftest import FIXTURES, tiny_gpt2, tiny_llama
from .reference import activation, layer_factors, naive_update

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 7], [4, 4, 8, 15, 16, 23, 42]])

PLAIN_PEFT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    ids = torch.tensor({ids})
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
    assert "peft_loran" not in sys.modules, "peft_loran was imported"
""").format(ids=IDS.tolist())


def loran_model(seed=0, **kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return get_peft_model(tiny_llama(seed), LoranConfig(r=4, loran_alpha=8, init_weights=False, **kw)).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_plain_lora(base, path):
    return PeftModel.from_pretrained(base, path).eval()


def relative_to_effect(got, loran_out, base_out):
    return ((got - loran_out).abs().max() / (loran_out - base_out).abs().max()).item()


def test_paper_setting_at_its_own_rank_loads_with_plain_peft_in_a_fresh_process(tmp_path):
    model = loran_model(sinter_amplitude=5e-5, sinter_frequency=1e4)
    tiny_llama(0).save_pretrained(tmp_path / "base")
    report = export_lora(model, str(tmp_path / "lora"), 4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(tmp_path / "base"), str(tmp_path / "lora"),
                    str(tmp_path / "out.pt")], check=True)
    got = torch.load(tmp_path / "out.pt")
    with model.disable_adapter():
        base_out = logits(model)
    # Sinter's non-linear part is at most a = 5e-5 of the update (|a x sin(w x)| <= a |x|): that bounds what a
    # rank-r LoRA misses, and it is what we see, both per module and in the logits
    assert report["max_relative_error"] < 5e-5
    assert relative_to_effect(got, logits(model), base_out) < 1e-4
    # a LoRAN adapter whose f is the identity is a LoRA adapter: exported at its rank it is exact to float32
    linear = loran_model(activation="identity")
    export_lora(linear, str(tmp_path / "identity"), 4)
    got = logits(load_plain_lora(tiny_llama(0), tmp_path / "identity"))
    with linear.disable_adapter():
        base_out = logits(linear)
    assert relative_to_effect(got, logits(linear), base_out) < 1e-5


def dense_updates(model):
    """name -> s f(BA) (rows x cols) from tests/reference.py's plain formula, float64."""
    out = {}
    for name, layer in model.get_base_model().named_modules():
        if hasattr(layer, "loran_A"):
            A, B, Ps, bs, s = layer_factors(layer)
            cfg = model.peft_config["default"]
            out[name] = naive_update(A, B, Ps, bs, activation(cfg.activation, cfg.sinter_amplitude,
                                                              cfg.sinter_frequency), s).detach()
    return out


@pytest.mark.parametrize("block_rows", [None, 5])  # one block per module, and several (the SVD's products add up)
def test_strong_setting_reports_the_measured_error_and_it_falls_with_rank(tmp_path, block_rows):
    model = loran_model(sinter_amplitude=0.5, sinter_frequency=3.0, block_rows=block_rows)
    dense = dense_updates(model)
    errors = []
    for rank in (1, 2, 4, 8, 16):
        report = export_lora(model, str(tmp_path / f"r{rank}"), rank)
        tensors = load_file(tmp_path / f"r{rank}" / "adapter_model.safetensors")
        for entry in report["modules"]:
            key = f"base_model.model.{entry['module']}"
            approx = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
            D = dense[entry["module"]]
            measured = ((D - approx).norm() / D.norm()).item()
            assert entry["rank"] == rank
            assert abs(entry["relative_error"] - measured) < 1e-6 + 1e-4 * measured
            # the share of the update's energy the export holds: 1 - ||D - B A||^2 / ||D||^2
            assert abs(entry["energy_kept"] - (1 - measured**2)) < 1e-6
            # the best rank-k error, from the plain SVD of the plain update (randomized SVD within 1%)
            sv = torch.linalg.svdvals(D)
            best = (sv[rank:].pow(2).sum() / sv.pow(2).sum()).sqrt().item()
            assert measured <= best * 1.01 + 1e-7
        errors.append(report["max_relative_error"])
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05  # the strong setting really is far from rank 4


def test_auto_rank_meets_its_tolerance_per_module(tmp_path):
    model = loran_model(sinter_amplitude=0.5, sinter_frequency=3.0)
    report = export_lora(model, str(tmp_path / "auto"), "auto:1e-3", sample_inputs={"input_ids": IDS})
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert all(m["relative_error"] <= 1e-3 for m in report["modules"])
    assert max(ranks.values()) > 4  # the strong setting needs more than the LoRAN rank
    assert config["r"] in ranks.values() and all(config["rank_pattern"].get(k, config["r"]) for k in ranks)
    assert len(set(ranks.values())) > 1, "the check below needs modules of different ranks (a rank_pattern)"
    got = logits(load_plain_lora(tiny_llama(0), tmp_path / "auto"))
    with torch.no_grad(), model.disable_adapter():
        base_out = logits(model)
    # plain PEFT's model is the LoRAN model to within the tolerance: every module's scaling is right (alpha_pattern)
    assert relative_to_effect(got, logits(model), base_out) < 1e-2
    assert (got - logits(model)).abs().max().item() == pytest.approx(
        report["sample_outputs"]["max_abs_difference"], rel=1e-3, abs=1e-6)
    assert json.loads((tmp_path / "auto" / "export_report.json").read_text())["modules"] == report["modules"]
    assert "relative error" in (tmp_path / "auto" / "README.md").read_text()


@pytest.mark.parametrize("case", ["embedding", "chain", "conv1d"])
def test_embedding_chain_and_conv1d(tmp_path, case):
    if case == "conv1d":
        model = get_peft_model(tiny_gpt2(0), LoranConfig(r=4, target_modules=["c_attn"], init_weights=False,
                                                          sinter_amplitude=0.5, sinter_frequency=3.0)).eval()
        fresh = tiny_gpt2(0)
    else:
        kw = (dict(target_modules=["embed_tokens", "q_proj"]) if case == "embedding"
              else dict(chain_dims=[6, 5], use_P=True, use_b=True, activation="tanh"))
        model = loran_model(sinter_amplitude=0.5, sinter_frequency=3.0, **kw)
        fresh = tiny_llama(0)
    report = export_lora(model, str(tmp_path / "lora"), "auto:1e-6")
    assert report["max_relative_error"] <= 1e-6
    got = logits(load_plain_lora(fresh, tmp_path / "lora"))
    torch.testing.assert_close(got, logits(model), atol=2e-5, rtol=1e-5)


def test_original_checkpoint_exports(tmp_path):
    case = FIXTURES / "llama_sigmoid_P_b_3layer"
    expected = load_file(case / "expected.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case / "base"), case / "adapter").eval()
    export_lora(model, str(tmp_path / "lora"), "auto:1e-6")
    lora = load_plain_lora(AutoModelForCausalLM.from_pretrained(case / "base"), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, expected["input_ids"]), expected["adapter_logits"], atol=2e-5, rtol=1e-4)


def test_modules_to_save_travel_with_the_export(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()

    model = get_peft_model(classifier(), LoranConfig(r=4, task_type="SEQ_CLS", init_weights=False,
                                                      target_modules=["q_proj"])).eval()
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(3)  # a trained head
    export_lora(model, str(tmp_path / "lora"), 4)
    got = logits(load_plain_lora(classifier(), tmp_path / "lora"))
    torch.testing.assert_close(got, logits(model), atol=1e-4, rtol=1e-4)


def test_merged_export_equals_the_merged_model_and_loads_without_peft(tmp_path):
    model = loran_model(sinter_amplitude=0.5, sinter_frequency=3.0, target_modules=["q_proj", "embed_tokens"])
    want = logits(model)
    note = export_merged(model, str(tmp_path / "merged"))
    assert note == {"quantized_base": False, "saved_dtype": "float32"}
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        assert not any("lora" in n for n, _ in model.named_parameters())
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits, sys.argv[2])
        assert "peft_loran" not in sys.modules and "peft" not in sys.modules, "PEFT was imported"
    """)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "merged"), str(tmp_path / "out.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=2e-5, rtol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_merged(loran_model(), str(tmp_path / "merged"))


def test_merged_export_of_a_4bit_base_dequantizes_and_saves_bf16(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tiny_llama(0, hidden=64, intermediate=128).save_pretrained(tmp_path / "base")  # bnb CPU: 64-multiples
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant)
    model = get_peft_model(base, LoranConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False,
                                             sinter_amplitude=0.5, sinter_frequency=3.0)).eval()
    want = logits(model).float()
    with model.disable_adapter():
        base_out = logits(model).float()
    note = export_merged(model, str(tmp_path / "merged"))
    assert note == {"quantized_base": True, "saved_dtype": "bfloat16"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not hasattr(merged.config, "quantization_config")
    got = logits(merged).float()
    # bf16 weights: agreement to bf16 precision, far closer than the adapter's own effect
    assert (got - want).abs().max() < 0.1 * (want - base_out).abs().max()


def test_bad_input_gets_one_error_line(tmp_path, capsys):
    import peft_loran_cli as cli

    lora = get_peft_model(tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    model = loran_model()
    model.save_pretrained(tmp_path / "loran")
    (tmp_path / "exists").mkdir()
    cases = [
        ([str(tmp_path / "lora"), "--to-lora", "4"], "is a LORA adapter, not LoRAN"),
        ([str(tmp_path / "loran"), "--to-lora", "0"], "--to-lora: `rank` must be a positive integer"),
        ([str(tmp_path / "loran"), "--to-lora", "auto:2"], "0 < TOL < 1"),
        ([str(tmp_path / "loran"), "--merge", "--output-dir", str(tmp_path / "exists")], "exists; pass --overwrite"),
    ]
    for args, message in cases:
        if "--output-dir" not in args:
            args = args + ["--output-dir", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as exc:
            cli.main(["export", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and err[-1].startswith("error: ") and message in err[-1], (args, err)
    with pytest.raises(ValueError, match="not a LoRAN PeftModel"):
        export_lora(nn.Sequential(nn.Linear(2, 2)), str(tmp_path / "x"), 2)
