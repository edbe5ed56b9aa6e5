#!/usr/bin/env python3
"""Rebuild the bundled prompt-completion sample neoxray/pipelines/sample/instructions.jsonl.

Every example is generated here from a fixed seed and the small word list below (written for this script), so
the file has no licence of its own to track. Four short task families, each its own `meta.pile_set_name` (so
that `neoxray prepare --format prompt-completion --by-component` has components to work with):

- "Arithmetic":  "Question: What is 37 + 58?\\nAnswer:" -> " 95" (addition, subtraction, multiplication)
- "Units":       "Question: How many metres are in 3 kilometres?\\nAnswer:" -> " 3000"
- "Reverse":     "Question: Write the word garden backwards.\\nAnswer:" -> " nedrag"
- "Uppercase":   "Question: Write 'blue river' in capital letters.\\nAnswer:" -> " BLUE RIVER"

The prompt ends where the answer starts; the completion carries the answer with its leading space. The output
is deterministic (fixed seed, fixed order, one JSON object per line with keys prompt, completion, meta).

    python tools/make_instruction_sample.py [--output FILE] [--per-task N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "neoxray" / "pipelines" / "sample" / "instructions.jsonl"
SEED = 20261201
PER_TASK = 100

WORD_LIST = (
    "apple bridge candle garden yellow window river planet silver orange forest pencil castle rabbit winter "
    "summer travel button mirror basket dragon market pocket finger circle jacket ladder meadow needle oyster "
    "parrot quartz ribbon saddle tunnel violin wallet zipper anchor beacon cactus dinner engine falcon guitar "
    "harbor island jungle kettle lemon magnet nickel orbit pepper rocket shadow tomato umbrella valley walnut "
    "blue green quiet happy small bright cold warm gentle rapid"
)
WORDS = WORD_LIST.split()

UNITS = (
    # (question template, factor): answer = value * factor
    ("How many metres are in {v} kilometres?", 1000),
    ("How many centimetres are in {v} metres?", 100),
    ("How many grams are in {v} kilograms?", 1000),
    ("How many millilitres are in {v} litres?", 1000),
    ("How many minutes are in {v} hours?", 60),
    ("How many seconds are in {v} minutes?", 60),
    ("How many hours are in {v} days?", 24),
    ("How many days are in {v} weeks?", 7),
)


def _qa(question: str, answer: str, task: str) -> dict:
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}", "meta": {"pile_set_name": task}}


def arithmetic(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return _qa(f"What is {a} times {b}?", str(a * b), "Arithmetic")
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return _qa(f"What is {a} - {b}?", str(a - b), "Arithmetic")
    return _qa(f"What is {a} + {b}?", str(a + b), "Arithmetic")


def units(rng: random.Random) -> dict:
    template, factor = rng.choice(UNITS)
    value = rng.randint(1, 20)
    return _qa(template.format(v=value), str(value * factor), "Units")


def reverse(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return _qa(f"Write the word {word} backwards.", word[::-1], "Reverse")


def uppercase(rng: random.Random) -> dict:
    words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return _qa(f"Write '{words}' in capital letters.", words.upper(), "Uppercase")


def build(per_task: int = PER_TASK, seed: int = SEED) -> list[dict]:
    """per_task examples of each family, interleaved (family order fixed), from one seeded generator."""
    rng = random.Random(seed)
    tasks = (arithmetic, units, reverse, uppercase)
    return [task(rng) for _ in range(per_task) for task in tasks]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSONL file to write")
    ap.add_argument("--per-task", type=int, default=PER_TASK, help="examples of each task family")
    args = ap.parse_args(argv)
    rows = build(args.per_task)
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples ({args.output.stat().st_size:,} bytes) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
