"""Feed training from prepared datasets (the output of `neoxray prepare`): a deterministic global order, a
disjoint share of every global batch per data-parallel rank, resume without replay, and mixing. Reading the rows
of one dataset is `neoxray.pipelines.packed_dataset`'s.

Index-based: nothing is streamed through a shuffle buffer, so any position of the order can be reached directly.

- `BlendedDataset(datasets, weights, seed)`: the training order over `PackedDataset`s, an endless sequence of
  samples: sample i of one dataset is row `permute(i mod R)` of epoch `i // R` (a keyed Feistel bijection per
  epoch); with several, a fixed interleaving schedule keeps every dataset's share of any prefix within a sample
  or two of its weight (as GPT-NeoX's greedy blend does), each walking its own shuffled epochs. Computed from the
  index alone (exact arithmetic): O(1) memory, no replay, the same on every machine and numpy version.
- `BatchSampler`: global batch s covers samples [s*G, (s+1)*G); data-parallel rank r of D gets the slice
  [s*G + r*G/D, s*G + (r+1)*G/D), cut into micro-batches. It starts at `consumed_samples` (from a checkpoint).
  Tensor- and pipeline-parallel peers pass the same dp_rank and therefore get identical batches.
- `iter_batches(...)`: the above as dicts of torch tensors (`dataset_format.labels_and_mask`: input_ids =
  row[:-1], labels = row[1:], for masked data loss_mask = mask[1:]), and the number of trained labels of the
  whole global batch (to normalise the loss by). It needs no Ray: each Ray Train worker runs it with its own dp
  rank (`packed_dataset.ray_dataset` is the unordered Ray Data view, for `get_dataset_shard` and inspection).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from neoxray.errors import NeoxrayError
from neoxray.pipelines.dataset_format import GLOBAL_TRAINED_LABELS, INPUT_IDS, LABELS, LOSS_MASK, labels_and_mask
from neoxray.pipelines.packed_dataset import PackedDataset

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
        done = self.consumed_samples
        if done < 0 or done % g:
            raise NeoxrayError(f"consumed_samples {done} is not a multiple of the global batch size {g}")

    @property
    def per_rank(self) -> int:
        """Samples of each global batch that this rank reads."""
        return self.global_batch_size // self.dp_size

    @property
    def micro(self) -> int:
        """Samples per micro-batch."""
        return self.per_rank if self.micro_batch_size is None else self.micro_batch_size

    @property
    def start_step(self) -> int:
        """The global batch that iteration starts with."""
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
    batch = labels_and_mask(rows.astype(np.int64), mask)
    batch.update({"sample_idx": samples, "step": step, GLOBAL_TRAINED_LABELS: trained})
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
