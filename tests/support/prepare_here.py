"""`neoxray prepare` in this process, without Ray: the job's own run (checks, template, tokenizer folder, manifest,
commit) with its Ray Data pipeline replaced by the same three stages called one after the other here (the reader,
the tokenizer actor's class, the packer), for tests that need a small prepared dataset on disk and no cluster."""

from __future__ import annotations

import os
from unittest import mock

import pyarrow as pa


def _pipeline_here(job, tmp: str, progress: bool, say) -> tuple[list, list]:
    from neoxray.pipelines.packing import pack_file
    from neoxray.pipelines.tokenizing import Tokenize, read_chunks

    saved = dict(os.environ)  # the actor's class sets the tokenizer's thread count for its process
    chunk_dir = os.path.join(tmp, "chunks")
    tokenize = Tokenize(job.tok, job.val_fraction, job.by_component, job.content, chunk_dir, job.chat)
    os.environ.clear()
    os.environ.update(saved)
    chunks, packed = [], []
    for i, path in enumerate(job.files):
        batch = pa.Table.from_pylist([{"file_idx": i, "path": path}])
        rows = [tokenize(t).to_pylist()[0] for t in read_chunks(batch, job.text_key, job.chunk_bytes, job.content)]
        chunks += rows
        paths = [r["path"] for r in rows if r["path"]]
        packed += pack_file(i, paths, tmp, job.seq_len, job.rows_per_file, job.row_group_rows)
    return chunks, packed


def prepare_here(inputs, tokenizer, seq_len: int, output, **options):
    """`neoxray.pipelines.prepare.prepare(...)` (its `options` too) run in this process -> its PrepareResult."""
    from neoxray.pipelines import prepare

    with mock.patch.object(prepare, "_run_pipeline", _pipeline_here):
        return prepare.prepare(
            [str(p) for p in inputs],
            str(tokenizer),
            seq_len,
            str(output),
            progress=False,
            log=lambda _: None,
            **options,
        )
