"""Training checkpoints, write side: every rank saves its part (collective; ZeRO-1 optimizer state gathered across
data parallel) and a resumed engine gets its fp32 master weights, Adam moments, step, schedule, loss scale and
RNG back. The format and all reading live in `neoxray.platform.checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from neoxray.model.tokenizer import SAVED_FILES
from neoxray.platform.checkpoint import (
    FORMAT,
    META,
    OPT_KEYS,
    CheckpointSource,
    file_digest,
    rng_file_name,
    shard_name,
)


def _relink_zero_state(engine) -> None:
    """Point every parameter's ZeRO fragment at its Adam state. DeepSpeed links them after the first group's
    first step, when later param groups (our no-weight-decay group) have no state yet; link them again."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full_opt_state(engine, p, key):
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(p, key)  # all-reduce over the dp group under ZeRO
    if value is None:  # no ZeRO: the torch optimizer holds the state per parameter
        value = engine.optimizer.state[p][key] if hasattr(engine.optimizer, "state") else None
    return value


def _full_master(p):
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p)
    return p.detach().float() if value is None else value


def save_checkpoint(engine, out_dir, extra_meta: dict, tokenizer=None) -> list[str]:
    """Write this rank's part of a checkpoint of `engine` (a TrainEngine) into `out_dir`. Collective: every
    rank calls it (ZeRO-1 states are gathered across data parallel). Returns the names of the files this rank
    wrote (rank 0: meta.json and the tokenizer's files too; the tokenizer_config.json holds `extra_meta`'s
    `chat_template`, when the run trains on conversations, as exported models do)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _relink_zero_state(engine)
    tensors, dims = {}, {}
    for name, p in engine.named_parameters():
        tensors[f"model/{name}"] = _full_master(p)
        for key in OPT_KEYS:
            v = _full_opt_state(engine, p, key)
            if v is not None:
                tensors[f"{key}/{name}"] = v
        dim = getattr(p, "tp_dim", None)
        if dim is not None:
            for k in ("model/", *[f"{o}/" for o in OPT_KEYS]):
                dims[k + name] = dim
    c = engine.coord
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng_file = out / rng_file_name(engine.rank)
    save_file(rng, rng_file)
    files = {rng_file.name: _described(rng_file)}
    shard = None
    if c.dp == 0:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        f = out / shard_name(c.pp, c.tp)
        save_file(cpu, f, metadata={"tp_dims": json.dumps(dims)})
        files[f.name] = _described(f)
        shard = {"file": f.name, "pp": c.pp, "tp": c.tp, **files[f.name]}
    # every rank's file names, sizes and checksums, for rank 0's meta.json
    everyone = [None] * engine.world_size
    dist.all_gather_object(everyone, (shard, files))
    if engine.rank == 0:
        dp, tp, pp = engine.layout
        shards = sorted((w for w, _ in everyone if w is not None), key=lambda w: (w["pp"], w["tp"]))
        listed = {name: d for _, fs in everyone for name, d in fs.items()}
        identity = None
        if tokenizer is not None:
            chat = (extra_meta.get("chat_template") or {}).get("text")
            tokenizer.save(out, model_max_length=engine.model_config.max_seq_len, chat_template=chat)
            listed.update({name: _described(out / name) for name in SAVED_FILES})
            identity = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id}
        meta = {
            "format": FORMAT,
            "step": engine.step,
            "consumed_samples": engine.consumed_samples,
            "layout": {"dp": dp, "tp": tp, "pp": pp},
            "model_config": engine.model_config.to_dict(),
            "precision": engine.cfg.train.precision,
            "loss_scale": _loss_scale(engine),
            "shards": shards,
            "files": dict(sorted(listed.items())),
            "tokenizer": identity,
            **extra_meta,
        }
        tmp = out / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, out / META)  # written last: its presence marks the checkpoint complete
        return [*files, *(SAVED_FILES if tokenizer is not None else ()), META]
    return list(files)


def _described(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def _loss_scale(engine):
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None and engine.cfg.train.precision == "fp16" else None


def restore_training_state(engine, source: CheckpointSource) -> dict:
    """After `TrainEngine` was built with `loader=source.load_into`: restore the fp32 master weights, Adam
    moments, step, schedule, loss scale and (same layout only) RNG states. Collective."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    meta = source.meta
    step = int(meta["step"])
    zero = getattr(engine.optimizer, "single_partition_of_fp32_groups", None)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if zero is not None:  # ZeRO-1: create the (lazily made) Adam state on the flat fp32 partitions, then link
        for flat in zero:
            base.state[flat] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.zeros_like(flat),
                "exp_avg_sq": torch.zeros_like(flat),
            }
        _relink_zero_state(engine)
    with torch.no_grad():
        for name, p in engine.named_parameters():
            dim, r, n = getattr(p, "tp_dim", None), getattr(p, "tp_rank", 0), getattr(p, "tp_size", 1)
            master = source.get(f"model/{name}", dim, r, n).to(p.device, torch.float32)
            safe_set_full_fp32_param(p, master)
            for key in OPT_KEYS:
                value = source.get(f"{key}/{name}", dim, r, n).to(p.device, torch.float32)
                if zero is not None:
                    safe_set_full_optimizer_state(p, value, key)
                else:
                    st = base.state.setdefault(p, {})
                    st.setdefault("step", torch.tensor(float(step)))
                    st[key] = value.clone()
    if meta.get("loss_scale") and getattr(engine.optimizer, "loss_scaler", None) is not None:
        engine.optimizer.loss_scaler.cur_scale = meta["loss_scale"]
    engine.set_step(step, int(meta["consumed_samples"]))
    same_layout = meta["layout"] == dict(zip(("dp", "tp", "pp"), engine.layout))
    rng_file = source.file(rng_file_name(engine.rank)) if same_layout else None
    if rng_file is not None:
        with safe_open(rng_file, framework="pt") as f:
            torch.set_rng_state(f.get_tensor("cpu"))
            if torch.cuda.is_available() and "cuda" in f.keys():  # noqa: SIM118 (a safetensors handle)
                torch.cuda.set_rng_state(f.get_tensor("cuda"))
    return meta
