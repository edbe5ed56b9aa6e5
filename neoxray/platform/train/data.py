"""What a training worker reads: this data-parallel rank's micro-batches of the prepared dataset(s), in
the deterministic order, from any `consumed_samples` on (`neoxray.pipelines.reader`), and the tokenizer
the data was prepared with (stored beside the manifest, saved into every checkpoint)."""

from __future__ import annotations

from pathlib import Path

from neoxray.errors import NeoxrayError


def make_data_fn(cfg):
    """`data_fn(engine, split, consumed_samples)` -> iterator of this rank's `MicroBatch`es: labels with -100
    where the data's loss mask drops them (prompt-completion), each micro-batch weighted by its share of the
    global batch's trained labels (`neoxray.platform.train.engine`). The data's row length was checked against
    the model before any worker started (`preflight`); token ids past the model's vocabulary are refused here,
    batch by batch (a manifest can understate its vocabulary)."""
    from neoxray.pipelines.dataset_format import GLOBAL_TRAINED_LABELS, INPUT_IDS, LABELS, LOSS_MASK
    from neoxray.pipelines.reader import iter_batches, open_blend
    from neoxray.platform.train.engine import IGNORE_INDEX, micro_batch

    def data_fn(engine, split: str, consumed_samples: int):
        paths = cfg.data.paths()
        if split != "train" and cfg.data.validation_path:
            paths, split = [cfg.data.validation_path], "validation" if split == "validation" else split
        blend = open_blend(paths, cfg.data.weights if split == "train" else None, split=split, seed=cfg.data.seed)
        dp, vocab = engine.layout[0], engine.model_config.vocab_size
        accumulation = engine.ds_engine.gradient_accumulation_steps()
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
            labels = batch[LABELS]
            if LOSS_MASK in batch:
                labels = labels.masked_fill(~batch[LOSS_MASK], IGNORE_INDEX)
            trained = int(batch[GLOBAL_TRAINED_LABELS])
            here = int((labels != IGNORE_INDEX).sum())
            yield micro_batch(batch[INPUT_IDS], labels, here * accumulation * dp / trained if trained else 0.0)

    return data_fn


def load_run_tokenizer(cfg):
    """The tokenizer saved beside the first dataset's manifest (`DIR/tokenizer/`), or None."""
    from neoxray.model.tokenizer import TOKENIZER_FILE, Tokenizer
    from neoxray.pipelines.dataset_format import TOKENIZER_DIR
    from neoxray.pipelines.reader import parse_data_spec

    path, _ = parse_data_spec(cfg.data.paths()[0])
    tok_dir = Path(path) / TOKENIZER_DIR
    return Tokenizer.load(tok_dir) if (tok_dir / TOKENIZER_FILE).exists() else None
