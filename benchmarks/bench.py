"""LoRAN cost vs PEFT LoRA vs a naive LoRAN, side by side, each measurement in a fresh process.

    python benchmarks/bench.py --preset headline          # hidden 1024, 8 layers, 256 tokens, r=8 (the targets)
    python benchmarks/bench.py --preset grid              # widths x tokens x ranks x targets (smaller models)
    python benchmarks/bench.py --preset layers            # peak memory vs number of layers
    python benchmarks/bench.py --preset paper             # the paper's recipe at Llama-2-7B's layer shapes
    python benchmarks/bench.py --preset paper-scan        # its step-time ratio over tokens x rank, next to the floor
    python benchmarks/bench.py --preset all --out docs/benchmarks.md

Methods: ``lora`` (PEFT LoRA), ``naive`` (LoRAN the original's way: dense ``f(BA)`` through plain autograd; kept
here only as the yardstick), ``loran`` (this package). Models are Llama-shaped, built from a config (random
weights; vocabulary 4096 so the LM head does not dominate). Memory is peak RSS above the built model on CPU
(``/proc/self/status`` VmHWM after resetting it with ``clear_refs``), ``torch.cuda.max_memory_allocated`` above
the built model on GPU. Times are medians over repeated steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@dataclass
class Case:
    method: str
    hidden: int = 1024
    layers: int = 8
    tokens: int = 256
    rank: int = 8
    targets: str = "qv"
    batch: int = 1
    steps: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    dropout: float = 0.0
    gen_tokens: int = 24
    gen_repeats: int = 3
    intermediate: int = 0  # 0: 2.75 x hidden, rounded to 64
    heads: int = 0  # 0: hidden / 64
    vocab: int = 4096
    alpha: float = 0.0  # 0: 2 x rank
    evaluate: bool = True  # also measure the eval forward and generation
    quant: str = ""  # "nf4": the decoder's linear layers as bitsandbytes NF4 (double quantization, bf16 compute)


# ------------------------------------------------------------------------------------------------ child process
class NaiveLoran:
    """The original's way: ``base(x) + s * dropout(x) @ f(B A)^T`` with the dense matrix through autograd."""

    @staticmethod
    def wrap(model, targets, rank, alpha, dropout=0.0):
        import math

        import torch
        from torch import nn

        class Wrapped(nn.Module):
            def __init__(self, base):
                super().__init__()
                self.base = base
                self.loran_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
                self.loran_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
                nn.init.kaiming_uniform_(self.loran_A, a=math.sqrt(5))
                self.s = alpha / rank

                self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

            def forward(self, x):
                m = (self.loran_B @ self.loran_A).float()
                d = m + 5e-5 * m * torch.sin(1e4 * m)
                return self.base(x) + self.s * nn.functional.linear(self.dropout(x), d.to(x.dtype))

        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    setattr(module, child_name, Wrapped(child))
        return model


def cpu_name() -> str:
    """The CPU's model name (every figure says which CPU gave it), with its widest vector extension and, where
    ``ATEN_CPU_CAPABILITY`` holds torch's and inductor's kernels to a narrower one (``benchmarks/as_avx2.sh``), that."""
    limit = {"avx2": "AVX2", "avx512": "AVX-512", "default": "no vector extension"}.get(
        os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower())
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        name = platform.processor() or platform.machine()
        return f"{name} (kernels limited to {limit})" if limit else name
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({widest}{f', kernels limited to {limit}' if limit and limit != widest else ''})"


