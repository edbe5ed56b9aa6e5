"""What a training worker reads: this data-parallel rank's micro-batches of the prepared dataset(s), in
the deterministic order, from any `consumed_samples` on (`neoxray.pipelines.reader`), and the tokenizer
the data was prepared with (stored beside the manifest, saved into every checkpoint)."""

from __future__ import annotations

from pathlib import Path

from neoxray.errors import NeoxrayError


def make_data_fn(cfg):
    """`data_fn(engine, split, consumed_samples)` -> iterator of (input_ids, labels) micro-batches. For masked
    data (prompt-completion) labels is (labels with -100 where the loss mask drops them, GAS * dp / the global
    batch's trained labels): `neoxray.platform.train.engine.training_loss` turns it into the mean over the
    global batch's trained labels."""
    import torch

    from neoxray.pipelines.dataset_format import GLOBAL_TRAINED_LABELS, INPUT_IDS, LABELS, LOSS_MASK
    from neoxray.pipelines.reader import iter_batches, open_blend
    from neoxray.platform.train.engine import IGNORE_INDEX

    def data_fn(engine, split: str, consumed_samples: int):
        paths = cfg.data.paths()
        if split != "train" and cfg.data.validation_path:
            paths, split = [cfg.data.validation_path], "validation" if split == "validation" else split
        blend = open_blend(paths, cfg.data.weights if split == "train" else None, split=split, seed=cfg.data.seed)
        seq = engine.seq_len
        if blend.seq_len != seq:
            raise NeoxrayError(
                f"data.path {paths}: rows hold {blend.seq_len} + 1 tokens, but train.seq_len is {seq}; prepare the "
                f"data with --seq-len {seq} or set train.seq_len={blend.seq_len}"
            )
        dp, vocab = engine.layout[0], engine.model_config.vocab_size
        for batch in iter_batches(
            blend,
            cfg.train.global_batch,
            dp_rank=engine.coord.dp,
            dp_size=dp,
            micro_batch_size=cfg.train.micro_batch,
            seed=cfg.data.seed,
            consumed_samples=consumed_samples,
            split=split,
        ):
            top = max(int(batch[INPUT_IDS].max()), int(batch[LABELS].max()))
            if top >= vocab:
                raise NeoxrayError(
                    f"data.path {paths}: token id {top} at or past the model's vocabulary of {vocab} "
                    f"(model.vocab_size); the data does not fit this model"
                )
            if LOSS_MASK not in batch:
                yield batch[INPUT_IDS], batch[LABELS]
                continue
            trained = int(batch[GLOBAL_TRAINED_LABELS])
            scale = engine.engine.gradient_accumulation_steps() * dp / trained if trained else 0.0
            labels = batch[LABELS].masked_fill(~batch[LOSS_MASK], IGNORE_INDEX)
            yield batch[INPUT_IDS], (labels, torch.tensor([scale], dtype=torch.float32))

    return data_fn


def load_run_tokenizer(cfg):
    """The tokenizer saved beside the first dataset's manifest (`DIR/tokenizer/`), or None."""
    from neoxray.model.tokenizer import TOKENIZER_FILE, Tokenizer
    from neoxray.pipelines.dataset_format import TOKENIZER_DIR
    from neoxray.pipelines.reader import parse_data_spec

    path, _ = parse_data_spec(cfg.data.paths()[0])
    tok_dir = Path(path) / TOKENIZER_DIR
    return Tokenizer.load(tok_dir) if (tok_dir / TOKENIZER_FILE).exists() else None
