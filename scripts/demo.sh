#!/usr/bin/env bash
# The embedded default, end to end on a CPU, offline: tokenizer -> Ray Data prepare -> 3D-parallel training
# (dp 2 x tp 2 x pp 2 on a local Ray cluster) -> export to a Hugging Face directory -> generation -> evaluation
# with lm-evaluation-harness on a held-out task -> a LoRA chat fine-tune of the trained model on the bundled
# conversations (loss on the assistant's turns only), exported as a peft adapter with its chat template -> serving
# the model and its adapter side by side on Ray Serve behind an OpenAI-compatible endpoint (a completion to the
# model, a chat completion to the adapter; the same model again split over 2 workers with int8 weights), and last
# the openai client: a streamed chat with the adapter and an answer held to a JSON schema.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NEOXRAY_VENV:-.venv}"
export PATH="$PWD/$VENV/bin:$PATH"
RUN="${NEOXRAY_RUN_DIR:-runs/demo}"
STEPS="${NEOXRAY_DEMO_STEPS:-100}"
SAMPLE=neoxray/pipelines/sample/sample.jsonl.zst
mkdir -p "$RUN"

echo "== 1/9 tokenizer: byte-level BPE (4096 tokens) trained on the bundled sample -> $RUN/tokenizer"
[ -f "$RUN/tokenizer/tokenizer.json" ] || neoxray tokenizer train --input "$SAMPLE" --vocab-size 4096 --output "$RUN/tokenizer"

echo "== 2/9 prepare: Ray Data tokenizes and packs the sample into rows of 129 tokens -> $RUN/data"
neoxray prepare --input "$SAMPLE" --tokenizer "$RUN/tokenizer" --seq-len 128 --output "$RUN/data"

echo "== 3/9 train: tiny GPT-NeoX, dp 2 x tp 2 x pp 2 = 8 Ray Train workers (DeepSpeed pipeline + ZeRO-1), $STEPS steps"
if [ -d "$RUN/train" ]; then
  echo "(a fresh run: the previous demo's training run in $RUN/train is replaced)"
  rm -rf "$RUN/train"
fi
# the experiment tracker too: MLflow, its SQLite store in the run directory (a server: logging.mlflow.tracking_uri)
neoxray train --config configs/tiny-cpu.yaml --run-dir "$RUN/train" data.path="$RUN/data" train.steps="$STEPS" \
  logging.mlflow.enabled=true logging.mlflow.experiment=neoxray-demo
neoxray report "$RUN/train"

echo "== 4/9 export: merge the sharded checkpoint into a Hugging Face directory -> $RUN/model"
neoxray export --checkpoint "$RUN/train" --out "$RUN/model"

echo "== 5/9 generate from the trained model (a tiny model after a few minutes of training writes gibberish)"
neoxray generate --model "$RUN/model" --prompt "def __init__(self" --max-new-tokens 40 --temperature 0.7 --top-k 40 --seed 0

echo "== 6/9 eval: lm-evaluation-harness on neoxray's engine, a last-word task from the sample's held-out documents"
python scripts/heldout_task.py "$SAMPLE" "$RUN/eval"
neoxray eval --model "$RUN/model" --tasks neoxray_heldout_lastword --include-path "$RUN/eval" --bootstrap-iters 0 \
    --output "$RUN/eval/results.json"

echo "== 7/9 prepare conversations: the bundled chat sample through neoxray's default template, the loss on the assistant's turns -> $RUN/chat-data"
neoxray prepare --format chat --input neoxray/pipelines/sample/conversations.jsonl \
    --tokenizer "$RUN/tokenizer" --seq-len 128 --val-fraction 0.1 --output "$RUN/chat-data" --overwrite

echo "== 8/9 LoRA: a rank-8 chat adapter on the frozen trained model, dp 2 x tp 2 x pp 2, then export a peft adapter (with its chat template) -> $RUN/adapter"
rm -rf "$RUN/lora"
neoxray train --config configs/lora-cpu.yaml --run-dir "$RUN/lora" model.init_from="$RUN/model" \
    data.path="$RUN/chat-data" train.steps="${NEOXRAY_DEMO_LORA_STEPS:-30}"
neoxray export --checkpoint "$RUN/lora" --out "$RUN/adapter"
python -c 'import json, sys; print("adapter chat template:", repr(json.load(open(sys.argv[1]))["chat_template"][:60]), "...")' "$RUN/adapter/tokenizer_config.json"
echo "checkpoint (adapters only): $(du -sh "$(ls -d "$RUN"/lora/checkpoint-step-* | tail -1)" | cut -f1); base model: $(du -sh "$RUN/model" | cut -f1)"

