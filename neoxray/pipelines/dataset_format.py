"""The prepared-dataset format: what `neoxray prepare` writes and the training reader reads (docs/data.md).

    DIR/manifest.json            written last: a DIR without it is unfinished
    DIR/train/part-*.parquet     `input_ids`: rows of seq_len + 1 token ids (uint16 or int32); with content
                                   prompt-completion or chat also `loss_mask` (seq_len + 1 uint8 per row,
                                   aligned with the ids) and `trained_labels` (int32 per row: sum of loss_mask[1:])
    DIR/validation/part-*.parquet
    DIR/tokenizer/               the tokenizer the data was prepared with

Manifest fields the reader relies on: `format` (== FORMAT), `content` (CONTENTS; absent in datasets written
before it existed: TEXT), `seq_len`, `row_length` (seq_len + 1), `dtype`, `splits.{train,validation}.{rows,files}`
(each file entry: path, rows, component), `options.by_component`, `tokenizer` (sha256, vocab_size, eod_id).
Everything else (documents, tokens, loss_tokens, trained_labels, bad_rows (dropped, by reason),
documents_without_component (kept), components, inputs; with content chat `chat_template`: the template's source,
sha256, text and special tokens) is for people, for reruns and for export.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable

import numpy as np

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs

FORMAT = "neoxray.packed/1"
"""`format` field of manifest.json: bumped when the layout changes."""
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
TOKENIZER_DIR = "tokenizer"
"""DIR/tokenizer/: the tokenizer the data was prepared with (tokenizer.json and the files AutoTokenizer needs)."""
INPUT_IDS = "input_ids"
"""Token ids. The Parquet column: each row's seq_len + 1 ids (uint16 or int32). The training batch key: the first
seq_len of them, the inputs (int64 [b, seq_len]); `labels_and_mask` makes one from the other."""
LABELS = "labels"
"""Training batch key: a row's last seq_len ids, the next-token targets (int64 [b, seq_len])."""
LOSS_MASK = "loss_mask"
"""Which tokens are trained (content prompt-completion only). The Parquet column: each row's seq_len + 1 values
(uint8, 0 or 1), aligned with its ids: mask[j] belongs to ids[j] as a *target*, 1 where ids[j] is a completion
token or the EOD that ends a completion, 0 on prompt tokens; mask[0] is kept for alignment only (a row's first id
is never a label). The training batch key, only when the data holds masked rows: bool [b, seq_len] aligned with
`labels`. The convention: for a row of ids x[0..N] and stored mask m[0..N], input_ids = x[:N], labels = x[1:],
loss_mask = m[1:], so loss_mask[:, t] says whether labels[:, t] (token t + 1, predicted at position t) is trained
(False: set that label to -100). Absent from text data, whose every label is trained."""
TRAINED_LABELS = "trained_labels"
"""The Parquet column (content prompt-completion only): per row, how many of its seq_len labels are trained
(the sum of loss_mask[1:]); the reader counts a global batch's trained labels from it without reading masks."""
GLOBAL_TRAINED_LABELS = "global_trained_labels"
"""Training batch key, always present: the number of trained labels in the whole global batch the micro-batch
belongs to (every rank and micro-batch of it), to divide the summed loss by, whatever the layout."""
TEXT, PROMPT_COMPLETION, CHAT = "text", "prompt-completion", "chat"
CONTENTS = (TEXT, PROMPT_COMPLETION, CHAT)
"""Manifest `content`: what the rows hold. text: documents, every token trained; prompt-completion: prompt tokens
(mask 0) followed by completion tokens and EOD (mask 1); chat: conversations rendered with a chat template
(`chat_template` in the manifest), mask 1 on the assistant turns' tokens, their end-of-turn token included."""


