#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU (none is needed anywhere else):
#   1. the correctness tests that take their device from conftest (`--device cuda`), the slow 7B-shaped one included;
#   2. benchmarks/bench.py --preset paper on CUDA in bfloat16: LoRA, LoRAN (compiled Triton kernels and eager),
#      the naive LoRAN, each in a fresh process;
#   3. benchmarks/eval_memory.py on CUDA: what evaluation and generation add to training's peak allocations.
# Environment: PARTS (default "tests bench eval": which of the three to run), EVAL_BASES (default float32,4bit),
# TEST_TIMEOUT / BENCH_TIMEOUT / EVAL_TIMEOUT (seconds per part), BENCH_STEPS (timed steps per process, default 20).
# usage: scripts/gpu_check.sh [OUTDIR]     (default gpu-check/; python from $PYTHON, else python3; the packages'
# sources are taken from src/, so no install of peft-loran is needed; bitsandbytes is needed for the nf4 parts)
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# compile from an empty cache, as a new user does (the one-time cost shows in the warm-up column)
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) && export TORCHINDUCTOR_CACHE_DIR

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "peft", peft.__version__)'
  "$py" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' || echo "no bitsandbytes"
} 2>&1 | tee "$out/env.txt"

status=0
parts=${PARTS:-tests bench eval}
if [[ $parts == *tests* ]]; then
echo "== tests on cuda"
timeout "${TEST_TIMEOUT:-240}" "$py" -m pytest -q -p no:cacheprovider --device cuda -m "slow or not slow" -rf --tb=short \
  tests/test_kernels.py tests/test_layers.py tests/test_reference_fixtures.py tests/test_paper_shapes.py \
  2>&1 | tee "$out/tests.log" | tail -n 40 || status=1
fi

if [[ $parts == *bench* ]]; then
echo "== paper shapes on cuda (bfloat16)"
timeout "${BENCH_TIMEOUT:-200}" "$py" benchmarks/bench.py --preset paper --device cuda --dtype bfloat16 \
  --methods lora,loran,loran_eager,naive --steps "${BENCH_STEPS:-20}" \
  --json "$out/paper-cuda.json" --out "$out/paper-cuda.md" 2>"$out/paper-cuda.err" | tail -n 30 || status=1
tail -n 5 "$out/paper-cuda.err"
fi

if [[ $parts == *eval* ]]; then
echo "== evaluation memory on cuda"
timeout "${EVAL_TIMEOUT:-150}" "$py" benchmarks/eval_memory.py --device cuda --bases "${EVAL_BASES:-float32,4bit}" \
  --json "$out/eval-memory-cuda.json" >"$out/eval-memory-cuda.md" 2>"$out/eval-memory-cuda.err" || status=1
cat "$out/eval-memory-cuda.md"; tail -n 8 "$out/eval-memory-cuda.err"
fi
exit $status
