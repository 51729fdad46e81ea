"""scripts/serve_check.py's launcher check, without vLLM: what it is asked to serve is checked first, and a bad
adapter path, a rank above --max-lora-rank, a base folder without a tokenizer or a public host is one ``error:``
line that says what to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "serve_check.py"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "check-server", *args], capture_output=True, text=True)


@pytest.fixture
def served(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "rank_pattern": {"x": 16}}))
    return base, lora


def test_a_servable_request_passes_and_every_mistake_is_one_line_that_says_what_to_change(served, tmp_path):
    base, lora = served
    assert check("--model", str(base), "--lora-modules", f"a={lora}", "--max-lora-rank", "16").returncode == 0
    cases = [
        (["--model", str(base), "--lora-modules", f"a={lora}", "--max-lora-rank", "8"],
         "rank 16 is above --max-lora-rank 8; start the server with --max-lora-rank 16"),
        (["--model", str(base), "--lora-modules", f"a={tmp_path / 'nowhere'}", "--max-lora-rank", "16"],
         "no adapter_config.json there; pass the folder that `peft-loran export --to-lora` wrote"),
        (["--model", str(base), "--lora-modules", f"a={lora}", "--max-lora-rank", "16", "--host", "0.0.0.0"],
         "serves on 127.0.0.1 only"),
    ]
    (base / "tokenizer.json").rename(base / "kept.json")
    cases.append((["--model", str(base), "--lora-modules", f"a={lora}", "--max-lora-rank", "16"],
                  "the base folder has no tokenizer"))
    for args, words in cases[-1:]:
        out = check(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    (base / "kept.json").rename(base / "tokenizer.json")
    for args, words in cases[:-1]:
        out = check(*args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    loran = tmp_path / "loran"
    loran.mkdir()
    (loran / "adapter_config.json").write_text(json.dumps({"peft_type": "LORAN", "r": 8}))
    out = check("--model", str(base), "--lora-modules", f"a={loran}")
    assert out.returncode == 2 and "export it with `peft-loran export ADAPTER --to-lora RANK`" in out.stderr
