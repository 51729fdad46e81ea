"""The examples as the docs show them: every ``accelerate launch`` line of docs/deploy.md and of the recipe's
docstring names a config that accelerate itself loads (with the launcher the line asks for, and DeepSpeed's JSON
files where it points to them) and flags the recipe accepts; the single-process line then runs, through
``accelerate launch``, on a tiny model on CPU (``--cpu``). The multi-process launchers need GPUs (MULTI_GPU, FSDP
on GPUs, DeepSpeed): multi-process training itself is run on CPU in tests/test_distributed.py (DDP and FSDP2 on
gloo)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXPECTED = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
            "deepspeed_zero3": "DEEPSPEED"}


def launch_lines() -> list[list[str]]:
    """Every ``accelerate launch`` command in docs/deploy.md and the recipe's docstring, as argument lists."""
    text = (REPO / "docs" / "deploy.md").read_text() + (EXAMPLES / "paper_recipe.py").read_text()
    lines = []
    for raw in re.findall(r"accelerate launch (?:[^\n\\]|\\\n)*", text):
        line = raw.replace("\\\n", " ").replace("...", "")
        lines.append(shlex.split(line))
    return lines


def recipe_module():
    spec = importlib.util.spec_from_file_location("paper_recipe", EXAMPLES / "paper_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_documented_launch_line_names_a_loadable_config_and_flags_the_recipe_accepts():
    from accelerate.commands.config.config_args import load_config_from_file

    recipe = recipe_module()
    seen = set()
    lines = launch_lines()
    assert len(lines) >= 5, lines
    for argv in lines:
        config_path = argv[argv.index("--config_file") + 1]
        name = Path(config_path).stem
        config = load_config_from_file(str(REPO / config_path))
        assert str(config.distributed_type).split(".")[-1] == EXPECTED[name], (name, config.distributed_type)
        if config.deepspeed_config:
            ds = json.loads((REPO / config.deepspeed_config["deepspeed_config_file"]).read_text())
            assert ds["zero_optimization"]["stage"] == int(name[-1])
        script = argv.index("examples/paper_recipe.py")
        flags = argv[script + 1:]
        args = recipe.parse_args(flags + ([] if "--output-dir" in flags else ["--output-dir", "x"]))
        assert args.output_dir
        seen.add(name)
    assert seen == set(EXPECTED)


def test_the_single_process_launch_line_runs_the_recipe_on_cpu(tiny_lm, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"source": f"text {i} about a topic", "target": f"title {i}"})
                              for i in range(20)))
    out = tmp_path / "run"
    line = next(argv for argv in launch_lines() if "single_gpu.yaml" in " ".join(argv))
    # the documented line, with the documented model swapped for a tiny one and CPU switches added
    argv = [a for a in line if a not in ("meta-llama/Llama-2-7b-hf",)]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--mixed_precision", "no",
            *argv[2:argv.index("examples/paper_recipe.py")], str(EXAMPLES / "paper_recipe.py"), "--model", tiny_lm,
            "--train-file", str(data), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--max-length", "32", "--cpu"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained on 1 process(es)" in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["loran_alpha"], config["loran_dropout"]) == ("LORAN", 64, 16, 0.2)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (config["sinter_amplitude"], config["sinter_frequency"]) == (5e-5, 1e4)
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("loran_B") and v.abs().sum() > 0 for k, v in tensors.items())  # it trained: B left zero


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_exist_for_every_launcher(name):
    assert (EXAMPLES / "accelerate" / f"{name}.yaml").is_file()


def test_the_trl_sft_example_runs_as_its_docstring_shows(tokenizer_dir, tmp_path):
    """examples/trl_sft.py, the README's TRL example: its documented command line (with a tiny model and a JSONL of
    question -> answer pairs) trains, saves a LoRAN adapter in PEFT's format, reloads it and generates."""
    pytest.importorskip("trl")
    from .conftest import make_tiny_lm

    model = make_tiny_lm(tokenizer_dir, tmp_path / "lm")
    data = tmp_path / "replies.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"what is item {i}?", "answer": f"item {i} is a thing"})
                              for i in range(12)))
    documented = (EXAMPLES / "trl_sft.py").read_text().split("python examples/trl_sft.py", 1)[1].split("\n    #")[0]
    argv = shlex.split(documented.replace("\\\n", " "))
    argv[argv.index("--model") + 1] = model
    argv[argv.index("--train-file") + 1] = str(data)
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "sft")
    done = subprocess.run([sys.executable, str(EXAMPLES / "trl_sft.py"), *argv, "--max-steps", "2", "--max-length",
                           "32"], capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "sft" / "adapter_config.json").read_text())["peft_type"] == "LORAN"
    assert "generated:" in done.stdout and "prompt:    what is item 0?" in done.stdout
