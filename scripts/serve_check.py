"""Serving a LoRAN adapter's LoRA export on the engines users deploy on, checked token for token.

Run by ``scripts/serve_check.sh`` (which builds the serving environment and calls the steps in order); each step
writes one JSON file into the work folder, and ``report`` gathers them:

    prepare      (project venv) data built here, two LoRAN adapters trained with the command line on the bundled
                 SmolLM2, exported with ``--to-lora`` and ``--merge``; the greedy tokens of plain PEFT on each
                 export, of the LoRAN adapters themselves, of the merged export and of the base model
    vllm         (serving venv) vLLM's offline engine with both exports as LoRA adapters (and the merged model),
                 then its OpenAI-compatible server on 127.0.0.1 selecting the adapter per request
    llamacpp     (serving venv) the export converted to a GGUF LoRA with llama.cpp's own script, run on the bundled
                 Q4_1 GGUF with llama-cpp-python, with and without the adapter
    report       the agreement and tokens/s table (results/serve/, docs/deploy.md)

Every engine gets the same prompt token ids (the command line's own prompt, tokenized once by the model's
tokenizer) and decodes greedily for at most ``NEW_TOKENS`` tokens; sequences are compared up to the end-of-text
token. ``check_server_args`` is the launcher's check of what it is asked to serve (one ``error:`` line that says
what to change), tested without vLLM in tests/test_serve_check.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

NEW_TOKENS = 16
PROMPTS = 12
MAX_LORA_RANK = 8
#: The two tasks the adapters learn from the same standard-library docstrings: a function's name, and its module.
TASKS = {"name": "function", "module": "module"}
MODULES = ("string", "os.path", "json", "re", "math", "itertools", "functools", "collections", "textwrap", "shutil",
           "statistics", "random", "heapq", "bisect", "fnmatch", "glob", "difflib", "base64", "html", "calendar")


class ServeError(Exception):
    """A problem with what the launcher was asked to serve: reported as one ``error:`` line."""


# ------------------------------------------------------------------------------------------------ launcher check
def check_server_args(base: str, adapters: dict[str, str], max_lora_rank: int, host: str) -> None:
    """What vLLM would otherwise report deep in a traceback (or not at all), as one line that says what to change:
    the server must listen on 127.0.0.1 only; every adapter folder must hold a PEFT LoRA adapter whose rank fits
    ``--max-lora-rank``; the base folder must hold a tokenizer."""
    if host != "127.0.0.1":
        raise ServeError(f"--host {host}: this check serves on 127.0.0.1 only; leave --host out")
    base_dir = Path(base)
    if not (base_dir / "config.json").exists():
        raise ServeError(f"--model {base}: no config.json there; pass the base model's folder")
    if not any((base_dir / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ServeError(f"--model {base}: the base folder has no tokenizer (tokenizer.json); copy the tokenizer "
                         "files of the model into it, or pass --tokenizer FOLDER")
    for name, path in adapters.items():
        config_path = Path(path) / "adapter_config.json"
        if not config_path.exists():
            raise ServeError(f"--lora-modules {name}={path}: no adapter_config.json there; pass the folder that "
                             "`peft-loran export --to-lora` wrote")
        config = json.loads(config_path.read_text())
        if config.get("peft_type") != "LORA":
            raise ServeError(f"--lora-modules {name}={path}: a {config.get('peft_type')} adapter; vLLM serves LoRA "
                             "adapters: export it with `peft-loran export ADAPTER --to-lora RANK`")
        ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
        if max(ranks) > max_lora_rank:
            raise ServeError(f"--lora-modules {name}={path}: rank {max(ranks)} is above --max-lora-rank "
                             f"{max_lora_rank}; start the server with --max-lora-rank {max(ranks)} or export a lower "
                             "rank")


# ------------------------------------------------------------------------------------------------------ prepare
def docstring_rows() -> list[dict]:
    """(summary, function, module) for the documented functions of some standard-library modules."""
    import importlib

    rows = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
                continue
            doc = inspect.getdoc(obj)
            summary = " ".join((doc or "").split("\n\n")[0].split())
            if len(summary) >= 20:
                rows.append({"summary": summary[:300], "function": name, "module": module_name})
    unique = {r["summary"]: r for r in rows}  # one row per summary: no example twice across the split
    rows = sorted(unique.values(), key=lambda r: (r["module"], r["function"]))
    random.Random(0).shuffle(rows)
    return rows


def cli(*args: str, quiet: bool = True) -> None:
    command = [os.path.join(os.path.dirname(sys.executable), "peft-loran"), *args] + (["--quiet"] if quiet else [])
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def greedy(model, prompts: list[list[int]], eos: int) -> tuple[list[list[int]], float]:
    """Greedy new tokens per prompt (up to and without the end-of-text token), and tokens/s of a second pass that
    generates exactly ``NEW_TOKENS`` per prompt (so that speed does not depend on where each answer ends); one
    prompt at a time."""
    import torch

    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=eos)[0, len(ids):].tolist()
            outs.append(until_eos(y, eos))
        started = time.perf_counter()
        for ids in prompts:
            x = torch.tensor([ids])
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
    return outs, NEW_TOKENS * len(prompts) / (time.perf_counter() - started)


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def prepare(work: Path) -> None:
    import peft_loran  # noqa: F401  (first: LoRAN adapters load through PEFT; it quiets a bitsandbytes notice)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft_loran_cli.data import Example
    from peft_loran_cli.encoding import prompt_text
    from peft_loran_cli.models import resolve_model

    torch.manual_seed(0)
    rows = docstring_rows()
    held, train = rows[:PROMPTS], rows[PROMPTS:]
    base = resolve_model("smollm2")
    for task, field in TASKS.items():
        for part, data in (("train", train), ("held", held)):
            (work / f"{task}-{part}.jsonl").write_text("".join(json.dumps({"summary": r["summary"],
                                                                            "target": r[field]}) + "\n"
                                                                for r in data))
        out = work / f"run-{task}"
        cli("train", "--method", "loran", "--model", "smollm2", "--train-file", str(work / f"{task}-train.jsonl"),
            "--eval-file", str(work / f"{task}-held.jsonl"), "--task-type", "generate", "--source-field", "summary",
            "--target-field", "target", "--steps", "120", "--batch-size", "8", "--lr", "3e-3", "--rank",
            str(MAX_LORA_RANK), "--max-length", "96", "--output-dir", str(out), "--overwrite")
        cli("export", str(out / "adapter"), "--to-lora", str(MAX_LORA_RANK), "--output-dir", str(work / f"lora-{task}"),
            "--overwrite")
        cli("export", str(out / "adapter"), "--merge", "--output-dir", str(work / f"merged-{task}"), "--overwrite")
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [tokenizer(prompt_text(Example(r["summary"]), tokenizer, 96 - 24), add_special_tokens=False)["input_ids"]
               for r in held]
    eos = tokenizer.eos_token_id
    reference: dict = {"base_model": base, "eos": eos, "prompts": prompts, "new_tokens": NEW_TOKENS,
                       "held": held, "outputs": {}, "tokens_per_s": {}}

    def record(name: str, model) -> None:
        outs, speed = greedy(model.eval(), prompts, eos)
        reference["outputs"][name], reference["tokens_per_s"][name] = outs, speed
        print(f"{name}: {speed:.1f} tokens/s; first: {tokenizer.decode(outs[0])!r}", flush=True)

    record("base", AutoModelForCausalLM.from_pretrained(base))
    for task in TASKS:
        record(f"loran-{task}", PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                          str(work / f"run-{task}" / "adapter")))
        # plain PEFT on the export, in a process that never imports peft_loran (as a user's serving stack)
        script = f"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from serve_check import greedy
ref = json.load(open({str(work / 'reference-partial.json')!r}))
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref["base_model"]), {str(work / f'lora-{task}')!r})
outs, speed = greedy(model.eval(), ref["prompts"], ref["eos"])
assert "peft_loran" not in sys.modules
print(json.dumps({{"outputs": outs, "tokens_per_s": speed}}))
"""
        (work / "reference-partial.json").write_text(json.dumps(reference))
        result = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
        reference["outputs"][f"peft-lora-{task}"] = result["outputs"]
        reference["tokens_per_s"][f"peft-lora-{task}"] = result["tokens_per_s"]
        record(f"merged-{task}", AutoModelForCausalLM.from_pretrained(work / f"merged-{task}"))
    (work / "reference.json").write_text(json.dumps(reference, indent=1))


