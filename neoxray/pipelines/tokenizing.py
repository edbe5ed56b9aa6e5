"""Stages 1 and 2 of `neoxray prepare`, the ones that run on the cluster before packing: reading an input file into
chunks of text (`read_chunks`, a Ray Data task per file) and tokenizing them (`Tokenize`, a Ray Data actor pool).
The driver is `neoxray.pipelines.prepare`; stage 3 is `neoxray.pipelines.packing`.

    {file_idx, path}        -> read_chunks -> CHUNK_SCHEMA rows: a chunk of about `chunk_bytes` characters of one
                                              file's documents, in order, with its bad-row counts
    CHUNK_SCHEMA rows       -> Tokenize    -> TOKENIZED_SCHEMA rows: where the chunk's token streams were written
                                              (DIR/.tmp-*/chunks/) and what they hold, per split and component

Both stages hand on Arrow tables of a fixed schema, so every count travels as a typed column (`bad`: the rows the
reader dropped, by reason; `without_component`: the rows it kept without a meta.pile_set_name; `streams`: the
documents, tokens and trained tokens per split and component).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

from neoxray.pipelines import fs
from neoxray.pipelines.chat import ChatEncoder, iter_chats
from neoxray.pipelines.dataset_format import CHAT, TEXT, text_hash64, token_dtype, validation_threshold
from neoxray.pipelines.packing import ChunkStreams
from neoxray.pipelines.pile import iter_documents, iter_prompt_completions

UNKNOWN_COMPONENT = "unknown"
"""The component of a document whose row has no meta.pile_set_name."""


def _bad_rows_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("reason", pa.string()), ("rows", pa.int64())]))


def chunk_schema():
    """Stage 1's rows: one chunk of one input file. With content prompt-completion, `texts` holds the completions
    and `prompts` their prompts (else `prompts` is empty); with content chat, `texts` holds conversations (their
    messages as canonical JSON, `neoxray.pipelines.chat`). The file's bad-row counts travel with its last chunk."""
    import pyarrow as pa

    return pa.schema(
        [
            ("file_idx", pa.int64()),
            ("chunk_idx", pa.int64()),
            ("last", pa.bool_()),
            ("texts", pa.list_(pa.string())),
            ("prompts", pa.list_(pa.string())),
            ("components", pa.list_(pa.string())),
            ("bad", _bad_rows_type()),
            ("without_component", pa.int64()),
        ]
    )


def tokenized_schema():
    """Stage 2's rows: one tokenized chunk: its streams' file (`path`, empty when it held no document), the text it
    held (`text_bytes`), its bad-row counts and, per stream, documents, tokens and loss tokens."""
    import pyarrow as pa

    stream = pa.struct(
        [
            ("split", pa.int8()),
            ("component", pa.string()),
            ("documents", pa.int64()),
            ("tokens", pa.int64()),
            ("loss_tokens", pa.int64()),
        ]
    )
    return pa.schema(
        [
            ("file_idx", pa.int64()),
            ("chunk_idx", pa.int64()),
            ("last", pa.bool_()),
            ("path", pa.string()),
            ("text_bytes", pa.int64()),
            ("bad", _bad_rows_type()),
            ("without_component", pa.int64()),
            ("streams", pa.list_(stream)),
        ]
    )


# ------------------------------------------------------------------------------------------ stage 1: reading
def read_chunks(batch, text_key: str, chunk_bytes: int, content: str = TEXT) -> Iterator:
    """Ray Data batch of input files ({file_idx, path}) -> each file's documents in order, in single-row tables
    of `chunk_schema()`, a chunk per about `chunk_bytes` characters (prompt and completion both count)."""
    for item in batch.to_pylist():
        yield from _file_chunks(int(item["file_idx"]), str(item["path"]), text_key, chunk_bytes, content)


def _file_chunks(file_idx: int, path: str, text_key: str, chunk_bytes: int, content: str) -> Iterator:
    import pyarrow as pa

    bad: Counter = Counter()
    unlabelled: Counter = Counter()
    chunk = {"texts": [], "prompts": [], "components": []}
    chunk_idx = size = 0

    def table(last: bool):
        row = {"file_idx": file_idx, "chunk_idx": chunk_idx, "last": last, **chunk, "bad": [], "without_component": 0}
        if last:  # the file's counts are complete once it is read to its end
            row["bad"] = [{"reason": k, "rows": n} for k, n in sorted(bad.items())]
            row["without_component"] = sum(unlabelled.values())
        return pa.Table.from_pylist([row], schema=chunk_schema())

    if content == TEXT:
        docs = ((None, text, name) for text, name in iter_documents(path, text_key, bad, unlabelled))
    elif content == CHAT:
        docs = ((None, text, name) for text, name in iter_chats(path, bad, unlabelled))
    else:
        docs = iter_prompt_completions(path, bad, unlabelled)
    for prompt, text, name in docs:
        chunk["texts"].append(text)
        chunk["components"].append(UNKNOWN_COMPONENT if name is None else name)
        size += len(text)
        if prompt is not None:
            chunk["prompts"].append(prompt)
            size += len(prompt)
        if size >= chunk_bytes:
            yield table(False)
            chunk = {"texts": [], "prompts": [], "components": []}
            chunk_idx += 1
            size = 0
    yield table(True)


