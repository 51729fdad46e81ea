"""What evaluation and generation hold in memory, and what they cost in time: base vs PEFT LoRA vs LoRAN with the
eval cache, with a cache budget, without the cache, and merged; float32 and 4-bit (bitsandbytes NF4) bases.

    python benchmarks/eval_memory.py [--targets all|qv] [--json results/benchmarks/eval-memory-cpu.json]
    python benchmarks/eval_memory.py --from-json results/benchmarks/eval-memory-cpu.json      # re-render

Each (base, method) runs in a fresh process: build the Llama-shaped model (hidden 1024, 8 layers, as bench.py's
headline; the 4-bit base is the same random model saved once and loaded with ``BitsAndBytesConfig(load_in_4bit)``),
run one 1-token forward (bitsandbytes repacks 4-bit weights on the first CPU forward; that one-time transient
is not what evaluation holds), adapt it (r = 8, random factors), then measure from the adapted model's RSS: **eval**, a no-grad forward of 256
tokens, run 4 times after one warm-up (the warm-up builds LoRAN's cache, so the peak includes what the cache keeps);
**gen**, greedy generation of 32 tokens from a 16-token prompt, 3 times after one warm-up. Memory is peak RSS above
the adapted model before its first call (``/proc/self/status`` VmHWM after ``clear_refs``), for eval and for
gen alike (gen runs after eval in the same process, so both include the cache); times are medians. LoRAN methods:
``loran`` (default: cache on, unbounded), ``loran_budget`` (``set_eval_cache(model, True, max_mb=...)`` with
half of what the full cache needs: half the layers cached, the rest per call), ``loran_nocache``
(``set_eval_cache(model, False)``: every call rebuilds ``f(BA)`` block by block) and ``loran_merged``
(``merge_and_unload()``: the base model's cost by construction, shown as the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TARGETS, Case, _build, _median_seconds, _release_freed_memory  # noqa: E402

METHODS = ("base", "lora", "loran", "loran_budget", "loran_nocache", "loran_merged")
BASES = ("float32", "4bit")


def _model(base: str, saved: str):
    import torch

    if base == "float32":
        return _build(Case(method="base"))
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(saved, quantization_config=quant)


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
    if method == "loran_budget":
        full = sum(_cache_bytes(m) for m in model.modules() if isinstance(m, peft_loran.LoranLayer))
        peft_loran.set_eval_cache(model, True, max_mb=full / 2 / 2**20)
    elif method == "loran_nocache":
        peft_loran.set_eval_cache(model, False)
    elif method == "loran_merged":
        model = model.merge_and_unload()
    return model


def _cache_bytes(layer) -> int:
    """Bytes one layer's cache entry takes: a weight-sized matrix in the compute dtype, which is float32 for both
    bases here (the 4-bit model keeps its other modules, and so its activations, in float32)."""
    base = layer.get_base_layer()
    return base.out_features * base.in_features * 4


def run_child(base: str, method: str, targets: str, saved: str) -> dict:
    import torch

    from peft_loran_cli.training import peak_memory, reset_peak_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, 256))
    prompt = ids[:, :16]
    model = _model(base, saved).eval()
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights on the first CPU forward: keep that out of the figures
        model(input_ids=ids[:, :1])
    model = _adapt(model, method, targets).eval()
    gen_kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    result: dict = {}
    _release_freed_memory()
    model_rss = reset_peak_memory("cpu")
    with torch.no_grad():
        for what, call, repeats in (("eval", lambda: model(input_ids=ids), 4),
                                    ("gen", lambda: model.generate(input_ids=prompt, **gen_kwargs), 3)):
            _release_freed_memory()
            reset_peak_memory("cpu")
            call()  # warm-up: builds LoRAN's cache
            seconds = _median_seconds(call, repeats, "cpu")
            result[f"{what}_mem_mb"] = peak_memory("cpu")[0] - model_rss  # both above the adapted model
            result[f"{what}_s"] = seconds
            if what == "eval" and method.startswith("loran") and method != "loran_merged":
                import peft_loran

                layers = [m for m in model.modules() if isinstance(m, peft_loran.LoranLayer)]
                result["cached_layers"] = sum(bool(m._loran_cache) for m in layers)
                result["adapted_layers"] = len(layers)
    result["gen_tok_s"] = 32 / result.pop("gen_s")
    return result


def measure(base: str, method: str, targets: str, saved: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([base, method, targets, saved])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {base}/{method}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    lines = [f"targets: {results['targets']}; {results['machine']}", "",
             "| base | method | cached layers | eval mem (MB) | eval forward (s) | eval / base | gen mem (MB) "
             "| gen tok/s | gen / base |",
             "|---|---|---|---|---|---|---|---|---|"]
    for base in BASES:
        rows = results["runs"].get(base)
        if not rows:
            continue
        ref = rows["base"]
        for method in METHODS:
            r = rows[method]
            cached = f"{r['cached_layers']} of {r['adapted_layers']}" if "cached_layers" in r else ""
            lines.append(f"| {base} | {method} | {cached} | {r['eval_mem_mb']:.0f} | {r['eval_s']:.3f} | "
                         f"{r['eval_s'] / ref['eval_s']:.2f}x | {r['gen_mem_mb']:.0f} | {r['gen_tok_s']:.1f} | "
                         f"{r['gen_tok_s'] / ref['gen_tok_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="all", choices=sorted(TARGETS))
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated: float32,4bit")
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
    results = {"targets": args.targets, "runs": {},
               "machine": f"{platform.machine()}, {os.environ.get('BENCH_THREADS', os.cpu_count())} threads"}
    with tempfile.TemporaryDirectory() as saved:
        bases = args.bases.split(",")
        if "4bit" in bases:
            _build(Case(method="base")).save_pretrained(saved)
        for base in bases:
            results["runs"][base] = {}
            for method in METHODS:
                results["runs"][base][method] = measure(base, method, args.targets, saved)
                print(f"  {base:7s} {method:13s} {json.dumps(results['runs'][base][method])}", file=sys.stderr,
                      flush=True)
    if args.json:
        from peft_loran._atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
