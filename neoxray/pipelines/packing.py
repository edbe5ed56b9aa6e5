"""Stage 3 of `neoxray prepare`: one input file's token streams -> Parquet rows of seq_len + 1 token ids.

    DIR/.tmp-*/chunks/f<file>-c<chunk>.arrow     written by the tokenizer actors (one row per split and
      |                                          component of the chunk: its ids, EOD after every document)
      v
    pack_file (a Ray task per input file)        concatenates each stream (split, component) in chunk order and
      |                                          cuts it into rows of seq_len + 1 ids that cross document
      |                                          boundaries (GPT-NeoX packing); the remainder, fewer than
      |                                          seq_len + 1 tokens per file and stream, is dropped and counted
      v
    DIR/.tmp-*/{train,validation}/part-<file>[-<component tag>]-<part>.parquet

The file names, rows per file, row groups and compression are fixed (`layout_for`, `COMPRESSION`), so that the
same streams always give byte-identical files. The format itself is in `dataset_format` and docs/data.md.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from neoxray.pipelines import fs
from neoxray.pipelines.dataset_format import SPLITS, TOKEN_COLUMN

TARGET_FILE_BYTES = 64 << 20
"""Rows per Parquet file are chosen so that a file holds about this many bytes of (uncompressed) uint16 ids."""
TARGET_ROW_GROUP_BYTES = 256 << 10
"""Rows per row group: the reader's unit of random access (a shuffled read fetches one row group)."""
COMPRESSION = "zstd"


def component_tag(name: str) -> str:
    """A file-name-safe, collision-free tag for a component name (used in part-file names with --by-component)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40] or "x"
    return f"{slug}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:6]}"


def layout_for(seq_len: int, dtype: str) -> tuple[int, int]:
    """(rows per Parquet file, rows per row group) for rows of seq_len + 1 ids."""
    row_bytes = (seq_len + 1) * np.dtype(dtype).itemsize
    group = max(1, TARGET_ROW_GROUP_BYTES // row_bytes)
    per_file = max(group, (TARGET_FILE_BYTES // row_bytes) // group * group)
    return per_file, group


def _write_rows(path: str, values: np.ndarray, row_len: int, row_group_rows: int) -> None:
    """Write `values` (a whole number of rows of `row_len` ids) as one Parquet file of the fixed layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(values) // row_len
    offsets = pa.array(np.arange(0, n * row_len + 1, row_len, dtype=np.int32))
    table = pa.table({TOKEN_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(values))})
    with fs.open_output(path) as sink:
        pq.write_table(
            table,
            sink,
            row_group_size=row_group_rows,
            compression=COMPRESSION,
            use_dictionary=False,
            write_statistics=False,
        )


class _StreamPacker:
    """The packer of one stream (split, component) of one input file: buffers its ids and writes a part file
    each time `rows_per_file` rows are complete; `finish` writes the last, shorter part and drops the rest."""

    def __init__(
        self, file_idx: int, split: int, comp: str, out_dir: str, row_len: int, rows_per_file: int, row_group_rows: int
    ):
        self.file_idx, self.split, self.comp = file_idx, split, comp
        self.out_dir, self.row_len = out_dir, row_len
        self.rows_per_file, self.row_group_rows = rows_per_file, row_group_rows
        self.per_file_tokens = rows_per_file * row_len
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.tokens = 0
        self.parts: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_len += len(ids)
        self.tokens += len(ids)
        while self.pending_len >= self.per_file_tokens:
            self.emit(self.rows_per_file)

    def emit(self, rows: int) -> None:
        buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        take = rows * self.row_len
        tag = f"-{component_tag(self.comp)}" if self.comp else ""
        name = f"part-{self.file_idx:05d}{tag}-{len(self.parts):05d}.parquet"
        split_name = SPLITS[self.split]
        _write_rows(fs.join(self.out_dir, split_name, name), buf[:take], self.row_len, self.row_group_rows)
        self.parts.append({"path": f"{split_name}/{name}", "rows": rows, "component": self.comp or None})
        rest = buf[take:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)

    def finish(self) -> dict:
        rows = self.pending_len // self.row_len
        if rows:
            self.emit(rows)
        return {
            "file_idx": self.file_idx,
            "split": SPLITS[self.split],
            "component": self.comp or None,
            "tokens": self.tokens,
            "dropped_tokens": self.pending_len,
            "parts": self.parts,
        }


def pack_file(
    file_idx: int, chunk_paths: list[str], out_dir: str, seq_len: int, rows_per_file: int, row_group_rows: int
) -> list[dict]:
    """Pack one input file's token streams (chunk files, in order) into Parquet rows of seq_len + 1 ids.

    Returns one entry per stream (split, component): its part files and how many tokens the packing dropped.
    """
    import pyarrow as pa

    streams: dict[tuple[int, str], _StreamPacker] = {}
    for path in chunk_paths:
        with fs.open_random_access(path) as f:
            table = pa.ipc.open_file(f).read_all()
        for split, comp, ids in zip(table["split"].to_pylist(), table["component"].to_pylist(), table["ids"]):
            key = (split, comp)
            if key not in streams:
                streams[key] = _StreamPacker(file_idx, split, comp, out_dir, seq_len + 1, rows_per_file, row_group_rows)
            streams[key].add(ids.values.to_numpy(zero_copy_only=False))
    return [streams[k].finish() for k in sorted(streams)]