PORT="${NEOXRAY_DEMO_PORT:-8000}"
URL="http://127.0.0.1:$PORT"
echo "== 9/9 serve: Ray Serve hosts the model and its adapter at $URL/v1 (OpenAI-compatible); one request to each"
neoxray serve --model "$RUN/model" --lora chat="$RUN/adapter" --port "$PORT" --name demo >"$RUN/serve.log" 2>&1 &
SERVE_PID=$!
# SIGTERM, not SIGINT: a non-interactive shell starts background jobs with SIGINT ignored
stop_serving() { status=$?; { kill -TERM "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null; } || true; exit "$status"; }
trap stop_serving EXIT
for _ in $(seq 1 240); do
  curl -sf "$URL/health" >/dev/null && break
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "neoxray serve failed:"; tail -30 "$RUN/serve.log"; exit 1; }
  sleep 1
done
curl -sSf "$URL/v1/models" | python -c 'import json, sys; print("models:", [(m["id"], m.get("parent")) for m in json.load(sys.stdin)["data"]])'
REQUEST='{"model": "demo", "prompt": "def __init__(self", "max_tokens": 40, "temperature": 0.7, "top_p": 0.95, "seed": 0}'
echo "POST $URL/v1/completions $REQUEST"
curl -sSf "$URL/v1/completions" -H "Content-Type: application/json" -d "$REQUEST" | python -m json.tool
REQUEST='{"model": "chat", "messages": [{"role": "user", "content": "What is 12 + 7?"}], "max_tokens": 16, "temperature": 0}'
echo "POST $URL/v1/chat/completions $REQUEST   (the LoRA adapter, its own chat template)"
curl -sSf "$URL/v1/chat/completions" -H "Content-Type: application/json" -d "$REQUEST" | python -m json.tool

PORT2=$((PORT + 1))
URL2="http://127.0.0.1:$PORT2"
echo "== side by side: the same model split over 2 tensor-parallel workers, weights int8 (torchao), at $URL2/v1"
neoxray serve --no-ray --model "$RUN/model" --name demo --port "$PORT2" --tensor-parallel-size 2 \
    --quantization int8_weight_only >"$RUN/serve-tp2-int8.log" 2>&1 &
SERVE2_PID=$!
stop_serving() {
  status=$?
  for pid in "$SERVE_PID" "$SERVE2_PID"; do { kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; } || true; done
  exit "$status"
}
for _ in $(seq 1 240); do
  curl -sf "$URL2/health" >/dev/null && break
  kill -0 "$SERVE2_PID" 2>/dev/null || { echo "neoxray serve (tp 2, int8) failed:"; tail -30 "$RUN/serve-tp2-int8.log"; exit 1; }
  sleep 1
done
REQUEST='{"model": "demo", "prompt": "def __init__(self", "max_tokens": 24, "temperature": 0}'
echo "POST $REQUEST to both"
for u in "$URL" "$URL2"; do
  curl -sSf "$u/health" | python -c 'import json, sys; h = json.load(sys.stdin); print(h["tensor_parallel_size"], "worker(s), weights", h["quantization"] or "as trained (fp32)", "%.2f MiB per worker ->" % (h["weight_bytes_per_worker"] / 2**20), end=" ")'
  curl -sSf "$u/v1/completions" -H "Content-Type: application/json" -d "$REQUEST" | python -c 'import json, sys; print(repr(json.load(sys.stdin)["choices"][0]["text"]))'
done

echo "== chat through the openai client: a streamed chat completion with the adapter, then a JSON-schema answer"
python scripts/demo_chat.py "$URL/v1" chat

cat <<MSG

run directory     $RUN/train  (config.yaml, metrics.jsonl, TensorBoard event files in tensorboard/)
plots             $RUN/train/report.html  (open it in a browser)
MLflow            sqlite:///$RUN/train/mlflow.db, experiment neoxray-demo (every step's metrics, the config, a
                  summary; browse it with \`pip install mlflow && mlflow ui --backend-store-uri sqlite:///$RUN/train/mlflow.db\`)
checkpoints       $(ls -d "$RUN"/train/checkpoint-step-* | tr '\n' ' ')
Ray dashboard     the demo's cluster stops with each command; to watch a run there, start a cluster of your own
                  (8 logical CPUs: one per training worker, as the demo's) and submit the run to it, from a shell:
                    cd $PWD && source $VENV/bin/activate && export RAY_AUTH_MODE=token
                    ray start --head --num-cpus 8
                    ray job submit --working-dir . -- neoxray train --config configs/tiny-cpu.yaml \\
                        data.path=$(cd "$RUN" && pwd)/data --run-dir $(cd "$RUN" && pwd)/job train.steps=$STEPS
                  'ray start' prints the dashboard's address, 'ray get-auth-token' the token to sign in with,
                  'ray stop' ends that cluster; see docs/cluster.md
exported model    $RUN/model  (transformers.AutoModelForCausalLM.from_pretrained("$RUN/model"))
evaluation        $RUN/eval/results.json  (lm-eval's results; neoxray eval --suite model-card for the card's table)
LoRA run          $RUN/lora  (adapter-only checkpoints); peft adapter $RUN/adapter
                  (peft.PeftModel.from_pretrained(base, "$RUN/adapter"); docs/finetuning.md)
endpoint          $URL/v1 served both, "model": "demo" and "model": "chat" (log: $RUN/serve.log); $URL2/v1
                  the same model over 2 tensor-parallel workers with int8 weights (log: $RUN/serve-tp2-int8.log);
                  \`neoxray plan neox-20b --serve --gpu-memory 80 --max-num-seqs 8\` says what fits where; serve them
                  again with 'neoxray serve --model $RUN/model --lora chat=$RUN/adapter', point any OpenAI
                  client at that URL, or open $URL/ in a browser to chat with the adapter (docs/serving.md)
MSG
if [ -n "${NEOXRAY_DEMO_KEEP_SERVING:-}" ]; then
  echo "serving at $URL/v1 until Ctrl-C"
  wait "$SERVE_PID"
fi
