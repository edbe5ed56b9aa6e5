"""The prepared-dataset format: what `neoxray prepare` writes and the training reader reads (docs/data.md).

    DIR/manifest.json            written last: a DIR without it is unfinished
    DIR/train/part-*.parquet     one column, `input_ids`: rows of seq_len + 1 token ids (uint16 or int32)
    DIR/validation/part-*.parquet
    DIR/tokenizer/               the tokenizer the data was prepared with

Manifest fields the reader relies on: `format` (== FORMAT), `seq_len`, `row_length` (seq_len + 1), `dtype`,
`splits.{train,validation}.{rows,files}` (each file entry: path, rows, row_groups, component), `options.by_component`,
`tokenizer` (sha256, vocab_size, eod_id). Everything else (documents, tokens, bad_rows, components, inputs) is
for people and for reruns.
"""

from __future__ import annotations

import json

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs

FORMAT = "neoxray.packed/1"
"""`format` field of manifest.json: bumped when the layout changes."""
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
TOKENIZER_DIR = "tokenizer"
"""DIR/tokenizer/: the tokenizer the data was prepared with (tokenizer.json and the files AutoTokenizer needs)."""
TOKEN_COLUMN = "input_ids"
"""The Parquet column holding each row's seq_len + 1 token ids."""
INPUT_IDS, LABELS = "input_ids", "labels"
"""Training batch keys: a row's first seq_len ids, and its last seq_len ids (the next-token targets)."""


def token_dtype(vocab_size: int) -> str:
    """The storage type of token ids: 'uint16' when every id fits in 16 bits, else 'int32'."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def read_manifest(path: str, required: bool = True) -> dict | None:
    """manifest.json of the prepared dataset at `path` (local or a URI). Missing: a NeoxrayError when `required`,
    else None. Not JSON, or another format: a NeoxrayError naming the file."""
    manifest_path = fs.join(fs.normalize(path), MANIFEST)
    if not fs.exists(manifest_path):
        if not required:
            return None
        raise NeoxrayError(
            f"{path}: not a prepared dataset (no {MANIFEST}; run `neoxray prepare`, or it did not finish)"
        )
    try:
        manifest = json.loads(fs.read_bytes(manifest_path).decode("utf-8"))
    except ValueError as e:
        raise NeoxrayError(f"{manifest_path}: not a valid manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise NeoxrayError(f"{manifest_path}: unsupported format {found!r} (expected {FORMAT})")
    return manifest
