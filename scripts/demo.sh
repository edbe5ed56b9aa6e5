#!/usr/bin/env bash
# The embedded default: train a tokenizer on the bundled sample corpus, write a tiny randomly initialised
# GPT-NeoX as a Hugging Face directory, and generate from it. Runs offline on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEOXRAY_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
RUN="${NEOXRAY_RUN_DIR:-runs/demo}"
SAMPLE=neoxray/pipelines/sample/sample.jsonl.zst
mkdir -p "$RUN"

echo "== 1/4 tokenizer: byte-level BPE (4096 tokens) trained on the bundled sample -> $RUN/tokenizer"
[ -f "$RUN/tokenizer/tokenizer.json" ] || neoxray tokenizer train --input "$SAMPLE" --vocab-size 4096 --output "$RUN/tokenizer"
echo "== 2/4 model: the 'tiny' preset"
neoxray model info tiny
echo "== 3/4 a randomly initialised tiny GPT-NeoX as a Hugging Face directory -> $RUN/model"
neoxray model init --preset tiny --tokenizer "$RUN/tokenizer" --out "$RUN/model" --seed 0
echo "== 4/4 generate (KV-cache decoding; random weights, so expect noise until training lands)"
neoxray generate --model "$RUN/model" --prompt "The Python language" --max-new-tokens 24 --seed 0 --json
echo
echo "model directory: $RUN/model (loads with transformers.AutoModelForCausalLM.from_pretrained)"
