#!/usr/bin/env bash
# One GPU session for the benchmarks (machines with torch + transformers but no Ray/DeepSpeed):
#   bash benchmarks/gpu_run.sh OUTDIR
# DeepSpeed and its missing dependencies come from ./.whl (see ../shared/gpu/README.md).
set -uo pipefail
OUT="${1:-${OUT:-/tmp/neoxray-bench}}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
run() { echo "### $*" | tee -a "$OUT/log.txt"; timeout "${RUN_TIMEOUT:-200}" python3 "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/log.txt"; }
run benchmarks/model_step.py --preset pythia-1.4b --batch 8 --seq 2048 --dtype bf16 --steps 6 --rounds 2 --json "$OUT/model_step_p14.json"
run benchmarks/model_step.py --preset neox-20b --layers 4 --batch 4 --seq 2048 --dtype bf16 --steps 6 --rounds 2 --json "$OUT/model_step_20b4l.json"
run benchmarks/train_throughput.py --preset pythia-1.4b --micro-batch 8 --seq 2048 --grad-accum 1 --steps 8 --warmup 2 --json "$OUT/train_p14.json"
run benchmarks/train_throughput.py --preset neox-20b --layers 4 --micro-batch 4 --seq 2048 --grad-accum 1 --steps 8 --warmup 2 --json "$OUT/train_20b4l.json"
# serving: the inference engine driven directly (Ray is not on the GPU machines); transformers in the same process
run benchmarks/serve_throughput.py --preset pythia-1.4b --mode engine --device cuda --dtype bf16 --clients 1,32 --requests-per-client 1 --prompt-len 128 --max-tokens 128 --hf-single-requests 2 --static-batches 32 --json "$OUT/serve_p14.json"
run benchmarks/serve_throughput.py --preset pythia-1.4b --mode engine --device cuda --dtype bf16 --loras 4 --clients 32 --requests-per-client 1 --prompt-len 128 --max-tokens 128 --json "$OUT/serve_lora_p14.json"
run benchmarks/serve_throughput.py --preset neox-20b --mode engine --device cuda --dtype bf16 --clients 1,16 --requests-per-client 1 --prompt-len 128 --max-tokens 128 --hf-single-requests 2 --static-batches 16 --json "$OUT/serve_20b.json"
# structured output: decoding tokens/s with and without a JSON schema or a regex (llguidance's masks, CPU-computed,
# over the 50k vocabulary; applied on the GPU), batch 1 and 32
run benchmarks/structured_output.py --preset pythia-1.4b --device cuda --dtype bf16 --batches 1,32 --max-tokens 128 --json "$OUT/structured_p14.json"
# weight-only quantization (torchao) of neoxray's linears against transformers' generate on the bf16 weights: the
# 20B shape's first 4 layers at batch 1 and 16 in int8 and int4 (bf16: serve_20b above), then the full model in int8
for q in int8_weight_only int4_weight_only; do
  run benchmarks/serve_throughput.py --preset neox-20b --layers 4 --mode engine --device cuda --dtype bf16 --clients 1,16 --requests-per-client 1 --prompt-len 128 --max-tokens 128 --hf-single-requests 2 --static-batches 16 --quantization $q --json "$OUT/serve_20b4l_$q.json"
done
run benchmarks/serve_throughput.py --preset neox-20b --mode engine --device cuda --dtype bf16 --clients 1,16 --requests-per-client 1 --prompt-len 128 --max-tokens 128 --hf-single-requests 1 --static-batches 16 --quantization int8_weight_only --json "$OUT/serve_20b_int8.json"
# quantization quality on a GPU: bf16, int8 and int4 (int4 has no CPU kernel) held-out perplexity
RUN_TIMEOUT=300 run benchmarks/quantization_quality.py --device cuda --json "$OUT/quantization_cuda.json"
# tensor parallelism (two GPUs or more): one replica over 2 workers against 1, the 20B shape's first 4 layers
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run benchmarks/serve_layouts.py --preset neox-20b --layers 4 --device cuda --layouts 1,2,2:int8 --clients 16 --prompt-len 128 --max-tokens 128 --json "$OUT/serve_layouts_20b4l.json"
fi
# evaluation: neoxray's lm-eval backend against lm-eval's hf backend (lm-eval must be on the machine)
run benchmarks/eval_throughput.py --preset pythia-1.4b --device cuda --batch-size 32 --questions 200 --json "$OUT/eval_p14.json"
# LoRA memory: full fine-tuning vs LoRA rank 8 (all four targets), all 24 layers of the Pythia-1.4B shape, bf16,
# one fresh process per mode (imports, build, one step each)
RUN_TIMEOUT=420 run benchmarks/lora_memory.py --device cuda --seq 2048 --micro-batch 1 --json "$OUT/lora_memory_p14.json"