# --------------------------------------------------------------------------------------------------------- vLLM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_offline(work: Path, ref: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    fixed = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)  # the speed pass
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ref["prompts"]]
    result: dict = {"outputs": {}, "tokens_per_s": {}}

    def run(llm, name: str, lora=None) -> None:
        llm.generate(prompts[:1], params, lora_request=lora, use_tqdm=False)  # warm-up
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        result["outputs"][name] = [until_eos(list(o.outputs[0].token_ids), ref["eos"]) for o in outs]
        started = time.perf_counter()
        for prompt in prompts:  # one request at a time, as the other engines are measured
            llm.generate([prompt], fixed, lora_request=lora, use_tqdm=False)
        result["tokens_per_s"][name] = NEW_TOKENS * len(prompts) / (time.perf_counter() - started)
        print(f"vllm offline {name}: {result['tokens_per_s'][name]:.1f} tokens/s", flush=True)

    engine = dict(dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    llm = LLM(model=ref["base_model"], enable_lora=True, max_lora_rank=MAX_LORA_RANK, max_loras=2, **engine)
    run(llm, "base")
    for i, task in enumerate(TASKS, 1):
        run(llm, f"lora-{task}", LoRARequest(task, i, str(work / f"lora-{task}")))
    # both adapters interleaved in one batch: each prompt its own adapter
    mixed = [LoRARequest(task, i, str(work / f"lora-{task}")) for i, task in enumerate(TASKS, 1)]
    requests = [mixed[k % 2] for k in range(len(prompts))]
    outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    result["mixed_batch"] = {"adapters": [r.lora_name for r in requests],
                             "outputs": [until_eos(list(o.outputs[0].token_ids), ref["eos"]) for o in outs]}
    del llm
    import gc

    gc.collect()
    merged = LLM(model=str(work / "merged-name"), tokenizer=ref["base_model"], **engine)
    run(merged, "merged-name")
    del merged
    gc.collect()
    return result


def vllm_server(work: Path, ref: dict) -> dict:
    adapters = {task: str(work / f"lora-{task}") for task in TASKS}
    check_server_args(ref["base_model"], adapters, MAX_LORA_RANK, "127.0.0.1")
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ref["base_model"],
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "256", "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "2",
               "--lora-modules", *(f"{k}={v}" for k, v in adapters.items()), "--seed", "0"]
    log = open(work / "vllm-server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + float(os.environ.get("VLLM_START_TIMEOUT", "600"))
        while True:
            if server.poll() is not None:
                raise ServeError(f"the vLLM server exited with code {server.returncode}; see {work / 'vllm-server.log'}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                    served = [m["id"] for m in json.load(response)["data"]]
                break
            except OSError:
                if time.time() > deadline:
                    raise ServeError("the vLLM server did not answer within VLLM_START_TIMEOUT seconds") from None
                time.sleep(2)
        result: dict = {"served_models": served, "outputs": {}, "tokens_per_s": {}, "order": []}
        rng = random.Random(1)
        order = [(model, k) for model in ["base", *TASKS] for k in range(len(ref["prompts"]))]
        rng.shuffle(order)  # requests alternate between the adapters in a random order
        def complete(model: str, k: int, **extra) -> list[int]:
            body = {"model": ref["base_model"] if model == "base" else model, "prompt": ref["prompts"][k],
                    "max_tokens": NEW_TOKENS, "temperature": 0.0, "logprobs": 1, "return_tokens_as_token_ids": True,
                    **extra}
            request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                choice = json.load(response)["choices"][0]
            return [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]

        outputs: dict[str, dict[int, list[int]]] = {}
        for model, k in order:
            outputs.setdefault(model, {})[k] = until_eos(complete(model, k), ref["eos"])
            result["order"].append(model)
        for model in outputs:
            name = "base" if model == "base" else f"lora-{model}"
            result["outputs"][name] = [outputs[model][k] for k in range(len(ref["prompts"]))]
            started = time.perf_counter()  # the speed pass: exactly NEW_TOKENS per request, one at a time
            for k in range(len(ref["prompts"])):
                complete(model, k, ignore_eos=True)
            result["tokens_per_s"][name] = NEW_TOKENS * len(ref["prompts"]) / (time.perf_counter() - started)
        return result
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


def vllm(work: Path) -> None:
    ref = json.loads((work / "reference.json").read_text())
    import vllm as vllm_package

    result = {"version": vllm_package.__version__, "offline": vllm_offline(work, ref), "server": vllm_server(work, ref)}
    (work / "vllm.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------------- llama.cpp
def llamacpp(work: Path, gguf_base: str, convert_script: str) -> None:
    import llama_cpp

    ref = json.loads((work / "reference.json").read_text())
    result: dict = {"version": llama_cpp.__version__, "base_gguf": gguf_base, "outputs": {}, "tokens_per_s": {}}
    for task in TASKS:
        out = work / f"lora-{task}.gguf"
        subprocess.run([sys.executable, convert_script, str(work / f"lora-{task}"), "--base", ref["base_model"],
                        "--outfile", str(out), "--outtype", "f32"], check=True, capture_output=True, text=True)
    # llama-cpp-python 0.3.36 built here crashed (segmentation fault) decoding a prompt of more than one token at a
    # time on this machine's Xeon (AVX-512 BF16, AMX); one token per batch runs, and decoding is one token a step
    # anyway. LLAMA_N_BATCH sets another batch where the build does not crash.
    batch = int(os.environ.get("LLAMA_N_BATCH", "1"))
    result["n_batch"] = batch
    for name, lora in [("base", None), *((f"lora-{t}", str(work / f"lora-{t}.gguf")) for t in TASKS)]:
        llm = llama_cpp.Llama(model_path=gguf_base, lora_path=lora, n_ctx=256, n_threads=2, n_batch=batch,
                              n_ubatch=batch, verbose=False)

        def generate(ids: list[int], stop_at_eos: bool) -> list[int]:
            llm.reset()
            tokens = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                if (stop_at_eos and token == llm.token_eos()) or len(tokens) >= NEW_TOKENS:
                    break
                tokens.append(token)
            return tokens

        result["outputs"][name] = [until_eos(generate(ids, True), ref["eos"]) for ids in ref["prompts"]]
        started = time.perf_counter()
        for ids in ref["prompts"]:
            generate(ids, False)
        result["tokens_per_s"][name] = NEW_TOKENS * len(ref["prompts"]) / (time.perf_counter() - started)
        print(f"llama.cpp {name}: {result['tokens_per_s'][name]:.1f} tokens/s", flush=True)
        del llm
    (work / "llamacpp.json").write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------------------------- report
def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """(prompts whose whole greedy sequence is identical, share of positions that agree before the first
    difference, over all prompts)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n / max(len(x), len(y), 1))
    return same, sum(prefix) / len(prefix)


def report(work: Path, results: Path) -> None:
    ref = json.loads((work / "reference.json").read_text())
    out = ref["outputs"]
    n = len(ref["prompts"])
    rows = []

    def row(engine, what, got, against, against_name, speed, speed_of=None):
        same, prefix = agreement(got, against)
        rows.append({"engine": engine, "what": what, "against": against_name, "identical": f"{same}/{n}",
                     "prefix_agreement": round(prefix, 3), "tokens_per_s": round(speed, 1),
                     "tokens_per_s_without_adapter": None if speed_of is None else round(speed_of, 1)})

    for task in TASKS:
        row("PEFT (transformers)", f"LoRA export ({task})", out[f"peft-lora-{task}"], out[f"loran-{task}"],
            "the LoRAN adapter", ref["tokens_per_s"][f"peft-lora-{task}"], ref["tokens_per_s"]["base"])
        row("transformers", f"merged export ({task})", out[f"merged-{task}"], out[f"loran-{task}"],
            "the LoRAN adapter", ref["tokens_per_s"][f"merged-{task}"], ref["tokens_per_s"]["base"])
    summary = {"reference": {k: v for k, v in ref.items() if k in ("base_model", "new_tokens", "tokens_per_s")},
               "rows": rows}
    if (work / "vllm.json").exists():
        v = json.loads((work / "vllm.json").read_text())
        for mode in ("offline", "server"):
            got = v[mode]
            for task in TASKS:
                name = f"lora-{task}"
                if name not in got["outputs"]:
                    continue
                row(f"vLLM {v['version']} {mode}", f"LoRA export ({task})", got["outputs"][name],
                    out[f"peft-lora-{task}"], "PEFT on the export", got["tokens_per_s"][name],
                    got["tokens_per_s"].get("base"))
                row(f"vLLM {v['version']} {mode}", f"LoRA export ({task})", got["outputs"][name], out[f"loran-{task}"],
                    "the LoRAN adapter", got["tokens_per_s"][name], got["tokens_per_s"].get("base"))
            if "base" in got["outputs"]:
                row(f"vLLM {v['version']} {mode}", "base model, no adapter", got["outputs"]["base"], out["base"],
                    "transformers", got["tokens_per_s"]["base"])
        if "merged-name" in v["offline"]["outputs"]:
            row(f"vLLM {v['version']} offline", "merged export (name)", v["offline"]["outputs"]["merged-name"],
                out["loran-name"], "the LoRAN adapter", v["offline"]["tokens_per_s"]["merged-name"],
                v["offline"]["tokens_per_s"].get("base"))
        mixed = v["offline"].get("mixed_batch")
        if mixed:
            right = sum(o == out[f"peft-lora-{a}"][k] for k, (a, o) in enumerate(zip(mixed["adapters"],
                                                                                   mixed["outputs"])))
            summary["vllm_mixed_batch_correct"] = f"{right}/{n}"
        server = v["server"]
        picks = [(task, k) for task in TASKS for k in range(n)]
        right = sum(server["outputs"][f"lora-{task}"][k] == out[f"peft-lora-{task}"][k] for task, k in picks)
        other = {"name": "module", "module": "name"}
        wrong_adapter = sum(server["outputs"][f"lora-{task}"][k] == out[f"peft-lora-{other[task]}"][k]
                            and out[f"peft-lora-{task}"][k] != out[f"peft-lora-{other[task]}"][k] for task, k in picks)
        summary["vllm_server_per_request_selection"] = {"requests": len(picks), "matching_their_adapter": right,
                                                        "matching_the_other_adapter": wrong_adapter,
                                                        "served_models": server["served_models"]}
    if (work / "llamacpp.json").exists():
        c = json.loads((work / "llamacpp.json").read_text())
        engine = f"llama.cpp (llama-cpp-python {c['version']}), Q4_1 base"
        row(engine, "base model, no adapter", c["outputs"]["base"], out["base"], "float transformers",
            c["tokens_per_s"]["base"])
        for task in TASKS:
            row(engine, f"GGUF LoRA ({task})", c["outputs"][f"lora-{task}"], out[f"peft-lora-{task}"],
                "float PEFT on the export", c["tokens_per_s"][f"lora-{task}"], c["tokens_per_s"]["base"])
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve-check.json").write_text(json.dumps(summary, indent=1) + "\n")
    for raw in ("reference", "vllm", "llamacpp"):  # every engine's tokens, for a reader who wants to look
        if (work / f"{raw}.json").exists():
            (results / f"{raw}.json").write_text((work / f"{raw}.json").read_text())
    lines = ["| engine | serving | compared with | identical greedy sequences | agreeing prefix | tokens/s | "
             "tokens/s without adapter |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['what']} | {r['against']} | {r['identical']} | {r['prefix_agreement']:.3f} "
                     f"| {r['tokens_per_s']} | {r['tokens_per_s_without_adapter'] or ''} |")
    extra = []
    if "vllm_server_per_request_selection" in summary:
        s = summary["vllm_server_per_request_selection"]
        extra.append(f"vLLM server, adapter chosen per request (`model` field), {s['requests']} requests in random "
                     f"order: {s['matching_their_adapter']} match their adapter's PEFT tokens, "
                     f"{s['matching_the_other_adapter']} the other adapter's.")
    if "vllm_mixed_batch_correct" in summary:
        extra.append(f"vLLM offline, both adapters in one batch: {summary['vllm_mixed_batch_correct']} prompts match "
                     "their adapter's PEFT tokens.")
    (results / "serve-check.md").write_text("\n".join(lines + [""] + extra) + "\n")
    print("\n".join(lines + [""] + extra))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "vllm", "llamacpp", "report", "check-server"])
    parser.add_argument("--work", default="serve-check")
    parser.add_argument("--results", default="results/serve")
    parser.add_argument("--gguf-base", help="llamacpp: the bundled SmolLM2 GGUF")
    parser.add_argument("--convert-script", help="llamacpp: llama.cpp's convert_lora_to_gguf.py")
    parser.add_argument("--model", help="check-server: the base model folder")
    parser.add_argument("--lora-modules", nargs="*", default=[], help="check-server: NAME=FOLDER ...")
    parser.add_argument("--max-lora-rank", type=int, default=MAX_LORA_RANK)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if args.step != "check-server":
        work.mkdir(parents=True, exist_ok=True)
    try:
        if args.step == "check-server":
            check_server_args(args.model, dict(m.split("=", 1) for m in args.lora_modules), args.max_lora_rank,
                              args.host)
        elif args.step == "prepare":
            prepare(work)
        elif args.step == "vllm":
            vllm(work)
        elif args.step == "llamacpp":
            llamacpp(work, args.gguf_base, args.convert_script)
        else:
            report(work, Path(args.results))
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
