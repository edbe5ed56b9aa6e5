"""Reading a prepared dataset (the output of `neoxray prepare`): the rows of one split, by index, and the same
split as a Ray Data dataset.

- `PackedDataset(path, split, component)`: the rows of one prepared dataset, in storage order (the manifest's
  file order). `take(rows)` reads only the Parquet row groups that hold those rows (with a small LRU cache);
  `take_with_mask` adds their loss masks, `trained_labels` their trained-label counts.
- `ray_dataset(path)`: a prepared split as a `ray.data.Dataset` (`get_dataset_shard`, evaluation, inspection),
  with the training columns (`dataset_format.labels_and_mask`) or the stored ones.

The training order over one or more datasets, and each data-parallel rank's share of it, is
`neoxray.pipelines.reader`'s.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs
from neoxray.pipelines.dataset_format import (
    INPUT_IDS,
    LOSS_MASK,
    SPLITS,
    TEXT,
    TRAINED_LABELS,
    content_of,
    labels_and_mask,
    read_manifest,
)


class PackedDataset:
    """The rows of one split of a prepared dataset (optionally one component of it), in storage order.

    `masked`: the rows carry a loss mask (content prompt-completion). Text datasets, including those written
    before masks existed, are unmasked: every label is trained (their mask reads as all ones)."""

    def __init__(self, path: str, split: str = "train", component: str | None = None, cache_bytes: int = 64 << 20):
        self.path = fs.normalize(path)
        if split not in SPLITS:
            raise NeoxrayError(f"{path}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        self.manifest = read_manifest(self.path)
        self.split, self.component = split, component
        self.seq_len: int = int(self.manifest["seq_len"])
        self.row_length: int = self.seq_len + 1
        self.dtype = np.dtype(self.manifest["dtype"])
        self.content: str = content_of(self.manifest, self.path)
        self.masked: bool = self.content != TEXT
        entries = self.manifest["splits"][split]["files"]
        if component is not None:
            if not self.manifest["options"].get("by_component"):
                raise NeoxrayError(
                    f"{path}: prepared without --by-component, so rows mix components; "
                    f"component {component!r} cannot be selected"
                )
            available = sorted({e["component"] for e in entries})
            entries = [e for e in entries if e["component"] == component]
            if not entries:
                raise NeoxrayError(
                    f"{path}: no {split} rows of component {component!r} (available: {', '.join(available) or 'none'})"
                )
        self.files = [fs.join(self.path, e["path"]) for e in entries]
        self.file_components = [e.get("component") for e in entries]
        counts = np.array([int(e["rows"]) for e in entries], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_rows = int(self._starts[-1])
        self.cache_bytes = cache_bytes
        self._init_state()

    def _init_state(self) -> None:
        self._handles: OrderedDict = OrderedDict()
        self._group_index: dict[int, np.ndarray] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0
        self._trained: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_handles", "_group_index", "_cache", "_cached_bytes", "_trained"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_state()

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        comp = f", component={self.component!r}" if self.component else ""
        return f"PackedDataset({self.path!r}, split={self.split!r}{comp}, rows={self.num_rows}, seq_len={self.seq_len})"

    @property
    def components(self) -> list[str]:
        """Components present in this split (only when prepared with --by-component; else [])."""
        return sorted({c for c in self.file_components if c})

    def __getitem__(self, row: int) -> np.ndarray:
        if not -self.num_rows <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for {self.num_rows} rows")
        return self.take([row % self.num_rows])[0]

    def take(self, rows) -> np.ndarray:
        """Rows (storage order) as an array [len(rows), seq_len + 1] of the stored dtype."""
        return self._take(rows, with_mask=False)[0]

    def take_with_mask(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(rows as in `take`, their loss masks: uint8 [len(rows), seq_len + 1], aligned with the ids; all ones
        for unmasked data). The mask of label i (= id i + 1) is mask[i + 1]."""
        return self._take(rows, with_mask=True)  # type: ignore[return-value]

    def trained_labels(self, rows) -> np.ndarray:
        """Per row (storage order), how many of its seq_len labels are trained (int64 [len(rows)]): seq_len for
        unmasked data; else read from the rows' `trained_labels` column (each file's once, then kept: 4 bytes a
        row), without reading masks or ids."""
        rows = self._check_rows(rows)
        if not self.masked:
            return np.full(len(rows), self.seq_len, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.int64)
        file_idx = np.searchsorted(self._starts, rows, side="right") - 1
        for f in np.unique(file_idx):
            sel = file_idx == f
            out[sel] = self._file_trained(int(f))[rows[sel] - self._starts[f]]
        return out

    def _file_trained(self, f: int) -> np.ndarray:
        counts = self._trained.get(f)
        if counts is None:
            column = self._parquet(f).read(columns=[TRAINED_LABELS]).column(0)
            counts = column.to_numpy().astype(np.int64)
            if len(counts) != self._starts[f + 1] - self._starts[f]:
                raise NeoxrayError(f"{self.files[f]}: its {TRAINED_LABELS} column does not match its rows")
            self._trained[f] = counts
        return counts

    def _check_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows must be in [0, {self.num_rows}) for {self!r}")
        return rows

    def _take(self, rows, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
        rows = self._check_rows(rows)
        out = np.empty((len(rows), self.row_length), dtype=self.dtype)
        mask = np.ones((len(rows), self.row_length), dtype=np.uint8) if with_mask else None
        if not len(rows):
            return out, mask
        file_idx = np.searchsorted(self._starts, rows, side="right") - 1
        local = rows - self._starts[file_idx]
        for f in np.unique(file_idx):
            in_file = file_idx == f
            group_starts = self._group_starts(int(f))
            group = np.searchsorted(group_starts, local[in_file], side="right") - 1
            within = local[in_file] - group_starts[group]
            positions = np.flatnonzero(in_file)
            for g in np.unique(group):
                sel = group == g
                ids_block, mask_block = self._row_group(int(f), int(g))
                out[positions[sel]] = ids_block[within[sel]]
                if mask is not None and mask_block is not None:
                    mask[positions[sel]] = mask_block[within[sel]]
        return out, mask

    def _group_starts(self, f: int) -> np.ndarray:
        """First row (within file f) of each of its row groups, from the Parquet footer."""
        starts = self._group_index.get(f)
        if starts is None:
            meta = self._parquet(f).metadata
            counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            expected = int(self._starts[f + 1] - self._starts[f])
            if starts[-1] != expected:
                raise NeoxrayError(f"{self.files[f]}: holds {starts[-1]} rows, the manifest says {expected}")
            self._group_index[f] = starts
        return starts

    def _parquet(self, f: int):
        import pyarrow.parquet as pq

        handle = self._handles.get(f)
        if handle is None:
            try:
                handle = pq.ParquetFile(fs.open_random_access(self.files[f]))
            except NeoxrayError:
                raise
            except Exception as e:
                raise NeoxrayError(f"{self.files[f]}: not a readable Parquet file ({e})") from None
            self._handles[f] = handle
            if len(self._handles) > 64:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(f)
        return handle

    def _row_group(self, f: int, g: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [rows, seq_len + 1], loss mask of the same shape or None when unmasked) of row group g of file f."""
        key = (f, g)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        columns = [INPUT_IDS, LOSS_MASK] if self.masked else [INPUT_IDS]
        try:
            table = self._parquet(f).read_row_group(g, columns=columns)
        except (KeyError, ValueError) as e:
            raise NeoxrayError(f"{self.files[f]}: row group {g} lacks a column of {', '.join(columns)} ({e})") from None
        arrays = []
        for name in columns:
            column = table.column(name).combine_chunks()
            values = column.flatten().to_numpy()
            if len(values) != len(column) * self.row_length:
                raise NeoxrayError(f"{self.files[f]}: row group {g} does not hold rows of {self.row_length} {name}")
            arrays.append(values.reshape(len(column), self.row_length))
        mask_block = arrays[1].astype(np.uint8, copy=False) if self.masked else None
        block = (arrays[0].astype(self.dtype, copy=False), mask_block)
        self._cache[key] = block
        self._cached_bytes += sum(b.nbytes for b in block if b is not None)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(b.nbytes for b in old if b is not None)
        return block

    def iter_rows(self, batch_size: int = 256) -> Iterator[np.ndarray]:
        """All rows in storage order, in arrays of up to `batch_size` rows."""
        for start in range(0, self.num_rows, batch_size):
            yield self.take(np.arange(start, min(start + batch_size, self.num_rows)))


def _rows_to_training(batch: dict) -> dict:
    """A Ray Data batch of stored rows (and masks) -> its training columns."""
    rows = np.stack([np.asarray(r, dtype=np.int64) for r in batch[INPUT_IDS]])
    mask = np.stack([np.asarray(m, dtype=np.uint8) for m in batch[LOSS_MASK]]) if LOSS_MASK in batch else None
    return labels_and_mask(rows, mask)


def ray_dataset(path: str, split: str = "train", component: str | None = None, training_columns: bool = True):
    """A prepared split as a `ray.data.Dataset` (`ray.data.read_parquet` over the manifest's files).

    With `training_columns` (default) rows are {input_ids: [seq_len], labels: [seq_len]} int64 tensors (and, for
    masked data, loss_mask: [seq_len] bool, the mask of the labels), ready for `iter_torch_batches`; otherwise
    the stored columns (`input_ids` rows of seq_len + 1 ids; `loss_mask` and `trained_labels` when masked).
    Row order is Ray Data's, not the training order: for `ray.train.get_dataset_shard`, evaluation or
    inspection; resumable training uses `iter_batches` in each worker.
    """
    import ray.data

    data = PackedDataset(path, split, component)
    if not data.files:
        raise NeoxrayError(f"{path}: the {split} split has no rows")
    ds = ray.data.read_parquet(data.files)
    if training_columns:
        ds = ds.map_batches(_rows_to_training, batch_format="numpy")
    return ds
