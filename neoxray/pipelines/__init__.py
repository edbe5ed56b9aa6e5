"""Data: Pile-format shards -> tokenized, packed Parquet datasets -> training batches. Knows data formats and Ray
Data, not the model.

- `pile`: streaming reader of .jsonl / .jsonl.gz / .jsonl.zst shards, bad rows counted by reason
- `fs`: local paths and URIs (s3://, gs://, any fsspec protocol) through pyarrow filesystems
- `prepare`: `neoxray prepare` on Ray Data (tokenizer actor pool, per-file packing, manifest.json last)
- `reader`: `PackedDataset`, `BlendedDataset`, `BatchSampler`, `iter_batches`, `ray_dataset` for training

The dataset format, mixing and determinism are described in docs/data.md.
"""
