"""The prepared-dataset format: what `neoxray prepare` writes and the training reader reads (docs/data.md).

    DIR/manifest.json            written last: a DIR without it is unfinished
    DIR/train/part-*.parquet     one column, `input_ids`: rows of seq_len + 1 token ids (uint16 or int32)
    DIR/validation/part-*.parquet
    DIR/tokenizer/               the tokenizer the data was prepared with

Manifest fields the reader relies on: `format` (== FORMAT), `seq_len`, `row_length` (seq_len + 1), `dtype`,
`splits.{train,validation}.{rows,files}` (each file entry: path, rows, row_groups, component), `options.by_component`,
`tokenizer` (sha256, vocab_size, eod_id). Everything else (documents, tokens, bad_rows (dropped, by reason),
documents_without_component (kept), components, inputs) is for people and for reruns.
"""

from __future__ import annotations

import json
from collections import Counter

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
KEPT_REASONS = ("missing_meta",)
"""Row counts the reader reports that are not drops: a document without meta.pile_set_name is kept (component
`unknown`) and counted in the manifest's `documents_without_component`, apart from `bad_rows`."""
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


def build_manifest(results, input_list, options, tok_info, seq_len, dtype, files) -> dict:
    """The manifest of a finished `neoxray prepare` run, from its per-chunk statistics (`results["chunks"]`: file
    -> chunk -> bad-row counts and (split, component, documents, tokens) tuples) and its packed streams
    (`results["packed"]`: rows, files and dropped tokens per file, split and component). Documents, tokens,
    rows and dropped tokens are totalled per split, component and input file; no usable document is an error."""
    chunks, packed = results["chunks"], results["packed"]
    bad: Counter = Counter()
    components: dict[str, dict] = {}
    per_file = [{"documents": 0, "tokens": 0, "rows": 0, "dropped_tokens": 0} for _ in files]
    splits = {s: {"documents": 0, "tokens": 0, "rows": 0, "dropped_tokens": 0, "files": []} for s in SPLITS}
    for f, by_chunk in chunks.items():
        for c in sorted(by_chunk):
            bad.update(by_chunk[c]["bad"])
            for split, comp, docs, tokens in by_chunk[c]["stats"]:
                entry = components.setdefault(comp, {"documents": 0, "tokens": 0})
                entry["documents"] += docs
                entry["tokens"] += tokens
                per_file[f]["documents"] += docs
                per_file[f]["tokens"] += tokens
                splits[SPLITS[split]]["documents"] += docs
                splits[SPLITS[split]]["tokens"] += tokens
    for stream in sorted(packed, key=lambda s: (s["file_idx"], SPLITS.index(s["split"]), s["component"] or "")):
        rows = sum(p["rows"] for p in stream["parts"])
        sp = splits[stream["split"]]
        sp["rows"] += rows
        sp["dropped_tokens"] += stream["dropped_tokens"]
        sp["files"].extend(stream["parts"])
        per_file[stream["file_idx"]]["rows"] += rows
        per_file[stream["file_idx"]]["dropped_tokens"] += stream["dropped_tokens"]
    documents = sum(s["documents"] for s in splits.values())
    tokens = sum(s["tokens"] for s in splits.values())
    if documents == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "none"
        raise NeoxrayError(
            f"no usable documents in {len(files)} input file(s) "
            f"({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}); bad rows: {reasons}"
        )
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "row_length": seq_len + 1,
        "dtype": dtype,
        "documents": documents,
        "tokens": tokens,
        "rows": sum(s["rows"] for s in splits.values()),
        "dropped_tokens": sum(s["dropped_tokens"] for s in splits.values()),
        "bad_rows": {k: v for k, v in sorted(bad.items()) if k not in KEPT_REASONS},
        "documents_without_component": sum(bad[k] for k in KEPT_REASONS),
        "components": dict(sorted(components.items())),
        "splits": splits,
        "tokenizer": tok_info,
        "inputs": [{**i, **per_file[k]} for k, i in enumerate(input_list)],
        "options": options,
    }
