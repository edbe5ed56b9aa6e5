"""The inference engine: continuous batching over a paged KV cache with prefix reuse, plain PyTorch and no Ray.
`neoxray serve` hosts one per model replica; `neoxray eval` (and evaluation during training) scores and
generates on it; the GPU benchmarks drive it directly."""