def _build(case: Case):
    """The Llama-shaped model, built directly on the device in the case's dtype (random weights); with ``quant``
    "nf4" its decoder layers' linear layers quantized in memory to bitsandbytes NF4 (as QLoRA loads them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = case.heads or max(1, case.hidden // 64)
    config = LlamaConfig(
        vocab_size=case.vocab, hidden_size=case.hidden,
        intermediate_size=case.intermediate or int(case.hidden * 2.75) // 64 * 64,
        num_hidden_layers=case.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(512, case.tokens + 64), tie_word_embeddings=False,
    )
    dtype = getattr(torch, case.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(case.device):  # a 7B-shaped model initialised on a CPU first would take most of a minute
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if case.quant == "nf4":
        _quantize_nf4(model)
    return model


def _quantize_nf4(model) -> None:
    """Replace every linear layer of the decoder by a bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16
    compute) holding the quantized weight: what ``from_pretrained(quantization_config=...)`` gives, without writing
    the model to disk first."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                device = child.weight.device
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to(device)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
    model.is_loaded_in_4bit = True


def _adapt(model, case: Case):
    if case.method == "base":
        return model
    alpha = case.alpha or 2 * case.rank
    if case.method == "naive":
        return NaiveLoran.wrap(model, TARGETS[case.targets], case.rank, alpha, case.dropout)
    from peft import LoraConfig, get_peft_model

    if case.method == "lora":
        config = LoraConfig(r=case.rank, lora_alpha=alpha, target_modules=TARGETS[case.targets],
                            lora_dropout=case.dropout)
    else:  # loran, loran_compiled, loran_eager: the same adapter, another kernel mode (see METHODS)
        from peft_loran import LoranConfig

        config = LoranConfig(r=case.rank, loran_alpha=alpha, target_modules=TARGETS[case.targets],
                             loran_dropout=case.dropout)
    return get_peft_model(model, config)


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc), so that RSS measured from here on is memory in use."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _eval_and_generate(model, ids, case: Case) -> tuple[float, float]:
    """Median no-grad forward time on ``ids`` and greedy-generation tokens/s from its first 16 tokens."""
    import torch

    prompt = ids[:1, :16]
    gen_kwargs = dict(max_new_tokens=case.gen_tokens, min_new_tokens=case.gen_tokens, do_sample=False, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # warm-up (and, for LoRAN, building the eval cache)
        eval_s = _median_seconds(lambda: model(input_ids=ids), case.steps, case.device)
        if not case.gen_repeats:  # --no-generation
            return eval_s, float("nan")
        model.generate(input_ids=prompt, **gen_kwargs)
        gen_s = _median_seconds(lambda: model.generate(input_ids=prompt, **gen_kwargs), case.gen_repeats, case.device)
    return eval_s, case.gen_tokens / gen_s


def run_child(case: Case) -> dict:
    import torch

    from peft_loran_cli.memory import peak_memory, reset_peak_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model = _build(case)
    ids = torch.randint(0, case.vocab, (case.batch, case.tokens), device=case.device)
    result: dict = {}

    # the bare base model, in this same process, is the yardstick for the adapted eval forward and generation
    if case.evaluate:
        result["base_eval_s"], result["base_gen_tok_s"] = _eval_and_generate(model, ids, case)

    model = _adapt(model, case)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def train_step(input_ids):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if case.method.startswith("loran"):
        # The compiled kernels' one-time cost (compiling, importing inductor) is paid on a forward and backward of
        # 8 tokens (the kernels' shapes depend on the layers, not the tokens); it is reported, not in the figures.
        _sync(case.device)
        _release_freed_memory()
        warm_before = reset_peak_memory(case.device)
        t0 = time.perf_counter()
        model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()
        opt.zero_grad(set_to_none=True)
        _sync(case.device)
        result["warmup_s"] = time.perf_counter() - t0
        result["warmup_mem_mb"] = peak_memory(case.device)[0] - warm_before
    _release_freed_memory()
    before = reset_peak_memory(case.device)  # as `peft-loran compare` measures: peak RSS, or CUDA allocations
    times = []
    for step in range(case.steps + 1):
        _sync(case.device)
        t0 = time.perf_counter()
        train_step(ids)
        _sync(case.device)
        if step:  # the first step allocates optimizer state
            times.append(time.perf_counter() - t0)
    result["train_step_s"] = statistics.median(times)
    result["train_mem_mb"] = peak_memory(case.device)[0] - before
    if case.device == "cuda":
        result["train_peak_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20  # absolute, the model included
    if case.evaluate:
        result["eval_s"], result["gen_tok_s"] = _eval_and_generate(model, ids, case)
        if case.method.startswith("loran"):  # the same with the eval cache on (one weight-sized matrix per layer)
            import peft_loran

            peft_loran.set_eval_cache(model, True)
            result["eval_cached_s"], result["gen_cached_tok_s"] = _eval_and_generate(model, ids, case)
            peft_loran.set_eval_cache(model, False)
    return result


def run_child_group(cases: list[Case]) -> None:
    """Several cases of one method in this one process, one after the other (the model and optimizer freed and the
    peak statistics reset between them); one JSON line per case as it finishes, so a run cut short keeps what it
    measured. The first case's ``warmup_s`` is the process's one-time compile cost."""
    import gc

    import torch

    for case in cases:
        try:
            line = {"case": asdict(case), "results": run_child(case)}
        except Exception as exc:  # noqa: BLE001 (one failed case must not lose the others; the message says why)
            line = {"case": asdict(case), "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(json.dumps(line), flush=True)
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- orchestrator
#: ``loran`` is ours as a user gets it (the default plan and kernel choice: on CPUs the compiled kernel for layers of
#: at least 1024 x 1024, on GPUs the accelerator plan with the compiled kernel; kernels.choose_kernel);
#: ``loran_compiled`` forces the compiled kernel on every layer (PEFT_LORAN_COMPILE=1), ``loran_eager`` switches it
#: off (PEFT_LORAN_COMPILE=0). Set PEFT_LORAN_PLAN=accelerator in the environment to run the GPU's plan on a CPU.
METHODS = ("lora", "naive", "loran", "loran_compiled", "loran_eager")


#: The kernel mode each method runs with (the others: the environment's, i.e. the default).
MODES = {"loran_compiled": "1", "loran_eager": "0"}


def _child_env(method: str) -> Optional[dict]:
    return {**os.environ, "PEFT_LORAN_COMPILE": MODES[method]} if method in MODES else None


def measure_group(cases: list[Case], on_result) -> None:
    """Run ``cases`` (one method) in one fresh interpreter; ``on_result(case, results_or_error)`` as each finishes."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-group", json.dumps([asdict(c) for c in cases])]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_child_env(cases[0].method)) as child:
        for line in child.stdout:
            if line.startswith("{"):
                entry = json.loads(line)
                on_result(Case(**entry["case"]), entry.get("results") or {"error": entry["error"]})
    if child.returncode != 0:
        raise RuntimeError(f"benchmark child for {cases[0].method} ended with exit code {child.returncode}")


def measure(case: Case) -> dict:
    """Run one case in a fresh interpreter and return its measurements."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(asdict(case))]
    env = _child_env(case.method)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child failed for {case}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(base: Case, repeats: int = 1, methods: tuple = METHODS) -> dict:
    """LoRA, naive LoRAN and ours on the same shape, one process after the other; ratios against LoRA / the base
    model. With ``repeats`` > 1 the sequence runs that many times, its order rotated each time, and each figure is
    the median over the repeats (every single measurement is kept under ``"runs"``): on a noisy machine one process
    per method can land in a slow minute."""
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for rep in range(repeats):
        for method in methods[rep % len(methods):] + methods[: rep % len(methods)]:
            runs[method].append(measure(Case(**{**asdict(base), "method": method})))
            print(f"  {method:6s} {json.dumps(runs[method][-1])}", file=sys.stderr, flush=True)
    if repeats == 1:
        return {method: r[0] for method, r in runs.items()}
    return {method: {**{key: statistics.median(run[key] for run in r) for key in r[0]}, "runs": r}
            for method, r in runs.items()}


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and a == a else "n/a"  # a != a: not measured (NaN)


def table(results: list[tuple[Case, dict]]) -> str:
    head = ("| hidden | layers | tokens | r | targets | dropout | step LoRA (s) | step naive / LoRA | step ours / LoRA | "
            "step ours, eager kernels / LoRA | mem LoRA (MB) | mem naive / LoRA | mem ours / LoRA | "
            "eval ours / base | eval LoRA / base | eval naive / base | gen tok/s ours / LoRA |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case, rows in results:
        lora, ours = rows["lora"], rows["loran"]
        naive = rows.get("naive", {"train_step_s": float("nan"), "train_mem_mb": float("nan"), "eval_s": float("nan"),
                                   "base_eval_s": 1.0})
        eager = rows.get("loran_eager")  # absent from runs made before the compiled kernels
        lines.append(
            f"| {case.hidden} | {case.layers} | {case.tokens} | {case.rank} | {case.targets} | {case.dropout} | "
            f"{lora['train_step_s']:.3f} | {fmt_ratio(naive['train_step_s'], lora['train_step_s'])} | "
            f"{fmt_ratio(ours['train_step_s'], lora['train_step_s'])} | "
            f"{fmt_ratio(eager['train_step_s'], lora['train_step_s']) if eager else 'n/a'} | "
            f"{lora['train_mem_mb']:.0f} | {fmt_ratio(naive['train_mem_mb'], lora['train_mem_mb'])} | "
            f"{fmt_ratio(ours['train_mem_mb'], lora['train_mem_mb'])} | "
            f"{fmt_ratio(ours['eval_s'], ours['base_eval_s'])} | {fmt_ratio(lora['eval_s'], lora['base_eval_s'])} | "
            f"{fmt_ratio(naive['eval_s'], naive['base_eval_s'])} | {fmt_ratio(ours['gen_tok_s'], lora['gen_tok_s'])} |"
        )
    return "\n".join(lines)


def warmup_table(results: list[tuple[Case, dict]]) -> str:
    """Ours' one-time cost (compiling the kernels on an 8-token forward and backward), not in the ratios."""
    lines = ["| hidden | tokens | r | targets | dropout | first 8-token step, ours (s) | its peak RSS above the model (MB) |",
             "|---|---|---|---|---|---|---|"]
    for case, rows in results:
        ours = rows["loran"]
        if "warmup_s" in ours:
            lines.append(f"| {case.hidden} | {case.tokens} | {case.rank} | {case.targets} | {case.dropout} | "
                         f"{ours['warmup_s']:.1f} | {ours['warmup_mem_mb']:.0f} |")
    return "\n".join(lines)


def render(name: str, results: list[tuple[Case, dict]]) -> str:
    if name in ("layers", "generation", "paper-scan"):
        return {"layers": layer_table, "generation": generation_table, "paper-scan": scan_table}[name](results)
    if name == "paper":
        return f"{paper_table(results)}\n\nOne-time costs:\n\n{warmup_table(results)}"
    if not any("warmup_s" in row for _, rows in results for row in rows.values()):
        return table(results)
    return f"{table(results)}\n\nOne-time costs:\n\n{warmup_table(results)}"


def gemm_flops(case: Case, method: str) -> float:
    """Multiply-add work (FLOPs) of one training step's matrix products: every base linear layer forward and its
    input gradient (weights frozen), attention (scores and values, forward and backward), the LM head; plus the
    adapters. LoRA: its two thin products, forward and backward. LoRAN (ours): per adapted layer one dense
    ``dD = G^T x``, four ``out x in x r`` products (``B A`` in forward and again in backward, ``dB``, ``dA``), and with
    dropout two dense products more (``x_d D^T`` in forward, ``G D`` in backward). Element-wise work is not counted:
    this is the floor that the step-time ratio is compared with."""
    n, h = case.tokens * case.batch, case.hidden
    inter = case.intermediate or int(h * 2.75) // 64 * 64
    kv = h  # num_key_value_heads == heads in these models
    linear = 2 * h * h + 2 * kv * h + 3 * h * inter  # q, o (h x h), k, v (kv x h), gate, up, down
    per_layer = 2 * n * linear * 2 + 4 * n * n * h * 3  # forward + input gradient; attention forward + 2x backward
    total = case.layers * per_layer + 2 * n * h * case.vocab * 2
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h),
              "up_proj": (inter, h), "down_proj": (h, inter)}
    extra = 0.0
    for name in TARGETS[case.targets]:
        out_f, in_f = shapes[name]
        if method == "lora":
            extra += 3 * 2 * n * case.rank * (in_f + out_f)
        else:
            extra += 2 * n * out_f * in_f + 4 * 2 * out_f * in_f * case.rank
            extra += 2 * 2 * n * out_f * in_f if case.dropout else 0
    return case.layers * extra + total


def floor_ratio(case: Case) -> float:
    return gemm_flops(case, "loran") / gemm_flops(case, "lora")


def paper_table(results: list[tuple[Case, dict]]) -> str:
    lines = ["| layers | tokens | r | targets | dropout | step LoRA (s) | step ours (s) | ours / LoRA | floor (GEMMs) | "
             "naive / LoRA | mem LoRA (MB) | mem ours / LoRA | mem naive / LoRA | eval ours / base | "
             "eval LoRA / base | gen tok/s ours / LoRA |", "|" + "---|" * 16]
    for case, rows in results:
        lora, ours, naive = rows["lora"], rows["loran"], rows.get("naive")
        lines.append(
            f"| {case.layers} | {case.tokens} | {case.rank} | {case.targets} | {case.dropout} | "
            f"{lora['train_step_s']:.2f} | {ours['train_step_s']:.2f} | "
            f"{fmt_ratio(ours['train_step_s'], lora['train_step_s'])} | {floor_ratio(case):.2f}x | "
            f"{fmt_ratio(naive['train_step_s'], lora['train_step_s']) if naive else 'n/a'} | "
            f"{lora['train_mem_mb']:.0f} | {fmt_ratio(ours['train_mem_mb'], lora['train_mem_mb'])} | "
            f"{fmt_ratio(naive['train_mem_mb'], lora['train_mem_mb']) if naive else 'n/a'} | "
            f"{fmt_ratio(ours['eval_s'], ours['base_eval_s'])} | {fmt_ratio(lora['eval_s'], lora['base_eval_s'])} | "
            f"{fmt_ratio(ours['gen_tok_s'], lora['gen_tok_s'])} |")
    return "\n".join(lines)


def scan_table(results: list[tuple[Case, dict]]) -> str:
    lines = ["| tokens | r | dropout | step LoRA (s) | step ours (s) | ours / LoRA | floor (GEMMs) | above the floor |",
             "|---|---|---|---|---|---|---|---|"]
    for case, rows in results:
        lora, ours = rows["lora"]["train_step_s"], rows["loran"]["train_step_s"]
        lines.append(f"| {case.tokens} | {case.rank} | {case.dropout} | {lora:.2f} | {ours:.2f} | "
                     f"{fmt_ratio(ours, lora)} | {floor_ratio(case):.2f}x | {ours / lora - floor_ratio(case):+.2f} |")
    return "\n".join(lines)


def layer_table(results: list[tuple[Case, dict]]) -> str:
    lines = ["| layers | trainable params | mem LoRA (MB) | mem naive (MB) | mem ours (MB) | naive - LoRA (MB) | "
             "ours - LoRA (MB) |", "|---|---|---|---|---|---|---|"]
    for case, rows in results:
        lora, naive, ours = (rows[m]["train_mem_mb"] for m in ("lora", "naive", "loran"))
        lines.append(f"| {case.layers} | {rows['loran']['trainable_params']:,} | {lora:.0f} | {naive:.0f} | {ours:.0f} | "
                     f"{naive - lora:+.0f} | {ours - lora:+.0f} |")
    return "\n".join(lines)


def generation_table(results: list[tuple[Case, dict]]) -> str:
    lines = ["| hidden | layers | targets | new tokens | base tok/s | LoRA tok/s | ours tok/s | ours / LoRA | "
             "LoRA / its base | ours / its base |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, rows in results:
        lora, ours = rows["lora"], rows["loran"]
        lines.append(f"| {case.hidden} | {case.layers} | {case.targets} | {case.gen_tokens} | "
                     f"{ours['base_gen_tok_s']:.1f} | {lora['gen_tok_s']:.1f} | {ours['gen_tok_s']:.1f} | "
                     f"{fmt_ratio(ours['gen_tok_s'], lora['gen_tok_s'])} | "
                     f"{fmt_ratio(lora['gen_tok_s'], lora['base_gen_tok_s'])} | "
                     f"{fmt_ratio(ours['gen_tok_s'], ours['base_gen_tok_s'])} |")
    return "\n".join(lines)


def presets(name: str, device: str, dtype: str) -> dict[str, list[Case]]:
    common = dict(method="", device=device, dtype=dtype)
    headline = [Case(**common, targets=t) for t in ("qv", "all")]
    headline += [Case(**common, targets=t, dropout=0.05) for t in ("qv", "all")]
    grid = [Case(**common, hidden=h, layers=4, tokens=n, rank=r, targets=t)
            for h in (512, 1024) for n in (128, 512) for r in (8, 64) for t in ("qv", "all")]
    layers = [Case(**common, hidden=512, layers=n, tokens=128, targets="all") for n in (2, 4, 8)]
    if device == "cuda":  # a realistic width where a GPU is available
        headline += [Case(**common, hidden=4096, layers=4, tokens=512, targets=t, steps=5) for t in ("qv", "all")]
    generation = [Case(**common, targets=t, steps=1, gen_tokens=64, gen_repeats=5) for t in ("qv", "all")]
    targets = headline[:2]  # the target configurations only (dropout 0), e.g. for --repeats
    # the paper's recipe (r = 64, alpha 16, q/v) on Llama-2-7B's layer shapes: hidden 4096, intermediate 11008,
    # 32 heads; 2 layers and a 1000-word vocabulary keep it within a CPU's memory and patience
    seven_b = dict(common, hidden=4096, intermediate=11008, heads=32, vocab=1000, alpha=16.0, targets="qv")
    paper = [Case(**seven_b, layers=2, tokens=512, rank=64, dropout=d, steps=3, gen_tokens=8) for d in (0.0, 0.2)]
    scan = [Case(**seven_b, layers=1, tokens=n, rank=r, steps=1, evaluate=False)
            for n in (256, 1024, 2048, 4096) for r in (8, 16, 64)]
    chosen = {"headline": headline, "targets": targets, "grid": grid, "layers": layers, "generation": generation,
              "paper": paper, "paper-scan": scan}
    if name == "all":  # "targets" is a subset of "headline"; the paper's shapes take long: run them by name
        return {key: cases for key, cases in chosen.items() if key not in ("targets", "paper", "paper-scan")}
    return {name: chosen[name]}


#: the methods each preset measures (the paper's shapes: the naive yardstick once, without dropout)
PRESET_METHODS = {"paper": ("lora", "loran", "naive"), "paper-scan": ("lora", "loran")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="headline",
                        choices=["headline", "targets", "grid", "layers", "generation", "paper", "paper-scan", "all",
                                 "realistic"])
    parser.add_argument("--tiny", action="store_true",
                        help="with --preset realistic: the same cases at toy sizes (a dry run of the code on a CPU)")
    parser.add_argument("--quants", default="none,nf4", help="with --preset realistic: bases to run (none, nf4)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="write the markdown tables here (atomically)")
    parser.add_argument("--json", help="also write raw measurements here")
    parser.add_argument("--from-json", help="re-render the tables from a --json file instead of measuring")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each method's process this many times (rotating order) and report medians")
    parser.add_argument("--steps", type=int, help="timed training steps per process (default: the preset's; a GPU "
                        "step takes milliseconds, so use more there)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: the preset's)")
    parser.add_argument("--no-generation", action="store_true",
                        help="skip the generation timing (minutes per process on 2 CPU cores); the eval forward stays")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-group", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(Case(**json.loads(args.child)))))
        return
    if args.child_group:
        run_child_group([Case(**c) for c in json.loads(args.child_group)])
        return
    if args.preset == "realistic":
        run_realistic(args)
        return
    if args.from_json:
        with open(args.from_json) as fh:
            raw = json.load(fh)
        for name, entries in raw.items():
            if name == "meta":
                continue
            results = [(Case(**e["case"]), e["results"]) for e in entries]
            print(f"### {name}\n\n{render(name, results)}\n")
        return

    sections, raw = [], {}
    started = time.time()
    for name, cases in presets(args.preset, args.device, args.dtype).items():
        results = []
        for case in cases:
            if args.steps:
                case = replace(case, steps=args.steps)
            if args.no_generation:
                case = replace(case, gen_repeats=0)
            print(f"[{name}] {case}", file=sys.stderr, flush=True)
            methods = PRESET_METHODS.get(name, METHODS)
            if name == "paper" and case.dropout:
                methods = ("lora", "loran")
            if args.methods:
                methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
            results.append((case, compare(case, args.repeats, methods)))
        raw[name] = [{"case": asdict(c), "results": r} for c, r in results]
        sections.append((name, render(name, results)))

    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    cmd = "python benchmarks/bench.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    text = [f"Command: `{cmd}`  ", f"Machine: {machine}; device {args.device}, dtype {args.dtype}; "
            f"{time.strftime('%Y-%m-%d')}; wall time {time.time() - started:.0f} s", ""]
    for name, body in sections:
        text += [f"### {name}", "", body, ""]
    report = "\n".join(text)
    print(report)
    if args.out:
        write_text(args.out, report)
    if args.json:
        write_json(args.json, {**raw, "meta": run_meta(args.device)})


def write_text(path: str, text: str) -> None:
    """The whole file or none, for every benchmark's output (the library's temporary file and rename; imported here:
    peft_loran imports torch)."""
    from peft_loran.atomic import write_text_atomic

    write_text_atomic(path, text)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


def run_meta(device: str) -> dict:
    """Where and with what a run was measured: machine, GPU, torch and CUDA versions, the library versions, the
    commit."""
    import torch
    import transformers
    import peft

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=False, cwd=os.path.dirname(os.path.abspath(__file__))).stdout)
    except OSError:
        commit, dirty = "", False
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "commit": commit + ("+uncommitted changes" if dirty else ""),
            "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:])}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


# ------------------------------------------------------------------------------------------------ realistic
#: The realistic preset: 8 Llama-2-7B-shaped decoder layers, 4 x 1024 tokens, bfloat16; (a) the paper's recipe, (b)
#: all seven projections at r = 16 with a common QLoRA dropout; each on a bf16 and an NF4 base.
REALISTIC_RECIPES = {
    "paper (q/v, r 64, dropout 0.2)": dict(targets="qv", rank=64, alpha=16.0, dropout=0.2),
    "all seven (r 16, dropout 0.05)": dict(targets="all", rank=16, alpha=32.0, dropout=0.05),
}
REALISTIC_METHODS = ("lora", "loran", "naive")


def realistic_cases(device: str, dtype: str, tiny: bool, quants: list[str]) -> list[Case]:
    shape = (dict(hidden=256, intermediate=768, heads=4, layers=2, vocab=512, batch=2, tokens=64, steps=2,
                  gen_tokens=4, gen_repeats=1) if tiny else
             dict(hidden=4096, intermediate=11008, heads=32, layers=8, vocab=32000, batch=4, tokens=1024, steps=5,
                  gen_tokens=32, gen_repeats=2))
    return [Case(method="", device=device, dtype=dtype, quant="" if q == "none" else q, **shape, **recipe)
            for q in quants for recipe in REALISTIC_RECIPES.values()]


def run_realistic(args) -> None:
    """Each method in one fresh process that runs every case; the JSON (and the table) rewritten after each case."""
    cases = realistic_cases(args.device, args.dtype, args.tiny, [q.strip() for q in args.quants.split(",")])
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else REALISTIC_METHODS
    key = lambda c: json.dumps({k: v for k, v in asdict(c).items() if k != "method"}, sort_keys=True)  # noqa: E731
    rows: dict[str, dict] = {key(c): {"case": asdict(c), "results": {}} for c in cases}
    meta = run_meta(args.device)
    started = time.time()

    def record(case: Case, result: dict) -> None:
        rows[key(case)]["results"][case.method] = result
        print(f"  {case.method:6s} {case.targets} {case.quant or 'bf16'}: {json.dumps(result)}", file=sys.stderr,
              flush=True)
        meta["wall_s"] = round(time.time() - started)
        if args.json:
            write_json(args.json, {"realistic": list(rows.values()), "meta": meta})
        if args.out:
            write_text(args.out, realistic_table(list(rows.values()), meta))

    for method in methods:
        measure_group([replace(c, method=method) for c in cases], record)
    print(realistic_table(list(rows.values()), meta))
    failed = [f"{m} {r['case']['targets']} {r['case']['quant'] or 'bf16'}" for r in rows.values()
              for m, result in r["results"].items() if "error" in result]
    if failed:
        sys.exit(f"{len(failed)} case(s) failed: {', '.join(failed)}")


def realistic_table(rows: list[dict], meta: dict) -> str:
    lines = [f"Command: `{meta['command']}`  ", f"Measured: {meta['date']}, {meta.get('gpu') or meta['machine']}, "
             f"torch {meta['torch']} (CUDA {meta['cuda']}), commit {meta['commit'][:12] or 'unknown'}", "",
             "| targets | base | step LoRA (s) | ours / LoRA | naive / LoRA | peak alloc LoRA (MB) | ours / LoRA | "
             "naive / LoRA | eval ours / LoRA | gen tok/s LoRA | ours / LoRA (cache off) | ours / LoRA (cache on) | "
             "compile, first step (s) |", "|" + "---|" * 13]

    def ratio(result, other, key):
        if not result or not other or key not in result or key not in other or not other[key]:
            return "n/a"
        return f"{result[key] / other[key]:.2f}x"

    for row in rows:
        case, res = row["case"], row["results"]
        lora, ours, naive = res.get("lora", {}), res.get("loran", {}), res.get("naive", {})
        mem = "train_peak_alloc_mb" if "train_peak_alloc_mb" in lora else "train_mem_mb"
        gen = ours.get("gen_cached_tok_s")  # with the eval cache on, against LoRA's
        lines.append(
            f"| {case['targets']} r {case['rank']} | {case['quant'] or case['dtype']} | "
            f"{lora.get('train_step_s', float('nan')):.3f} | {ratio(ours, lora, 'train_step_s')} | "
            f"{ratio(naive, lora, 'train_step_s')} | {lora.get(mem, float('nan')):.0f} | {ratio(ours, lora, mem)} | "
            f"{ratio(naive, lora, mem)} | {ratio(ours, lora, 'eval_s')} | {lora.get('gen_tok_s', float('nan')):.1f} | "
            f"{ratio(ours, lora, 'gen_tok_s')} | "
            f"{ratio({'gen_tok_s': gen}, lora, 'gen_tok_s') if gen else 'n/a'} | "
            f"{ours.get('warmup_s', float('nan')):.1f} |")
        errors = [f"{m}: {r['error']}" for m, r in res.items() if "error" in r]
        if errors:
            lines.append(f"| (errors) | {'; '.join(errors)[:300]} |" + " |" * 11)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
