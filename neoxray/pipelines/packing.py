"""Token streams: the chunk files the tokenizer actors of `neoxray prepare` write (`ChunkStreams`), and stage 3,
one input file's streams -> Parquet rows of seq_len + 1 token ids (`pack_file`).

    DIR/.tmp-*/chunks/f<file>-c<chunk>.arrow     written by the tokenizer actors (`ChunkStreams`: one row per
      |                                          split and component of the chunk: its ids, EOD after every
      |                                          document, and for masked content the loss mask of each id)
      v
    pack_file (a Ray task per input file)        concatenates each stream (split, component) in chunk order and
      |                                          cuts it into rows of seq_len + 1 ids that cross document
      |                                          boundaries (GPT-NeoX packing); the remainder, fewer than
      |                                          seq_len + 1 tokens per file and stream, is dropped and counted
      v
    DIR/.tmp-*/{train,validation}/part-<file>[-<component tag>]-<part>.parquet

A loss mask travels with its ids through every step (same buffers, same cuts), so it stays aligned across
document boundaries, row boundaries and the dropped remainder. The file names, rows per file, row groups and
compression are fixed (`layout_for`, `COMPRESSION`), so that the same streams always give byte-identical files.
The format itself is in `dataset_format` and docs/data.md.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from neoxray.pipelines import fs
from neoxray.pipelines.dataset_format import INPUT_IDS, LOSS_MASK, SPLITS, TRAINED_LABELS

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


class ChunkStreams:
    """One chunk's token streams, keyed by (split, component), as a tokenizer actor builds them: `add` appends
    a document (prompt ids, then its other ids, then EOD; the mask, when `masked`, is 0 on the prompt and 1 on the
    rest), `add_masked` one with its own mask, `write` stores them for `pack_file`."""

    def __init__(self, eod: int, dtype: str, masked: bool):
        self.eod, self.dtype, self.masked = int(eod), np.dtype(dtype), masked
        self.ids: dict[tuple[int, str], list[int]] = {}
        self.masks: dict[tuple[int, str], list[int]] = {}

    def add(self, key: tuple[int, str], prompt: list[int], ids: list[int]) -> None:
        stream = self.ids.get(key)
        if stream is None:
            stream = self.ids[key] = []
            self.masks[key] = []
        stream.extend(prompt)
        stream.extend(ids)
        stream.append(self.eod)
        if self.masked:
            mask = self.masks[key]
            mask.extend([0] * len(prompt))
            mask.extend([1] * (len(ids) + 1))

    def add_masked(self, key: tuple[int, str], ids: list[int], mask: list[int]) -> None:
        """Append a document whose ids (its end included: nothing is added) and mask the caller made (chat)."""
        self.ids.setdefault(key, []).extend(ids)
        self.masks.setdefault(key, []).extend(mask)

    def write(self, path: str) -> bool:
        """Write the streams as one Arrow IPC file at `path`; False (nothing written) when there are none."""
        import pyarrow as pa

        if not self.ids:
            return False
        keys = sorted(self.ids)
        columns = {
            "split": pa.array([k[0] for k in keys], pa.int8()),
            "component": pa.array([k[1] for k in keys], pa.string()),
            "ids": pa.array(
                [np.asarray(self.ids[k], dtype=self.dtype) for k in keys], pa.list_(pa.from_numpy_dtype(self.dtype))
            ),
        }
        if self.masked:
            columns["mask"] = pa.array([np.asarray(self.masks[k], dtype=np.uint8) for k in keys], pa.list_(pa.uint8()))
        table = pa.table(columns)
        with fs.open_output(path) as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return True


def _list_column(values: np.ndarray, row_len: int):
    import pyarrow as pa

    offsets = pa.array(np.arange(0, len(values) + 1, row_len, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values))


def _write_rows(path: str, values: np.ndarray, mask: np.ndarray | None, row_len: int, row_group_rows: int) -> int:
    """Write `values` (a whole number of rows of `row_len` ids) and their `mask` (None: unmasked content) as one
    Parquet file of the fixed layout. Returns the number of trained labels in it (mask 1 at positions 1..)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(values) // row_len
    columns = {INPUT_IDS: _list_column(values, row_len)}
    if mask is None:
        trained = n * (row_len - 1)
    else:
        per_row = mask.reshape(n, row_len)[:, 1:].sum(axis=1, dtype=np.int64)
        columns[LOSS_MASK] = _list_column(mask, row_len)
        columns[TRAINED_LABELS] = pa.array(per_row.astype(np.int32))
        trained = int(per_row.sum())
    with fs.open_output(path) as sink:
        pq.write_table(
            pa.table(columns),
            sink,
            row_group_size=row_group_rows,
            compression=COMPRESSION,
            use_dictionary=False,
            write_statistics=False,
        )
    return trained


