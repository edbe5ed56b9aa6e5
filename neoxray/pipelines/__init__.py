"""Data: Pile-format shards -> tokenized, packed Parquet datasets -> training batches. Knows data formats and Ray
Data, not the platform (it uses the model's tokenizer, and `neoxray.ray_connection` to reach Ray).

- `pile`: streaming reader of .txt / .jsonl / .jsonl.gz / .jsonl.zst shards, bad rows counted by reason
- `fs`: local paths and URIs (s3://, gs://, any fsspec protocol) through pyarrow filesystems
- `dataset_format`: the prepared-dataset format (manifest.json, splits, column and batch-key names, the label
  shift, token dtype, the split rule) and `read_manifest`, shared by the writer and the reader
- `prepare`: `neoxray prepare` on Ray Data: the driver (`PrepareJob`: checks, temporary folder, commit, progress,
  manifest.json last)
- `tokenizing`: the reading and tokenizing stages of `prepare` (read tasks, the tokenizer actor pool)
- `packing`: the per-file packing stage of `prepare` (token streams -> Parquet rows of seq_len + 1 ids)
- `packed_dataset`: `PackedDataset` (one prepared split's rows by index) and `ray_dataset`
- `reader`: the training order: `BlendedDataset`, `BatchSampler`, `iter_batches`
- `tokenizer_training`: `neoxray tokenizer train`, a byte-level BPE trained on files and shards

The dataset format, mixing and determinism are described in docs/data.md.
"""
