#!/usr/bin/env python3
"""Rebuild the bundled conversation sample neoxray/pipelines/sample/conversations.jsonl.

Every conversation is generated here from a fixed seed, the sentence templates and the word list below (written
for this script), so the file has no licence of its own to track. One JSON object per line in OpenAI's and TRL's
conversational format, `{"messages": [{"role": ..., "content": ...}, ...], "meta": {"pile_set_name": ...}}`, in
four families of 40 conversations, each its own component:

- "Arithmetic":  one question, one answer ("What is 17 + 25?" -> "17 + 25 = 42.")
- "Units":       a conversion, then a follow-up to a third unit (two assistant turns)
- "Words":       spell a word backwards, then count its letters (two assistant turns)
- "Sums":        a running total over three user turns (three assistant turns)

Every third conversation opens with a system message, and every fifth gives its first user message as a list
of text parts ([{"type": "text", "text": ...}]) instead of a string. The output is deterministic.

    python tools/make_conversation_sample.py [--output FILE] [--per-family N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "neoxray" / "pipelines" / "sample" / "conversations.jsonl"
SEED = 20261206
PER_FAMILY = 40

WORD_LIST = (
    "lantern pebble harvest copper meadow thimble glacier orchard compass marble trumpet velvet blossom hammock "
    "puzzle cinder saffron tundra whistle quiver breeze canyon harbour lagoon parcel sprout timber walrus zephyr"
)
WORDS = WORD_LIST.split()
SYSTEMS = (
    "You are a careful assistant. Answer in one short sentence.",
    "Be brief and exact.",
    "You help with small calculations.",
)
# (unit, how many of the base unit it holds) per quantity; the base unit comes first
LENGTHS = (("millimetres", 1), ("centimetres", 10), ("metres", 1000), ("kilometres", 1_000_000))
MASSES = (("grams", 1), ("kilograms", 1000), ("tonnes", 1_000_000))
VOLUMES = (("millilitres", 1), ("centilitres", 10), ("litres", 1000))
TIMES = (("seconds", 1), ("minutes", 60), ("hours", 3600))
QUANTITIES = (LENGTHS, MASSES, VOLUMES, TIMES)


def _say(n: int | float) -> str:
    return f"{int(n):,}" if float(n).is_integer() else f"{n:.6g}"


def arithmetic(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    shown = {"+": "+", "-": "-", "*": "x"}[op]
    question = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"))
    return [
        {"role": "user", "content": question.format(a=a, op=shown, b=b)},
        {"role": "assistant", "content": f"{a} {shown} {b} = {value}."},
    ]


def units(rng: random.Random) -> list[dict]:
    table = rng.choice(QUANTITIES)
    (small, s), (big, g) = sorted(rng.sample(table, 2), key=lambda u: u[1])
    third, t = rng.choice([u for u in table if u[0] not in (small, big)])
    n = rng.randint(2, 12)
    in_small = n * g // s
    return [
        {"role": "user", "content": f"How many {small} are in {n} {big}?"},
        {"role": "assistant", "content": f"{n} {big} are {_say(in_small)} {small}."},
        {"role": "user", "content": f"And how many {third} is that?"},
        {"role": "assistant", "content": f"That is {_say(n * g / t)} {third}."},
    ]


def words(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    return [
        {"role": "user", "content": f"Spell the word '{word}' backwards."},
        {"role": "assistant", "content": f"'{word}' backwards is '{word[::-1]}'."},
        {"role": "user", "content": "How many letters does it have?"},
        {"role": "assistant", "content": f"It has {len(word)} letters."},
    ]


def sums(rng: random.Random) -> list[dict]:
    total, messages = 0, []
    for turn in range(3):
        n = rng.randint(1, 30)
        total += n
        ask = f"Start a running total at {n}." if turn == 0 else f"Add {n}."
        messages.append({"role": "user", "content": ask})
        messages.append({"role": "assistant", "content": f"The total is {total}."})
    return messages


FAMILIES = (("Arithmetic", arithmetic), ("Units", units), ("Words", words), ("Sums", sums))


def build(per_family: int = PER_FAMILY, seed: int = SEED) -> list[dict]:
    """The rows, interleaving the families (row i is of family i % 4)."""
    rng = random.Random(seed)
    rows = []
    for i in range(per_family * len(FAMILIES)):
        name, make = FAMILIES[i % len(FAMILIES)]
        messages = make(rng)
        if i % 5 == 0:
            messages[0] = {"role": "user", "content": [{"type": "text", "text": messages[0]["content"]}]}
        if i % 3 == 1:
            messages.insert(0, {"role": "system", "content": SYSTEMS[(i // 4) % len(SYSTEMS)]})
        rows.append({"messages": messages, "meta": {"pile_set_name": name}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--per-family", type=int, default=PER_FAMILY)
    args = parser.parse_args()
    rows = build(args.per_family)
    args.output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {args.output}")


if __name__ == "__main__":
    main()