class _StreamPacker:
    """The packer of one stream (split, component) of one input file: buffers its ids (and their mask) and writes
    a part file each time `rows_per_file` rows are complete; `finish` writes the last, shorter part and drops the
    rest."""

    def __init__(
        self, file_idx: int, split: int, comp: str, out_dir: str, row_len: int, rows_per_file: int, row_group_rows: int
    ):
        self.file_idx, self.split, self.comp = file_idx, split, comp
        self.out_dir, self.row_len = out_dir, row_len
        self.rows_per_file, self.row_group_rows = rows_per_file, row_group_rows
        self.per_file_tokens = rows_per_file * row_len
        self.pending: list[np.ndarray] = []
        self.pending_mask: list[np.ndarray] | None = None
        self.pending_len = 0
        self.tokens = self.rows = self.trained = 0
        self.parts: list[dict] = []

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None:
            if len(mask) != len(ids):
                raise ValueError(f"a stream of {len(ids)} ids has a mask of {len(mask)}")
            if self.pending_mask is None:
                self.pending_mask = []
            self.pending_mask.append(mask)
        self.pending.append(ids)
        self.pending_len += len(ids)
        self.tokens += len(ids)
        while self.pending_len >= self.per_file_tokens:
            self.emit(self.rows_per_file)

    @staticmethod
    def _cut(parts: list[np.ndarray], take: int) -> tuple[np.ndarray, list[np.ndarray]]:
        buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
        rest = buf[take:]
        return buf[:take], ([rest] if len(rest) else [])

    def emit(self, rows: int) -> None:
        take = rows * self.row_len
        values, self.pending = self._cut(self.pending, take)
        mask = None
        if self.pending_mask is not None:
            mask, self.pending_mask = self._cut(self.pending_mask, take)
        self.pending_len -= take
        tag = f"-{component_tag(self.comp)}" if self.comp else ""
        name = f"part-{self.file_idx:05d}{tag}-{len(self.parts):05d}.parquet"
        split_name = SPLITS[self.split]
        path = fs.join(self.out_dir, split_name, name)
        self.trained += _write_rows(path, values, mask, self.row_len, self.row_group_rows)
        self.rows += rows
        self.parts.append({"path": f"{split_name}/{name}", "rows": rows, "component": self.comp or None})

    def finish(self) -> dict:
        rows = self.pending_len // self.row_len
        if rows:
            self.emit(rows)
        return {
            "file_idx": self.file_idx,
            "split": SPLITS[self.split],
            "component": self.comp or None,
            "tokens": self.tokens,
            "rows": self.rows,
            "trained_labels": self.trained,
            "dropped_tokens": self.pending_len,
            "parts": self.parts,
        }


def pack_file(
    file_idx: int, chunk_paths: list[str], out_dir: str, seq_len: int, rows_per_file: int, row_group_rows: int
) -> list[dict]:
    """Pack one input file's token streams (chunk files, in order) into Parquet rows of seq_len + 1 ids (and their
    loss masks, when the chunks carry them).

    Returns one entry per stream (split, component): its part files, rows, trained labels and how many tokens the
    packing dropped.
    """
    import pyarrow as pa

    streams: dict[tuple[int, str], _StreamPacker] = {}
    for path in chunk_paths:
        with fs.open_random_access(path) as f:
            table = pa.ipc.open_file(f).read_all()
        masks = table["mask"] if "mask" in table.column_names else [None] * table.num_rows
        for split, comp, ids, mask in zip(
            table["split"].to_pylist(), table["component"].to_pylist(), table["ids"], masks
        ):
            key = (split, comp)
            if key not in streams:
                streams[key] = _StreamPacker(file_idx, split, comp, out_dir, seq_len + 1, rows_per_file, row_group_rows)
            streams[key].add(
                ids.values.to_numpy(zero_copy_only=False),
                None if mask is None else mask.values.to_numpy(zero_copy_only=False),
            )
    return [streams[k].finish() for k in sorted(streams)]
