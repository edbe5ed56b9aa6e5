"""Feed training from prepared datasets (the output of `neoxray prepare`): a deterministic global order, a
disjoint share of every global batch per data-parallel rank, resume without replay, and mixing.

Index-based: nothing is streamed through a shuffle buffer, so any position of the order can be reached directly.

- `PackedDataset(path, split, component)`: the rows of one prepared dataset, in storage order (the manifest's
  file order). `take(rows)` reads only the Parquet row groups that hold those rows (with a small LRU cache).
- `BlendedDataset(datasets, weights, seed)`: the training order, an endless sequence of samples: sample i of one
  dataset is row `permute(i mod R)` of epoch `i // R` (a keyed Feistel bijection per epoch); with several, a
  fixed interleaving schedule keeps every dataset's share of any prefix within a sample or two of its weight
  (as GPT-NeoX's greedy blend does), each walking its own shuffled epochs. Computed from the index alone (exact
  arithmetic): O(1) memory, no replay, the same on every machine and numpy version.
- `BatchSampler`: global batch s covers samples [s*G, (s+1)*G); data-parallel rank r of D gets the slice
  [s*G + r*G/D, s*G + (r+1)*G/D), cut into micro-batches. It starts at `consumed_samples` (from a checkpoint).
  Tensor- and pipeline-parallel peers pass the same dp_rank and therefore get identical batches.
- `iter_batches(...)`: the above as dicts of torch tensors: input_ids = row[:-1], labels = row[1:], for masked data
  loss_mask = mask[1:], and the number of trained labels of the whole global batch (to normalise the loss by).
- `ray_dataset(path)`: a prepared split as a `ray.data.Dataset` (`get_dataset_shard`, evaluation, inspection); the
  resumable order is `iter_batches` in each Ray Train worker with its own dp rank (it needs no Ray at all).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from neoxray.errors import NeoxrayError
from neoxray.pipelines import fs
from neoxray.pipelines.dataset_format import (
    GLOBAL_TRAINED_LABELS,
    INPUT_IDS,
    LABELS,
    LOSS_MASK,
    LOSS_MASK_COLUMN,
    SPLITS,
    TEXT,
    TOKEN_COLUMN,
    TRAINED_COLUMN,
    content_of,
    read_manifest,
)

BLEND_PERIOD = 1 << 16
"""Weights are quantized to integers summing to about this; the blend schedule repeats with this period."""
FEISTEL_ROUNDS = 6

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


# ---------------------------------------------------------------------------------------------- permutation
def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (seed, dataset index, epoch, ...): BLAKE2b of their decimal text."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(indices, n: int, key: int) -> np.ndarray:
    """The images of `indices` (each in [0, n)) under a pseudo-random bijection of [0, n) chosen by `key`.

    A balanced Feistel network on the smallest even number of bits covering n, with cycle walking for values
    that land in [n, 2^bits); 6 rounds of a splitmix64-style round function.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if n <= 0:
        raise ValueError("permute: n must be positive")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"permute: indices must be in [0, {n})")
    if n == 1:
        return np.zeros_like(idx)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(derive_key(key, r)) for r in range(FEISTEL_ROUNDS)]

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix(right, rk) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        y = once(idx.astype(np.uint64).reshape(-1))
        out_of_range = y >= np.uint64(n)
        while out_of_range.any():
            y[out_of_range] = once(y[out_of_range])
            out_of_range = y >= np.uint64(n)
    return y.astype(np.int64).reshape(idx.shape)


# ------------------------------------------------------------------------------------------- packed dataset
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
            column = self._parquet(f).read(columns=[TRAINED_COLUMN]).column(0)
            counts = column.to_numpy().astype(np.int64)
            if len(counts) != self._starts[f + 1] - self._starts[f]:
                raise NeoxrayError(f"{self.files[f]}: its {TRAINED_COLUMN} column does not match its rows")
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
        columns = [TOKEN_COLUMN, LOSS_MASK_COLUMN] if self.masked else [TOKEN_COLUMN]
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


