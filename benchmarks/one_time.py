"""One-time costs as a new user meets them: empty caches, fresh processes, next to the warm figures.

    python benchmarks/one_time.py [--json results/benchmarks/one-time-cpu.json]

Measured, each in a fresh process, with wall-clock time around the whole process:
- ``peft-loran --help`` (the command line answers before torch is imported);
- the bundled SmolLM2's one-time conversion (GGUF -> safetensors) into an empty ``PEFT_LORAN_CACHE``, then the
  same call again with the converted model in place;
- the first training step (forward and backward of 256 tokens) of bench.py's headline model with all seven
  projections adapted: PEFT LoRA; LoRAN as a user gets it (the default ``PEFT_LORAN_COMPILE=auto``, which compiles
  the kernel for these 1024-wide layers) on an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder), and
  again on that now warm cache; LoRAN on the eager kernel (``PEFT_LORAN_COMPILE=0``), which compiles nothing. The
  second step is timed too: the difference is what the first step pays once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)

STEP_CHILD = """
import json, sys, time
t_start = time.perf_counter()
import torch
sys.path.insert(0, {here!r})
from bench import Case, _adapt, _build
method = {method!r}
model = _adapt(_build(Case(method="base")), Case(method=method, targets="all"))
ids = torch.randint(0, 4096, (1, 256))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
times = []
for _ in range(2):
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({{"first_step_s": times[0], "second_step_s": times[1], "process_s": time.perf_counter() - t_start}}))
"""


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the raw measurements here")
    args = parser.parse_args()
    env = {**os.environ, "BENCH_THREADS": os.environ.get("BENCH_THREADS", str(os.cpu_count() or 1))}
    rows: list[tuple[str, str, float, float | None]] = []
    with tempfile.TemporaryDirectory() as scratch:
        seconds, _ = timed([os.path.join(BIN, "peft-loran"), "--help"], env)
        rows.append(("`peft-loran --help`", "-", seconds, None))

        model_cache = {**env, "PEFT_LORAN_CACHE": os.path.join(scratch, "models")}
        convert = [sys.executable, "-c", "from peft_loran_cli.models import resolve_model; resolve_model('smollm2', quiet=True)"]
        for state in ("empty cache", "converted model in place"):
            seconds, _ = timed(convert, model_cache)
            rows.append(("SmolLM2 GGUF -> safetensors (process)", state, seconds, None))

        inductor = os.path.join(scratch, "inductor")
        os.makedirs(inductor)
        cases = [("PEFT LoRA", "lora", {}, "-"),
                 ("LoRAN, default (auto: compiled kernel)", "loran", {"PEFT_LORAN_COMPILE": "auto"},
                  "empty inductor cache"),
                 ("LoRAN, default (auto: compiled kernel)", "loran", {"PEFT_LORAN_COMPILE": "auto"},
                  "warm inductor cache"),
                 ("LoRAN, eager kernel (PEFT_LORAN_COMPILE=0)", "loran", {"PEFT_LORAN_COMPILE": "0"}, "-")]
        for label, method, extra, state in cases:
            child = STEP_CHILD.format(here=HERE, method=method)
            _, out = timed([sys.executable, "-c", child], {**env, **extra, "TORCHINDUCTOR_CACHE_DIR": inductor})
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((f"first training step, all seven projections: {label}", state, result["first_step_s"],
                         result["second_step_s"]))
    lines = ["| what | state | seconds | next step (s) |", "|---|---|---|---|"]
    for what, state, seconds, after in rows:
        lines.append(f"| {what} | {state} | {seconds:.1f} | {'' if after is None else f'{after:.2f}'} |")
    table = "\n".join(lines)
    if args.json:
        from bench import write_json

        write_json(args.json, {"rows": rows})
    print(table)


if __name__ == "__main__":
    main()
