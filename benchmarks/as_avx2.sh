#!/usr/bin/env bash
# Run a command with every kernel held to AVX2, on a CPU that has AVX-512:
#     bash benchmarks/as_avx2.sh python benchmarks/interleaved.py eval --targets all
# ATEN_CPU_CAPABILITY holds torch's own kernels and the C++ that inductor generates to AVX2, MKL_ENABLE_INSTRUCTIONS
# MKL's GEMMs and ONEDNN_MAX_CPU_ISA oneDNN's. TORCHINDUCTOR_CACHE_DIR is set (over any value the caller had) to an
# inductor cache for these runs only, $AVX2_INDUCTOR_CACHE if given: torch's graph cache does not key on
# ATEN_CPU_CAPABILITY, so with the usual cache a process would load the AVX-512 kernels an earlier process compiled.
# It reproduces an AVX2 CPU's code paths, not its cores, caches or memory.
set -euo pipefail
(( $# )) || { echo "usage: bash $0 command [arguments...]" >&2; exit 2; }
export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
export TORCHINDUCTOR_CACHE_DIR="${AVX2_INDUCTOR_CACHE:-${TMPDIR:-/tmp}/peft-loran-inductor-avx2-$(id -u)}"
exec "$@"