def labels_and_mask(rows: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A training batch's arrays from stored rows of seq_len + 1 ids [b, seq_len + 1] and their stored loss mask
    (None: unmasked data): `input_ids` = rows[:, :-1], `labels` = rows[:, 1:], `loss_mask` = mask[:, 1:] as bool
    (see `LOSS_MASK`). The one place the label shift is written."""
    batch = {INPUT_IDS: rows[:, :-1], LABELS: rows[:, 1:]}
    if mask is not None:
        batch[LOSS_MASK] = mask[:, 1:].astype(bool)
    return batch


def validation_threshold(val_fraction: float) -> int:
    """Documents whose 64-bit text hash is below this go to validation."""
    return int(round(val_fraction * (1 << 64)))


def text_hash64(text: str | bytes) -> int:
    """The hash that routes a document to train or validation: BLAKE2b (8-byte digest) of its UTF-8, big-endian."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


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
    content_of(manifest, manifest_path)
    return manifest


def stored_row_length(path: str, manifest: dict, split: str = "train") -> int | None:
    """The row length the files themselves hold (ids per row of the split's first Parquet file, read from its
    first row), whatever the manifest says; None when the split has no files."""
    import pyarrow.parquet as pq

    files = manifest["splits"][split]["files"]
    if not files:
        return None
    file = fs.join(fs.normalize(path), files[0]["path"])
    try:
        first = next(pq.ParquetFile(fs.open_random_access(file)).iter_batches(batch_size=1, columns=[INPUT_IDS]))
    except StopIteration:
        return None
    except Exception as e:
        raise NeoxrayError(f"{file}: not a readable Parquet file with a {INPUT_IDS} column ({e})") from None
    return len(first.column(0)[0])


def content_of(manifest: dict, where: str = "manifest") -> str:
    """The manifest's `content` (TEXT for datasets written before the field existed); another value is an error."""
    content = manifest.get("content", TEXT)
    if content not in CONTENTS:
        raise NeoxrayError(f"{where}: unsupported content {content!r} (expected one of {', '.join(CONTENTS)})")
    return content


def build_manifest(
    chunks: Iterable[dict],
    packed: Iterable[dict],
    *,
    content: str,
    seq_len: int,
    dtype: str,
    tokenizer: dict,
    inputs: list[dict],
    options: dict,
) -> dict:
    """The manifest of a finished `neoxray prepare` run, from what its stages reported.

    `chunks`: per tokenized chunk, its input file (`file_idx`), the rows its reader dropped (`bad`: [{reason,
    rows}]) or kept without a component (`without_component`), and per stream of the chunk its `split` (index
    into SPLITS), `component`, `documents`, `tokens` and `loss_tokens` (`streams`). `packed`: per input file,
    split and component, the packed rows, trained labels, part files and dropped tokens (`pack_file`). The
    counts are totalled per split, component and input file (`inputs`: [{path, size}], in order); no usable
    document is an error."""
    doc_keys = ("documents", "tokens", "loss_tokens")
    row_keys = ("rows", "trained_labels", "dropped_tokens")
    bad: Counter = Counter()
    without_component = 0
    components: dict[str, dict] = {}
    per_file = [dict.fromkeys(doc_keys + row_keys, 0) for _ in inputs]
    splits = {s: {**dict.fromkeys(doc_keys + row_keys, 0), "files": []} for s in SPLITS}
    for chunk in chunks:
        bad.update({b["reason"]: b["rows"] for b in chunk["bad"]})
        without_component += chunk["without_component"]
        for stream in chunk["streams"]:
            entry = components.setdefault(stream["component"], dict.fromkeys(doc_keys, 0))
            for key in doc_keys:
                entry[key] += stream[key]
                per_file[chunk["file_idx"]][key] += stream[key]
                splits[SPLITS[stream["split"]]][key] += stream[key]
    for stream in sorted(packed, key=lambda s: (s["file_idx"], SPLITS.index(s["split"]), s["component"] or "")):
        sp = splits[stream["split"]]
        sp["files"].extend(stream["parts"])
        for key in row_keys:
            sp[key] += stream[key]
            per_file[stream["file_idx"]][key] += stream[key]
    total = {k: sum(s[k] for s in splits.values()) for k in doc_keys + row_keys}
    if total["documents"] == 0:
        files = [i["path"] for i in inputs]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "none"
        raise NeoxrayError(
            f"no usable documents in {len(files)} input file(s) "
            f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}); bad rows: {reasons}"
        )
    return {
        "format": FORMAT,
        "content": content,
        "seq_len": seq_len,
        "row_length": seq_len + 1,
        "dtype": dtype,
        **total,
        "bad_rows": dict(sorted(bad.items())),
        "documents_without_component": without_component,
        "components": dict(sorted(components.items())),
        "splits": splits,
        "tokenizer": tokenizer,
        "inputs": [{**i, **per_file[k]} for k, i in enumerate(inputs)],
        "options": options,
    }