# --------------------------------------------------------------------------------------- stage 2: tokenizing
class Tokenize:
    """Ray Data actor: tokenizes chunks with the tokenizer the driver resolved (a `neoxray.model.tokenizer.Tokenizer`,
    shipped once per actor; its end-of-document id ends every document) and writes each chunk's token streams to
    `chunk_dir`. Documents go to train or validation by the hash of their text (`text_hash64`); with content
    prompt-completion, prompt and completion are encoded apart, so that the loss mask's boundary is exact; with
    content chat, conversations are rendered with the chat template `chat_template` (`chat.template_spec`) and
    masked by `chat.ChatEncoder`, which counts the ones it cannot use in the chunk's `bad`."""

    def __init__(
        self,
        tokenizer,
        val_fraction: float,
        by_component: bool,
        content: str,
        chunk_dir: str,
        chat_template: dict | None = None,
    ):
        # the Rust thread pool reads this once, at its first use: one tokenizer thread per actor (it reserves a CPU)
        os.environ["RAYON_NUM_THREADS"] = "1"
        backend = tokenizer.backend
        self.encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self.eod = tokenizer.eod_id
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.threshold = validation_threshold(val_fraction)
        self.by_component = by_component
        self.masked = content != TEXT
        self.chunk_dir = chunk_dir
        self.chat = ChatEncoder(tokenizer, chat_template) if content == CHAT else None

    def __call__(self, batch):
        import pyarrow as pa

        return pa.Table.from_pylist([self._chunk(row) for row in batch.to_pylist()], schema=tokenized_schema())

    def _chunk(self, row: dict) -> dict:
        if self.chat is not None:
            return self._chat_chunk(row)
        texts, comps = row["texts"], row["components"]
        encodings = self.encode(texts, add_special_tokens=False) if texts else []
        prompts = row["prompts"] if self.masked else [None] * len(texts)
        prompt_encodings = self.encode(prompts, add_special_tokens=False) if self.masked and texts else prompts
        streams = ChunkStreams(self.eod, self.dtype, self.masked)
        counts: dict[tuple[int, str], list[int]] = {}  # (split, component) -> [documents, tokens, loss tokens]
        text_bytes = 0
        for text, prompt, comp, enc, prompt_enc in zip(texts, prompts, comps, encodings, prompt_encodings):
            data = text.encode("utf-8") if prompt is None else prompt.encode("utf-8") + text.encode("utf-8")
            text_bytes += len(data)
            split = 1 if text_hash64(data) < self.threshold else 0
            prompt_ids = [] if prompt_enc is None else prompt_enc.ids
            streams.add((split, comp if self.by_component else ""), prompt_ids, enc.ids)
            c = counts.setdefault((split, comp), [0, 0, 0])
            c[0] += 1
            c[1] += len(prompt_ids) + len(enc.ids) + 1
            c[2] += len(enc.ids) + 1  # every token of a text, the completion and its EOD of a prompt-completion
        path = fs.join(self.chunk_dir, f"f{row['file_idx']:05d}-c{row['chunk_idx']:07d}.arrow")
        return {
            **{k: row[k] for k in ("file_idx", "chunk_idx", "last", "bad", "without_component")},
            "path": path if streams.write(path) else "",
            "text_bytes": text_bytes,
            "streams": [
                {"split": s, "component": c, "documents": n[0], "tokens": n[1], "loss_tokens": n[2]}
                for (s, c), n in sorted(counts.items())
            ],
        }

    def _chat_chunk(self, row: dict) -> dict:
        """`_chunk` for conversations: each one's ids and mask come from the template (`ChatEncoder`); the split
        is by the hash of its messages' canonical JSON."""
        streams = ChunkStreams(self.eod, self.dtype, True)
        bad = Counter({b["reason"]: b["rows"] for b in row["bad"]})
        counts: dict[tuple[int, str], list[int]] = {}  # (split, component) -> [documents, tokens, loss tokens]
        text_bytes = 0
        for text, comp in zip(row["texts"], row["components"]):
            data = text.encode("utf-8")
            text_bytes += len(data)
            encoded = self.chat.encode(text, bad)
            if encoded is None:
                continue
            ids, mask = encoded
            split = 1 if text_hash64(data) < self.threshold else 0
            streams.add_masked((split, comp if self.by_component else ""), ids, mask)
            c = counts.setdefault((split, comp), [0, 0, 0])
            c[0] += 1
            c[1] += len(ids)
            c[2] += sum(mask)
        path = fs.join(self.chunk_dir, f"f{row['file_idx']:05d}-c{row['chunk_idx']:07d}.arrow")
        return {
            **{k: row[k] for k in ("file_idx", "chunk_idx", "last", "without_component")},
            "bad": [{"reason": k, "rows": n} for k, n in sorted(bad.items())],
            "path": path if streams.write(path) else "",
            "text_bytes": text_bytes,
            "streams": [
                {"split": s, "component": c, "documents": n[0], "tokens": n[1], "loss_tokens": n[2]}
                for (s, c), n in sorted(counts.items())
            ],
        }
