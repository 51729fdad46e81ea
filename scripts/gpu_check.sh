#!/usr/bin/env bash
# The GPU checks in one command, sized for one try on one H200 (at most 8 minutes in all; each part has its own
# timeout and writes its results as it goes, so a part cut short still leaves what it measured):
#   1. tests:     the correctness tests that take their device from conftest (`--device cuda`), the 7B-shaped one too;
#   2. short:     benchmarks/bench.py --preset paper (2 Llama-2-7B-shaped layers, 512 tokens, bfloat16): LoRA,
#                 LoRAN default, naive, each in a fresh process;
#   3. realistic: benchmarks/bench.py --preset realistic (8 7B-shaped layers, 4 x 1024 tokens, bfloat16; the
#                 paper's recipe and all seven projections at r = 16; bf16 and NF4 bases): LoRA, LoRAN default,
#                 naive, each method in one fresh process; step time, peak allocation, eval forward, generation
#                 with the eval cache off and on, and the one-time compile cost on an empty inductor cache.
#   (4. eval:     benchmarks/eval_memory.py on the device; not in the default PARTS.)
# usage: scripts/gpu_check.sh [--device cpu] [OUTDIR]   (default OUTDIR gpu-check/)
#   --device cpu: the same parts through the same code at toy sizes, as a dry run where no GPU is lent (with
#   PEFT_LORAN_PLAN=accelerator: the block plan a GPU uses by default).
# Environment: PARTS (default "tests short realistic"), TEST_TIMEOUT / SHORT_TIMEOUT / REALISTIC_TIMEOUT /
# EVAL_TIMEOUT (seconds), BENCH_STEPS (timed steps in the short part, default 20), PYTHON (default python3).
# The packages' sources are taken from src/ (no install of peft-loran needed); the NF4 cases need bitsandbytes.
# Files written (at most 8, as a device run returns): .gpu-check (its marker: OUTDIR must be new, empty or its own),
# run.log (versions, commit, time per part), tests.log,
# bench.log (the benchmarks' progress), short-DEVICE.{json,md}, realistic-DEVICE.{json,md}.
set -uo pipefail
device=cuda
if [[ ${1:-} == --device ]]; then device=$2; shift 2; fi
out=${1:-gpu-check}
# write only into an empty folder or one this script made (its marker file): never over someone's files
if [[ -d "$out" && -n "$(ls -A "$out")" && ! -f "$out/.gpu-check" ]]; then
  echo "error: $out holds files this script did not write; choose an empty or new folder" >&2; exit 2
fi
mkdir -p "$out" && touch "$out/.gpu-check"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# compile from an empty cache, as a new user does: the first LoRAN process's first step shows the one-time cost
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) && export TORCHINDUCTOR_CACHE_DIR
started=$SECONDS

{ if [[ $device == cuda ]]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "peft", peft.__version__)'
  "$py" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' || echo "no bitsandbytes"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$out/run.log"

part_done() { echo "$1: rc $2, $((SECONDS - started)) s since the start" | tee -a "$out/run.log"; }
status=0
parts=${PARTS:-tests short realistic}
if [[ $device == cuda ]]; then
  tests=(tests/test_kernels.py tests/test_plan.py tests/test_layers.py tests/test_reference_fixtures.py
         tests/test_paper_shapes.py)
  short=(--preset paper --dtype bfloat16 --methods lora,loran,naive --steps "${BENCH_STEPS:-20}")
  realistic=(--preset realistic --dtype bfloat16)
else  # the dry run: a few tests, a hidden-1024 short preset, the realistic cases at toy sizes, on the GPU's plan
  export PEFT_LORAN_PLAN=accelerator
  tests=(tests/test_plan.py tests/test_kernels.py)
  short=(--preset targets --methods lora,loran --steps 1)
  realistic=(--preset realistic --tiny --dtype float32)
fi

if [[ $parts == *tests* ]]; then
  echo "== tests on $device"
  timeout "${TEST_TIMEOUT:-120}" "$py" -m pytest -q -p no:cacheprovider --device "$device" -m "slow or not slow" -rf \
    --tb=short "${tests[@]}" > "$out/tests.log" 2>&1
  rc=$?; tail -n 15 "$out/tests.log"; part_done tests $rc; [[ $rc == 0 ]] || status=1
fi

bench_part() {  # name, timeout, bench.py arguments: the JSON and the table are rewritten as cases finish
  local name=$1 limit=$2; shift 2
  echo "== $name preset on $device"
  timeout "$limit" "$py" benchmarks/bench.py --device "$device" "$@" \
    --json "$out/$name-$device.json" --out "$out/$name-$device.md" > /dev/null 2>> "$out/bench.log"
  local rc=$?; cat "$out/$name-$device.md" 2>/dev/null; tail -n 3 "$out/bench.log"; part_done "$name" $rc
  [[ $rc == 0 ]] || status=1
}
if [[ $parts == *short* ]]; then bench_part short "${SHORT_TIMEOUT:-100}" "${short[@]}"; fi
if [[ $parts == *realistic* ]]; then bench_part realistic "${REALISTIC_TIMEOUT:-250}" "${realistic[@]}"; fi

if [[ $parts == *eval* ]]; then
  echo "== evaluation memory on $device"
  timeout "${EVAL_TIMEOUT:-150}" "$py" benchmarks/eval_memory.py --device "$device" --bases float32,4bit \
    --json "$out/eval-memory-$device.json" > "$out/eval-memory-$device.md" 2>> "$out/bench.log"
  rc=$?; cat "$out/eval-memory-$device.md"; part_done eval $rc; [[ $rc == 0 ]] || status=1
fi
exit $status
