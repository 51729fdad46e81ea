"""The examples: the paper recipe runs (on a tiny model, CPU) and the launcher configs are well-formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_paper_recipe_smoke_on_cpu(tiny_lm, tmp_path):  # noqa: F811
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"source": f"text {i} about a topic", "target": f"title {i}"})
                              for i in range(20)))
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "paper_recipe.py"), "--model", tiny_lm, "--train-file", str(data),
           "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
           "--max-length", "32", "--cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["loran_alpha"], config["loran_dropout"]) == ("LORAN", 64, 16, 0.2)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (config["sinter_amplitude"], config["sinter_frequency"]) == (5e-5, 1e4)


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((EXAMPLES / "accelerate" / f"{name}.yaml").read_text())
    assert config["distributed_type"] in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
    if config["distributed_type"] == "DEEPSPEED":
        ds = json.loads((EXAMPLES.parent / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
