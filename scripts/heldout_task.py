"""Write a small lm-eval task from the held-out documents of a Pile-format corpus, for the demo's evaluation.

    python scripts/heldout_task.py CORPUS OUT_DIR [--val-fraction 0.01] [--examples 60]

The documents `neoxray prepare` routes to its validation split (the same hash and fraction: the model never
trained on them) are cut into passages of about 40 words; each example asks for a passage's last word after
the rest of it, LAMBADA's format (loglikelihood: acc = the word is the greedy continuation, and perplexity).
OUT_DIR gets `neoxray_heldout_lastword.yaml` and its data file (absolute path), so `neoxray eval --include-path
OUT_DIR --tasks neoxray_heldout_lastword` runs it offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from neoxray.pipelines.dataset_format import text_hash64, validation_threshold
from neoxray.pipelines.pile import iter_documents

TASK = "neoxray_heldout_lastword"
YAML = """# Held-out passages of the demo's corpus, LAMBADA's format (written by scripts/heldout_task.py).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="a .jsonl / .jsonl.gz / .jsonl.zst corpus (the demo's bundled sample)")
    ap.add_argument("out", help="the folder to write the task into")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="as given to neoxray prepare (default 0.01)")
    ap.add_argument("--examples", type=int, default=60, help="passages at most (default 60)")
    ap.add_argument("--words", type=int, default=40, help="words per passage (default 40)")
    args = ap.parse_args()
    threshold = validation_threshold(args.val_fraction)
    examples: list[str] = []
    for text, _ in iter_documents(args.corpus):
        if text_hash64(text) >= threshold:
            continue  # a training document
        words = [w for w in text.split() if w.isascii()]
        for i in range(0, len(words) - args.words, args.words):
            passage = words[i : i + args.words]
            if passage[-1].isalpha():  # a word to guess, not punctuation or code
                examples.append(" ".join(passage))
            if len(examples) >= args.examples:
                break
        if len(examples) >= args.examples:
            break
    if not examples:
        raise SystemExit(f"no held-out passages in {args.corpus} at val_fraction {args.val_fraction}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in examples), encoding="utf-8")
    (out / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=data), encoding="utf-8")
    print(f"wrote {len(examples)} held-out passages as the lm-eval task {TASK} in {out}")


if __name__ == "__main__":
    main()
