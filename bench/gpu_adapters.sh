#!/usr/bin/env bash
# The whole GPU table of issue #18 in one command, within 8 minutes on one H100/H200:
#
#     bash bench/gpu_adapters.sh            # from the repository root, on the GPU machine
#
# 1. operator counts per adapted layer (CPU, a few seconds: the same on every device);
# 2. bench.adapters --gpu-quick: a preflight (the fused Null-LoRA and routed LoRA paths against
#    their composed formulas on the GPU, bf16), then BART-base and BLIP-base sizes, bf16 autocast,
#    batch 32: each method's step / peft LoRA, compiled variants of the methods that missed,
#    ReSoRA's added time per kind, peak memory, merged inference; 8 alternating pairs after 3
#    warm-ups. Results: bench/results/adapters_gpu.{json,md} (rewritten after each model) and
#    bench/results/op_count.{json,md}; a copy goes to $OUT when that is set (the device tool).
# Extra arguments go to bench.adapters (e.g. --models bart-base, --compile null-lora:model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
"$PY" -m bench.op_count > /dev/null
status=0
timeout "${BENCH_BUDGET_S:-450}" "$PY" -m bench.adapters --device cuda --dtype bf16 --batch 32 \
    --gpu-quick "$@" || status=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/results"
    cp bench/results/adapters_gpu.* bench/results/op_count.* "$OUT/results/" 2>/dev/null || true
fi
echo "bench/gpu_adapters.sh: $(( $(date +%s) - start )) s, exit $status"
exit $status
