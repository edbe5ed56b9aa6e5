#!/usr/bin/env bash
# The embedded default, end to end on a CPU, offline: tokenizer -> Ray Data prepare -> 3D-parallel training
# (dp 2 x tp 2 x pp 2 on a local Ray cluster) -> export to a Hugging Face directory -> generation -> evaluation
# with lm-evaluation-harness on a held-out task -> serving
# the model on Ray Serve behind an OpenAI-compatible endpoint, and one completion request over HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEOXRAY_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
RUN="${NEOXRAY_RUN_DIR:-runs/demo}"
STEPS="${NEOXRAY_DEMO_STEPS:-100}"
SAMPLE=neoxray/pipelines/sample/sample.jsonl.zst
mkdir -p "$RUN"

echo "== 1/7 tokenizer: byte-level BPE (4096 tokens) trained on the bundled sample -> $RUN/tokenizer"
[ -f "$RUN/tokenizer/tokenizer.json" ] || neoxray tokenizer train --input "$SAMPLE" --vocab-size 4096 --output "$RUN/tokenizer"

echo "== 2/7 prepare: Ray Data tokenizes and packs the sample into rows of 129 tokens -> $RUN/data"
neoxray prepare --input "$SAMPLE" --tokenizer "$RUN/tokenizer" --seq-len 128 --output "$RUN/data"

echo "== 3/7 train: tiny GPT-NeoX, dp 2 x tp 2 x pp 2 = 8 Ray Train workers (DeepSpeed pipeline + ZeRO-1), $STEPS steps"
if [ -d "$RUN/train" ]; then
  echo "(a fresh run: the previous demo's training run in $RUN/train is replaced)"
  rm -rf "$RUN/train"
fi
neoxray train --config configs/tiny-cpu.yaml --run-dir "$RUN/train" data.path="$RUN/data" train.steps="$STEPS"
neoxray report "$RUN/train"

echo "== 4/7 export: merge the sharded checkpoint into a Hugging Face directory -> $RUN/model"
neoxray export --checkpoint "$RUN/train" --out "$RUN/model"

echo "== 5/7 generate from the trained model (a tiny model after a few minutes of training writes gibberish)"
neoxray generate --model "$RUN/model" --prompt "def __init__(self" --max-new-tokens 40 --temperature 0.7 --top-k 40 --seed 0

echo "== 6/7 eval: lm-evaluation-harness on neoxray's engine, a last-word task from the sample's held-out documents"
python scripts/heldout_task.py "$SAMPLE" "$RUN/eval"
neoxray eval --model "$RUN/model" --tasks neoxray_heldout_lastword --include-path "$RUN/eval" --bootstrap-iters 0 \
    --output "$RUN/eval/results.json"

PORT="${NEOXRAY_DEMO_PORT:-8000}"
URL="http://127.0.0.1:$PORT"
echo "== 7/7 serve: Ray Serve hosts the exported model at $URL/v1 (OpenAI-compatible); one completion over HTTP"
neoxray serve --model "$RUN/model" --port "$PORT" --name demo >"$RUN/serve.log" 2>&1 &
SERVE_PID=$!
# SIGTERM, not SIGINT: a non-interactive shell starts background jobs with SIGINT ignored
stop_serving() { status=$?; { kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null; } || true; exit "$status"; }
trap stop_serving EXIT
for _ in $(seq 1 240); do
  curl -sf "$URL/health" >/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "neoxray serve failed:"; tail -30 "$RUN/serve.log"; exit 1; }
  sleep 1
done
REQUEST='{"model": "demo", "prompt": "def __init__(self", "max_tokens": 40, "temperature": 0.7, "top_p": 0.95, "seed": 0}'
echo "POST $URL/v1/completions $REQUEST"
curl -sSf "$URL/v1/completions" -H "Content-Type: application/json" -d "$REQUEST" | python -m json.tool

cat <<MSG

run directory     $RUN/train  (config.yaml, metrics.jsonl, TensorBoard event files in tensorboard/)
plots             $RUN/train/report.html  (open it in a browser)
checkpoints       $(ls -d "$RUN"/train/checkpoint-step-* | tr '\n' ' ')
Ray dashboard     the demo's cluster stops with each command; to watch a run there, start one with
                  'ray start --head' (it prints the dashboard's address; 'ray get-auth-token' prints the token
                  to sign in with) and submit with 'ray job submit --working-dir . -- neoxray train --config
                  configs/tiny-cpu.yaml data.path=$(cd "$RUN" && pwd)/data --run-dir $(cd "$RUN" && pwd)/job';
                  see docs/cluster.md
exported model    $RUN/model  (transformers.AutoModelForCausalLM.from_pretrained("$RUN/model"))
evaluation        $RUN/eval/results.json  (lm-eval's results; neoxray eval --suite model-card for the card's table)
endpoint          $URL/v1 served it (log: $RUN/serve.log); serve it again with
                  'neoxray serve --model $RUN/model' and point any OpenAI client at that URL
MSG
if [ -n "${NEOXRAY_DEMO_KEEP_SERVING:-}" ]; then
  echo "serving at $URL/v1 until Ctrl-C"
  wait "$SERVE_PID"
fi
