"""What evaluation and generation add to a training process's memory, and what they cost in time: base vs PEFT
LoRA vs LoRAN (default: no eval cache; with the full cache; merged); float32 and 4-bit (bitsandbytes NF4) bases.

    python benchmarks/eval_memory.py [--targets all|qv] [--json results/benchmarks/eval-memory-all-cpu.json]
    python benchmarks/eval_memory.py --from-json results/benchmarks/eval-memory-all-cpu.json      # re-render
    python benchmarks/eval_memory.py --device cuda        # on a GPU: peak CUDA allocations instead of peak RSS

Each (base, method) runs in a fresh process, as a Trainer does it: build the Llama-shaped model (hidden 1024, 4
layers; the 4-bit base is the same random model saved once and loaded with ``BitsAndBytesConfig(load_in_4bit)``),
adapt it (r = 8, random factors), train 3 AdamW steps on 256 tokens, then evaluate (a no-grad forward of 256 tokens,
1 warm-up + 4 timed) and generate (16 greedy tokens from a 16-token prompt, 1 warm-up + 3 timed). **raise** is how
far evaluation and generation push the process's peak RSS above the peak training reached (``/proc/self/status``
VmHWM; 0 when they fit under it): the memory an evaluation inside training needs beyond training's own. Times
are medians. ``base`` does not train (its rows are the speed yardstick). LoRAN methods: ``loran`` (the default:
no cache, every no-grad call builds ``f(BA)`` block by block), ``loran_cache`` (``set_eval_cache(model, True)``:
one weight-sized matrix per adapted layer in the compute dtype) and ``loran_merged`` (``merge_and_unload()`` after
training: the base model's cost at inference).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (TARGETS, Case, _build, _median_seconds, _release_freed_memory, cpu_name,  # noqa: E402
                   write_json)

METHODS = ("base", "lora", "loran", "loran_cache", "loran_merged")
BASES = ("float32", "4bit")
LAYERS = 4


def _model(base: str, saved: str, device: str):
    import torch

    if base == "float32":
        return _build(Case(method="base", layers=LAYERS, device=device))
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(saved, quantization_config=quant, device_map={"": device})


def _adapt(model, method: str, targets: str):
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_loran
    from peft_loran import LoranConfig

    if method == "base":
        return model
    torch.manual_seed(1)
    modules = TARGETS[targets]
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False))
    model = get_peft_model(model, LoranConfig(r=8, loran_alpha=16, target_modules=modules, init_weights=False))
    if method == "loran_cache":
        peft_loran.set_eval_cache(model, True)
    return model


def run_child(base: str, method: str, targets: str, saved: str, device: str = "cpu") -> dict:
    import torch

    from peft_loran_cli.memory import peak_memory, reset_peak_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, 256)).to(device)
    prompt = ids[:, :16]
    model = _model(base, saved, device).eval()
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights on the first CPU forward: keep that out of the figures
        model(input_ids=ids[:, :1])
    model = _adapt(model, method, targets)
    result: dict = {}
    _release_freed_memory()
    reset_peak_memory(device)
    if method != "base":  # train as a Trainer would, then evaluate inside the same process
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del optimizer
        if method == "loran_merged":
            model = model.merge_and_unload()
    train_peak = peak_memory(device)[0]
    result["train_peak_mb"] = train_peak
    model.eval()
    gen_kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for what, call, repeats in (("eval", lambda: model(input_ids=ids), 4),
                                    ("gen", lambda: model.generate(input_ids=prompt, **gen_kwargs), 3)):
            call()  # warm-up (builds LoRAN's cache when it is on)
            result[f"{what}_s"] = _median_seconds(call, repeats, device)
            result[f"{what}_raise_mb"] = max(0.0, peak_memory(device)[0] - train_peak)
    if method.startswith("loran") and method != "loran_merged":
        import peft_loran

        layers = [m for m in model.modules() if isinstance(m, peft_loran.LoranLayer)]
        result["cached_layers"] = sum(bool(m._loran_cache) for m in layers)
        result["adapted_layers"] = len(layers)
    result["gen_tok_s"] = 16 / result.pop("gen_s")
    return result


def measure(base: str, method: str, targets: str, saved: str, device: str = "cpu") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([base, method, targets, saved, device])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {base}/{method}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    lines = [f"targets: {results['targets']}; {results['machine']}", "",
             "| base | method | cached layers | eval raise (MB) | gen raise (MB) | eval forward (s) | eval / base | "
             "gen tok/s | gen / base |", "|---|---|---|---|---|---|---|---|---|"]
    for base in BASES:
        rows = results["runs"].get(base)
        if not rows:
            continue
        ref = rows["base"]
        for method in METHODS:
            r = rows[method]
            cached = f"{r['cached_layers']} of {r['adapted_layers']}" if "cached_layers" in r else ""
            raise_text = ("" if method == "base" else f"{r['eval_raise_mb']:.0f}", "" if method == "base"
                          else f"{r['gen_raise_mb']:.0f}")
            lines.append(f"| {base} | {method} | {cached} | {raise_text[0]} | {raise_text[1]} | {r['eval_s']:.3f} | "
                         f"{r['eval_s'] / ref['eval_s']:.2f}x | {r['gen_tok_s']:.1f} | "
                         f"{r['gen_tok_s'] / ref['gen_tok_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated: float32,4bit")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: peak CUDA allocations (torch.cuda.max_memory_allocated) instead of peak RSS")
    parser.add_argument("--json", help="write the raw measurements here")
    parser.add_argument("--from-json", help="render the tables of an earlier run")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(*json.loads(args.child))))
        return
    if args.from_json:
        with open(args.from_json) as fh:
            print(render(json.load(fh)))
        return
    machine = f"{cpu_name()}, {os.environ.get('BENCH_THREADS', os.cpu_count())} threads"
    if args.device == "cuda":
        import torch

        machine += f", {torch.cuda.get_device_name()} (peak CUDA allocations), torch {torch.__version__}"
    results = {"targets": args.targets, "runs": {}, "machine": machine}
    with tempfile.TemporaryDirectory() as saved:
        bases = args.bases.split(",")
        if "4bit" in bases:
            _build(Case(method="base", layers=LAYERS)).save_pretrained(saved)
        for base in bases:
            results["runs"][base] = {}
            for method in METHODS:
                results["runs"][base][method] = measure(base, method, args.targets, saved, args.device)
                print(f"  {base:7s} {method:13s} {json.dumps(results['runs'][base][method])}", file=sys.stderr,
                      flush=True)
    if args.json:
        write_json(args.json, results)
    print(render(results))


if __name__ == "__main__":
    main()