# ------------------------------------------------------------------------------------------------- blending
def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """'DIR' -> (DIR, None); 'DIR#Component' -> (DIR, 'Component') (datasets prepared with --by-component)."""
    path, sep, component = spec.partition("#")
    return path, (component if sep else None)


class BlendedDataset:
    """The deterministic training order over one or more `PackedDataset`s (an endless sequence of samples).

    `weights` are sample proportions (normalised; default equal). See the module docstring for the order.
    Masked and unmasked datasets may be blended (`masked` when any is): unmasked rows train every label.
    """

    def __init__(self, datasets: Sequence[PackedDataset], weights: Sequence[float] | None = None, seed: int = 0):
        datasets = list(datasets)
        if not datasets:
            raise NeoxrayError("a blend needs at least one dataset")
        if weights is None:
            weights = [1.0] * len(datasets)
        weights = [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise NeoxrayError(f"{len(weights)} weights for {len(datasets)} datasets")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise NeoxrayError(f"blend weights must be non-negative with a positive sum, got {weights}")
        seq = {d.seq_len for d in datasets}
        if len(seq) != 1:
            raise NeoxrayError(
                "blended datasets must share seq_len; got " + ", ".join(f"{d.path}: {d.seq_len}" for d in datasets)
            )
        for d, w in zip(datasets, weights):
            if w > 0 and len(d) == 0:
                raise NeoxrayError(f"{d!r} has no rows but a positive blend weight")
        self.datasets, self.seed = datasets, int(seed)
        self.seq_len = datasets[0].seq_len
        self.dtype = np.result_type(*[d.dtype for d in datasets])
        self.masked = any(d.masked for d in datasets)
        total = sum(weights)
        self.weights = [w / total for w in weights]
        if len(datasets) == 1:
            counts = np.array([1], dtype=np.int64)
        else:
            counts = np.array([int(round(w * BLEND_PERIOD)) for w in self.weights], dtype=np.int64)
            counts[(counts == 0) & (np.array(self.weights) > 0)] = 1
        self._counts = counts
        self.period = int(counts.sum())
        # event k of dataset d (k < counts[d]) happens at time (2k + 1) / (2 counts[d]); merging all events in
        # time order (ties by dataset index) spreads each dataset evenly: an exact low-discrepancy interleaving
        ds_idx = np.concatenate([np.full(c, d, dtype=np.int64) for d, c in enumerate(counts)])
        ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        times = (2 * ranks + 1) / (2.0 * counts[ds_idx])
        order = np.lexsort((ds_idx, times))
        self._schedule_ds = ds_idx[order]
        self._schedule_rank = ranks[order]

    def __repr__(self) -> str:
        parts = ", ".join(f"{d!r}: {w:.4f}" for d, w in zip(self.datasets, self.weights))
        return f"BlendedDataset({parts}, seed={self.seed})"

    def locate(self, samples) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, row in that dataset) of each sample index of the order."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        if len(samples) and samples.min() < 0:
            raise IndexError("sample indices must be non-negative")
        period, offset = np.divmod(samples, self.period)
        ds = self._schedule_ds[offset]
        j = period * self._counts[ds] + self._schedule_rank[offset]  # the j-th sample drawn from dataset ds
        rows = np.empty_like(j)
        sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        epoch, pos = np.divmod(j, np.maximum(sizes[ds], 1))
        keys = ds * (1 << 40) + epoch
        for key in np.unique(keys):
            sel = keys == key
            d, e = int(key >> 40), int(key & ((1 << 40) - 1))
            rows[sel] = permute(pos[sel], int(sizes[d]), derive_key(self.seed, d, e))
        return ds, rows

    def take(self, samples) -> np.ndarray:
        """Samples of the order as an array [len(samples), seq_len + 1]."""
        return self._take(samples, with_mask=False)[0]

    def take_with_mask(self, samples) -> tuple[np.ndarray, np.ndarray]:
        """(samples as in `take`, their loss masks: uint8 [len(samples), seq_len + 1], all ones where unmasked)."""
        return self._take(samples, with_mask=True)  # type: ignore[return-value]

    def _take(self, samples, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
        ds, rows = self.locate(samples)
        out = np.empty((len(rows), self.seq_len + 1), dtype=self.dtype)
        mask = np.empty((len(rows), self.seq_len + 1), dtype=np.uint8) if with_mask else None
        for d in np.unique(ds):
            sel, data = ds == d, self.datasets[int(d)]
            if mask is None:
                out[sel] = data.take(rows[sel])
            else:
                out[sel], mask[sel] = data.take_with_mask(rows[sel])
        return out, mask

    def trained_labels(self, samples) -> np.ndarray:
        """Per sample, how many of its seq_len labels are trained (int64; reads no ids and no masks)."""
        ds, rows = self.locate(samples)
        out = np.empty(len(rows), dtype=np.int64)
        for d in np.unique(ds):
            sel = ds == d
            out[sel] = self.datasets[int(d)].trained_labels(rows[sel])
        return out

    def global_trained_labels(self, step: int, global_batch_size: int) -> int:
        """Trained labels in global batch `step` (samples [step * G, (step + 1) * G)), the same on every rank: the
        divisor of the summed token losses of all its micro-batches. G * seq_len when nothing is masked."""
        if not self.masked:
            return global_batch_size * self.seq_len
        start = step * global_batch_size
        return int(self.trained_labels(np.arange(start, start + global_batch_size, dtype=np.int64)).sum())


def open_blend(
    specs: Sequence[str] | str, weights: Sequence[float] | None = None, split: str = "train", seed: int = 0
) -> BlendedDataset:
    """A BlendedDataset from data specs ('DIR' or 'DIR#Component'), with optional weights."""
    if isinstance(specs, str):
        specs = [specs]
    return BlendedDataset([PackedDataset(p, split, c) for p, c in map(parse_data_spec, specs)], weights, seed)


# --------------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class BatchSampler:
    """Which samples of the order each data-parallel rank reads, micro-batch by micro-batch."""

    global_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1
    micro_batch_size: int | None = None
    """Defaults to the whole per-rank share (global_batch_size / dp_size)."""
    consumed_samples: int = 0
    """Samples of the order already consumed (from a checkpoint): iteration starts with the next global batch."""

    def __post_init__(self):
        g, d = self.global_batch_size, self.dp_size
        if g < 1 or d < 1:
            raise NeoxrayError(f"global batch size ({g}) and dp size ({d}) must be positive")
        if g % d:
            raise NeoxrayError(f"global batch size {g} is not divisible by the data-parallel size {d}")
        if not 0 <= self.dp_rank < d:
            raise NeoxrayError(f"dp rank {self.dp_rank} is not in [0, {d})")
        m = self.micro
        if m < 1 or self.per_rank % m:
            raise NeoxrayError(f"micro-batch size {m} does not divide the per-rank batch {self.per_rank}")
        if self.consumed_samples < 0 or self.consumed_samples % g:
            raise NeoxrayError(
                f"consumed_samples {self.consumed_samples} is not a multiple of the global batch size {g}"
            )

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def micro(self) -> int:
        return self.per_rank if self.micro_batch_size is None else self.micro_batch_size

    @property
    def start_step(self) -> int:
        return self.consumed_samples // self.global_batch_size

    def rank_samples(self, step: int) -> np.ndarray:
        """This rank's sample indices of global batch `step` (absolute step, counted from sample 0)."""
        start = step * self.global_batch_size + self.dp_rank * self.per_rank
        return np.arange(start, start + self.per_rank, dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """(step, sample indices of one micro-batch), endlessly, from `consumed_samples` on."""
        step = self.start_step
        while True:
            share = self.rank_samples(step)
            for k in range(0, self.per_rank, self.micro):
                yield step, share[k : k + self.micro]
            step += 1


def _as_order(data, split: str, seed: int) -> BlendedDataset:
    if isinstance(data, BlendedDataset):
        return data
    if isinstance(data, PackedDataset):
        return BlendedDataset([data], seed=seed)
    if isinstance(data, str):
        return open_blend([data], split=split, seed=seed)
    if isinstance(data, (list, tuple)):
        return open_blend(list(data), split=split, seed=seed)
    raise TypeError(f"cannot read training data from {type(data).__name__}")


def _to_batch(step: int, samples: np.ndarray, fetched: tuple, as_torch: bool) -> dict:
    rows, mask, trained = fetched
    rows = rows.astype(np.int64)
    batch = {INPUT_IDS: rows[:, :-1], LABELS: rows[:, 1:], "sample_idx": samples, "step": step}
    if mask is not None:
        batch[LOSS_MASK] = mask[:, 1:].astype(bool)
    batch[GLOBAL_TRAINED_LABELS] = trained
    if as_torch:
        import torch

        for k in (INPUT_IDS, LABELS, LOSS_MASK, "sample_idx"):
            if k in batch:
                batch[k] = torch.from_numpy(np.ascontiguousarray(batch[k]))
    return batch


def iter_batches(
    data,
    global_batch_size: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    micro_batch_size: int | None = None,
    seed: int = 0,
    consumed_samples: int = 0,
    num_steps: int | None = None,
    split: str = "train",
    as_torch: bool = True,
    prefetch: int = 2,
) -> Iterator[dict]:
    """This data-parallel rank's micro-batches, in the deterministic order, from `consumed_samples` on.

    `data`: a prepared folder ('DIR' or 'DIR#Component'), a list of them (equal weights), a `PackedDataset`
    or a `BlendedDataset` (its own seed then applies). Each item is a dict: `input_ids` and `labels` ([b,
    seq_len], int64; labels are input_ids shifted by one), `sample_idx` ([b], positions in the order), `step`
    (the global batch it belongs to) and `global_trained_labels` (int: trained labels in that whole global
    batch); when the data is masked also `loss_mask` ([b, seq_len], bool, aligned with labels: False means
    set the label to -100). `num_steps` global batches are produced (None: endless). Reads run `prefetch`
    micro-batches ahead in a background thread. Works without Ray.
    """
    order = _as_order(data, split, seed)
    sampler = BatchSampler(global_batch_size, dp_rank, dp_size, micro_batch_size, consumed_samples)
    last: list = [None, 0]  # (global batch, its trained labels): counted once per global batch

    def fetch(step: int, samples: np.ndarray) -> tuple:
        if last[0] != step:
            last[:] = step, order.global_trained_labels(step, global_batch_size)
        return (*order._take(samples, with_mask=order.masked), last[1])

    stop = None if num_steps is None else sampler.start_step + int(num_steps)

    def plan() -> Iterator[tuple[int, np.ndarray]]:
        for step, samples in sampler:
            if stop is not None and step >= stop:
                return
            yield step, samples

    if prefetch <= 0:
        for step, samples in plan():
            yield _to_batch(step, samples, fetch(step, samples), as_torch)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neoxray-data")
    queue: list = []
    try:
        todo = plan()
        for step, samples in todo:
            queue.append((step, samples, pool.submit(fetch, step, samples)))
            if len(queue) > prefetch:
                s, idx, fut = queue.pop(0)
                yield _to_batch(s, idx, fut.result(), as_torch)
        while queue:
            s, idx, fut = queue.pop(0)
            yield _to_batch(s, idx, fut.result(), as_torch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------- Ray Data
def _rows_to_training(batch: dict) -> dict:
    rows = np.stack([np.asarray(r, dtype=np.int64) for r in batch[TOKEN_COLUMN]])
    out = {INPUT_IDS: rows[:, :-1], LABELS: rows[:, 1:]}
    if LOSS_MASK_COLUMN in batch:
        out[LOSS_MASK] = np.stack([np.asarray(m, dtype=bool) for m in batch[LOSS_MASK_COLUMN]])[:, 1:]
    return out


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
