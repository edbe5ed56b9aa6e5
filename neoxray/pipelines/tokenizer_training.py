"""`neoxray tokenizer train`: a GPT-NeoX-style byte-level BPE trained on text files and Pile shards.

The inputs are expanded like `neoxray prepare`'s (`fs.expand_inputs`: files, folders, globs, local or URIs) and
streamed through the Pile reader (bad rows counted by reason); the model package's `train_tokenizer` does the
training on the stream of texts.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.tokenizer import Tokenizer, train_tokenizer
from neoxray.pipelines import fs
from neoxray.pipelines.pile import DOCUMENT_SUFFIXES, iter_documents

PROGRESS_EVERY = 10_000
"""Progress is reported on stderr every this many documents."""


def train_tokenizer_from_files(
    inputs: list[str], vocab_size: int, output_dir: str, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE on `inputs`, save it to `output_dir` (a folder AutoTokenizer loads), return it.

    `inputs`: files, folders (searched recursively for .txt, .jsonl, .jsonl.gz, .jsonl.zst) or globs, local or
    URIs. A .txt file is one document; a Pile shard has one JSON object per line with the text under "text".
    Malformed lines are skipped and counted (reported on stderr).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NeoxrayError(f"tokenizer output {out} exists and is not a directory")
    files = fs.expand_inputs(inputs, DOCUMENT_SUFFIXES, "training input")
    bad: Counter = Counter()
    count = {"docs": 0}

    def documents() -> Iterator[str]:
        for file in files:
            for text, _ in iter_documents(file, bad=bad):
                if not text:
                    continue
                count["docs"] += 1
                if count["docs"] % PROGRESS_EVERY == 0:
                    print(f"train_tokenizer: {count['docs']:,} documents read ({file})", file=sys.stderr, flush=True)
                yield text

    tok = train_tokenizer(documents(), vocab_size, min_frequency)
    n_bad = sum(bad.values())
    if n_bad:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        print(f"train_tokenizer: skipped {n_bad:,} malformed lines ({reasons})", file=sys.stderr, flush=True)
    if count["docs"] == 0:
        raise NeoxrayError(
            f"no documents found in {len(files)} input file(s) ({', '.join(map(str, files[:3]))}"
            f"{', ...' if len(files) > 3 else ''}); {n_bad} malformed lines skipped"
        )
    tok.source = str(out)
    tok.save(out)
    print(
        f"train_tokenizer: {count['docs']:,} documents from {len(files)} file(s), vocab {tok.vocab_size:,}, "
        f"saved to {out}",
        file=sys.stderr,
        flush=True,
    )
    return tok
