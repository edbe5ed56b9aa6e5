"""Training checkpoints: layout-independent, self-describing, safetensors only.

A checkpoint directory (one per saved step, written through `ray.train.report(checkpoint=...)` or directly):

    meta.json                      step, consumed_samples, layout (dp, tp, pp), the resolved run config, the
                                   model config, tokenizer info, the list of shard files; written by rank 0
    shard-pp{P}-tp{T}.safetensors  written by the data-parallel rank 0 of each (pipeline stage, tensor rank):
                                   for each parameter of that stage, under its plain-model name N:
                                   "model/N" (the weights; the fp32 master copy under mixed precision),
                                   "exp_avg/N", "exp_avg_sq/N" (Adam moments, gathered from the ZeRO-1 shards);
                                   the header metadata records each tensor's tensor-parallel split dimension
    rng-{rank}.safetensors         each rank's RNG states (restored when the layout is unchanged)
    tokenizer.json, ...            the run's tokenizer, so the checkpoint can be exported alone

Because each tensor is stored with its tensor-parallel split dimension and its plain-model name, a checkpoint
saved under one (dp, tp, pp) loads under any other: shards are concatenated along the split dimension and
re-sliced for the new tensor-parallel size, and pipeline stages find their layers by name. A checkpoint
counts as complete only when `meta.json` is present and every shard it lists exists with the listed size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from neoxray.errors import NeoxrayError
from neoxray.model.tensor_parallel import shard

META = "meta.json"
FORMAT = "neoxray-checkpoint-v1"
OPT_KEYS = ("exp_avg", "exp_avg_sq")


def shard_name(pp: int, tp: int) -> str:
    return f"shard-pp{pp:02d}-tp{tp:02d}.safetensors"


# ---------------------------------------------------------------------------------------------------------
# reading tensors by plain-model name, for any target tensor-parallel rank and size
# ---------------------------------------------------------------------------------------------------------
class TensorSource:
    """Where a rank's parameters come from: `get(key, tp_dim, tp_rank, tp_size)` returns this rank's slice."""

    def get(self, key: str, tp_dim: int | None, tp_rank: int, tp_size: int) -> torch.Tensor:
        raise NotImplementedError

    def load_into(self, piece, prefix_key: str = "model/") -> None:
        """Fill a freshly built pipeline piece (any layout) from this source."""
        with torch.no_grad():
            for name, p in piece.canonical_parameters():
                dim = getattr(p, "tp_dim", None)
                t = self.get(prefix_key + name, dim, getattr(p, "tp_rank", 0), getattr(p, "tp_size", 1))
                if t.shape != p.shape:
                    raise NeoxrayError(f"{self}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                p.copy_(t)


class CheckpointSource(TensorSource):
    """A neoxray training checkpoint directory."""

    def __init__(self, path):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._index: dict[str, list[tuple[int, Path, int | None]]] = {}  # key -> [(tp rank, file, dim)]
        for entry in self.meta["shards"]:
            f = self.path / entry["file"]
            with safe_open(f, framework="pt") as sf:
                dims = json.loads((sf.metadata() or {}).get("tp_dims", "{}"))
                for key in sf.keys():
                    self._index.setdefault(key, []).append((entry["tp"], f, dims.get(key)))
        self.saved_tp = self.meta["layout"]["tp"]

    def __repr__(self):
        return f"checkpoint {self.path}"

    def keys(self):
        return list(self._index)

    def get(self, key, tp_dim, tp_rank, tp_size):
        entries = sorted(self._index.get(key, []))
        if not entries:
            raise NeoxrayError(f"{self.path}: checkpoint has no tensor {key!r}")
        saved_dim = entries[0][2]
        if saved_dim is None or len(entries) == 1:
            full = _read(entries[0][1], key)
            return full if tp_dim is None else shard(full, tp_dim, tp_rank, tp_size)
        if tp_dim is not None and tp_dim != saved_dim:
            raise NeoxrayError(f"{self.path}: {key} was split on dim {saved_dim}, the model splits dim {tp_dim}")
        if len(entries) == tp_size:  # same tensor-parallel size: this rank's own file
            return _read(entries[tp_rank][1], key)
        full = torch.cat([_read(f, key) for _, f, _ in entries], dim=saved_dim)
        return full if tp_dim is None else shard(full, tp_dim, tp_rank, tp_size)


class HFSource(TensorSource):
    """A Hugging Face GPT-NeoX directory (fine-tuning): each rank reads only its slice of each tensor."""

    def __init__(self, path):
        from neoxray.model.hf import from_hf_name, weight_files

        self.path = Path(path)
        self._files = {from_hf_name(k): (k, f) for k, f in weight_files(self.path).items()}

    def __repr__(self):
        return f"Hugging Face directory {self.path}"

    def get(self, key, tp_dim, tp_rank, tp_size):
        name = key.removeprefix("model/")
        if name not in self._files:
            raise NeoxrayError(f"{self.path}: no tensor for {name}")
        hf_name, f = self._files[name]
        with safe_open(f, framework="pt") as sf:
            sl = sf.get_slice(hf_name)
            if tp_dim is None or tp_size == 1:
                return sl[:]
            n = sl.get_shape()[tp_dim]
            if n % tp_size:
                raise NeoxrayError(f"{self.path}: {hf_name} dim {tp_dim} ({n}) not divisible by tensor parallel {tp_size}")
            lo, hi = tp_rank * n // tp_size, (tp_rank + 1) * n // tp_size
            return sl[lo:hi] if tp_dim == 0 else sl[:, lo:hi]


def _read(path: Path, key: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


# ---------------------------------------------------------------------------------------------------------
# meta.json and completeness
# ---------------------------------------------------------------------------------------------------------
def read_meta(path) -> dict:
    """meta.json of a complete checkpoint; a missing, foreign or incomplete checkpoint is a NeoxrayError."""
    path = Path(path)
    meta_path = path / META
    if not path.is_dir():
        raise NeoxrayError(f"checkpoint not found: {path}")
    if not meta_path.exists():
        raise NeoxrayError(f"{path}: no {META}; not a neoxray checkpoint, or one whose save did not finish")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise NeoxrayError(f"{meta_path}: invalid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise NeoxrayError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
    for entry in meta["shards"]:
        f = path / entry["file"]
        if not f.exists() or f.stat().st_size != entry["bytes"]:
            raise NeoxrayError(f"{path}: incomplete checkpoint: shard {entry['file']} is missing or truncated")
    return meta


# ---------------------------------------------------------------------------------------------------------
# save (collective) and restore of optimizer state (collective)
# ---------------------------------------------------------------------------------------------------------
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


def save_checkpoint(engine, out_dir, extra_meta: dict, tokenizer=None) -> Path:
    """Write this rank's part of a checkpoint of `engine` (a TrainEngine) into `out_dir`. Collective: every
    rank calls it (ZeRO-1 states are gathered across data parallel). Returns out_dir."""
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
    save_file(rng, out / f"rng-{engine.rank:05d}.safetensors")
    written = None
    if c.dp == 0:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        f = out / shard_name(c.pp, c.tp)
        save_file(cpu, f, metadata={"tp_dims": json.dumps(dims)})
        written = {"file": f.name, "pp": c.pp, "tp": c.tp, "bytes": f.stat().st_size}
    # ranks may write to different machines' local directories (Ray uploads them into one): gather the list
    everyone = [None] * engine.world_size
    dist.all_gather_object(everyone, written)
    if engine.rank == 0:
        dp, tp, pp = engine.layout
        shards = sorted((w for w in everyone if w is not None), key=lambda w: (w["pp"], w["tp"]))
        if tokenizer is not None:
            tokenizer.save(out, model_max_length=engine.model_config.max_seq_len)
        meta = {
            "format": FORMAT,
            "step": engine.step,
            "consumed_samples": engine.consumed_samples,
            "layout": {"dp": dp, "tp": tp, "pp": pp},
            "model_config": engine.model_config.to_dict(),
            "precision": engine.cfg.train.precision,
            "loss_scale": _loss_scale(engine),
            "shards": shards,
            **extra_meta,
        }
        tmp = out / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, out / META)  # written last: its presence marks the checkpoint complete
    return out


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
            base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
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
    rng_file = source.path / f"rng-{engine.rank:05d}.safetensors"
    if same_layout and rng_file.exists():
        with safe_open(rng_file, framework="pt") as f:
            torch.set_rng_state(f.get_tensor("cpu"))
            if torch.cuda.is_available() and "cuda" in f.keys():
                torch.cuda.set_rng_state(f.get_tensor("cuda"))
    return meta


# ---------------------------------------------------------------------------------------------------------
# export: all shards merged into a Hugging Face GPT-NeoX directory
# ---------------------------------------------------------------------------------------------------------
def export_checkpoint(checkpoint_dir, out_dir, dtype: torch.dtype | None = None, max_shard_size="5GB") -> Path:
    """Merge a training checkpoint (any layout) into a Hugging Face GPT-NeoX directory with its tokenizer.
    Tensors are read one at a time; the merged model is built on the meta device and filled in place."""
    from neoxray.model.hf import save_pretrained
    from neoxray.model.tokenizer import Tokenizer

    model, source = load_checkpoint_model(checkpoint_dir)
    tokenizer = Tokenizer.load(source.path) if (source.path / "tokenizer.json").exists() else None
    dtype = dtype or checkpoint_dtype(source.meta)
    return save_pretrained(model, out_dir, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)


def checkpoint_dtype(meta: dict) -> torch.dtype:
    """The training precision of a checkpoint as a torch dtype (fp32 when it trained in fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(meta.get("precision"), torch.float32)


def load_checkpoint_model(checkpoint_dir, device="cpu", dtype: torch.dtype = torch.float32):
    """The whole plain model of a training checkpoint (any layout), built on the meta device and filled one
    tensor at a time -> (model, CheckpointSource)."""
    from neoxray.model.config import ModelConfig
    from neoxray.model.gptneox import GPTNeoX

    source = CheckpointSource(checkpoint_dir)
    config = ModelConfig.from_dict(source.meta["model_config"])
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source.get(f"model/{name}", None, 0, 1))
    return model.to(dtype), source
