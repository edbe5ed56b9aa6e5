"""The run config: shipped configs load and validate, overrides, errors that name their key, the learning-rate
schedule, and the DeepSpeed config (checked by DeepSpeed's own config parser)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import pytest

from neoxray.errors import NeoxrayError
from neoxray.model.config import get_preset
from neoxray.platform.train.config import (
    RunConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    gradient_accumulation_steps,
    load_run_config,
    save_run_config,
    to_dict,
    validate,
    with_layout,
)
from neoxray.platform.train.deepspeed_config import deepspeed_config
from tests.conftest import ROOT

# configs/serve*.yaml are Ray Serve configs (another schema); every other YAML there is a run config
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("serve"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(fn, *args) -> str:
    with pytest.raises(NeoxrayError) as e:
        fn(*args)
    return str(e.value)


def invalid(*overrides: str) -> str:
    """The validation error of the defaults with these overrides."""
    return error_of(validate, load_run_config(None, list(overrides)))


# ------------------------------------------------------------------------------------------ shipped configs
def test_the_shipped_run_configs_are_there():
    names = {p.name for p in RUN_CONFIGS}
    assert {"tiny-cpu.yaml", "neox-20b.yaml", "pythia-1.4b.yaml"} <= names


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny preset model as a Hugging Face directory: the base a shipped LoRA config names (the demo's)."""
    from neoxray.model.gptneox import build_model
    from neoxray.model.hf import save_pretrained

    out = tmp_path_factory.mktemp("base") / "tiny"
    save_pretrained(build_model(get_preset("tiny"), seed=0), out)
    return out


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_loads_and_validates(path, tiny_base):
    cfg = load_run_config(path)
    if cfg.lora.rank:  # its base is the demo's trained model: here a tiny model of the same shape
        cfg = load_run_config(path, [f"model.init_from={tiny_base}"])
    validate(cfg)
    assert gradient_accumulation_steps(cfg) * cfg.train.micro_batch * cfg.parallel.data == cfg.train.global_batch
    assert cfg.seq_len() <= cfg.model_config().max_seq_len
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.train.global_batch


def test_tiny_cpu_is_the_readme_demo_layout():
    cfg = load_run_config(ROOT / "configs" / "tiny-cpu.yaml")
    p = cfg.parallel
    assert (p.data, p.tensor, p.pipeline, p.world_size()) == (2, 2, 2, 8)
    assert cfg.model.preset == "tiny" and cfg.train.precision == "fp32" and cfg.train.device == "cpu"
    assert p.resolve_backend(use_gpu=False) == "gloo"
    assert cfg.data.path == "runs/demo/data"
    assert gradient_accumulation_steps(cfg) == 4


def test_neox_20b_is_the_paper_run():
    cfg = load_run_config(ROOT / "configs" / "neox-20b.yaml")
    p, t, o = cfg.parallel, cfg.train, cfg.optimizer
    assert (p.data, p.tensor, p.pipeline, p.zero_stage, p.world_size()) == (12, 2, 4, 1, 96)
    assert (t.global_batch, t.micro_batch, cfg.seq_len(), t.steps) == (1536, 4, 2048, 150_000)
    assert gradient_accumulation_steps(cfg) == 32
    assert (o.lr, o.min_lr, o.betas, o.eps) == (0.97e-4, 0.97e-5, [0.9, 0.95], 1e-8)
    assert (o.weight_decay, o.clip_grad) == (0.01, 1.0)
    assert cfg.warmup_steps() == 1500 and cfg.decay_steps() == 150_000 and cfg.schedule.style == "cosine"
    assert cfg.model_config().activation_checkpointing and cfg.model_config().n_layers == 44
    assert cfg.checkpoint.every == 500
    ds = deepspeed_config(cfg)
    assert ds["gradient_accumulation_steps"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["fp16"]["initial_scale_power"] == 12 and ds["fp16"]["loss_scale_window"] == 1000
    assert ds["bf16"] == {"enabled": False}


def test_pythia_1_4b_hyperparameters():
    cfg = load_run_config(ROOT / "configs" / "pythia-1.4b.yaml")
    assert (cfg.train.global_batch, cfg.seq_len(), cfg.train.steps) == (1024, 2048, 143_000)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr) == (2e-4, 2e-5)
    assert cfg.warmup_steps() == 1430 and cfg.train.precision == "fp16"
    assert math.isclose(cfg.lr_at(cfg.train.steps), 2e-5)


# ------------------------------------------------------------------------------------- defaults and files
def test_defaults_are_a_valid_run():
    cfg = load_run_config(None)
    assert cfg == RunConfig()
    validate(cfg)
    assert cfg.seq_len() == get_preset("tiny").max_seq_len
    assert cfg.run_path() == Path("runs/run")


def test_a_file_overrides_only_what_it_sets(tmp_path):
    p = write(tmp_path, "train:\n  steps: 7\noptimizer:\n  lr: 1e-3\n  betas: [0.8, 0.9]\nlogging:\n")
    cfg = load_run_config(p)
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 1e-3  # `1e-3` is a string to PyYAML; coerced
    assert cfg.optimizer.betas == [0.8, 0.9]
    default = RunConfig()
    assert cfg.train.global_batch == default.train.global_batch and cfg.logging == default.logging
    assert load_run_config(write(tmp_path, "", "empty.yaml")) == default


def test_overrides_of_each_kind(tmp_path):
    p = write(tmp_path, "parallel:\n  data: 4\ntrain:\n  steps: 100\n")
    cfg = load_run_config(
        p,
        [
            "parallel.data=2",  # int, over the file
            "train.steps=5",
            "model.preset=pythia-70m",  # string
            "data.path=/x",
            "optimizer.betas=[0.9,0.95]",  # list
            "optimizer.lr=3e-4",  # float written without a dot
            "optimizer.min_lr=0",  # int accepted for a float
            "model.activation_checkpointing=true",  # bool
            "schedule.warmup_steps=2",
            "data.validation_path=null",  # null
            "train.seq_len=",  # empty value is null
            "model.overrides.max_seq_len=512",  # one ModelConfig field
            "name=exp1",
            "logging.metrics_file=m.jsonl",
        ],
    )
    assert cfg.parallel.data == 2 and cfg.train.steps == 5
    assert cfg.model.preset == "pythia-70m" and cfg.data.path == "/x"
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.lr == 3e-4
    assert isinstance(cfg.optimizer.min_lr, float) and cfg.optimizer.min_lr == 0.0
    assert cfg.model.activation_checkpointing is True and cfg.schedule.warmup_steps == 2
    assert cfg.data.validation_path is None and cfg.train.seq_len is None
    assert cfg.name == "exp1" and cfg.logging.metrics_file == "m.jsonl"
    mc = cfg.model_config()
    assert mc.max_seq_len == 512 and mc.activation_checkpointing and mc.n_layers == get_preset("pythia-70m").n_layers
    assert cfg.seq_len() == 512
    validate(cfg)


def test_data_path_list_and_weights():
    cfg = load_run_config(None, ["data.path=[/a, /b]", "data.weights=[3, 1]"])
    assert cfg.data.paths() == ["/a", "/b"] and cfg.data.weights == [3.0, 1.0]
    validate(cfg)
    assert "data.weights has 1 entries but data.path has 2" in invalid("data.path=[/a, /b]", "data.weights=[1]")


def test_model_overrides_as_a_mapping(tmp_path):
    p = write(tmp_path, "model:\n  preset: tiny\n  overrides: {vocab_size: 1024, max_seq_len: 64}\n")
    cfg = load_run_config(p)
    assert cfg.model_config().vocab_size == 1024 and cfg.model_config().max_seq_len == 64
    longer = apply_overrides(cfg, ["train.seq_len=128"])
    assert "train.seq_len=128 exceeds the model's max_seq_len=64" in error_of(validate, longer)


def test_init_from_reads_the_architecture_from_the_directory(tmp_path):
    from neoxray.model.hf import config_to_hf

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config_to_hf(get_preset("tiny-seq", vocab_size=512))))
    cfg = load_run_config(None, [f"model.init_from={tmp_path / 'm'}", "model.preset=neox-20b"])
    mc = cfg.model_config()
    assert mc.vocab_size == 512 and mc.parallel_residual is False  # the directory's, not the preset's
    validate(cfg)
    msg = invalid(f"model.init_from={tmp_path / 'missing'}")
    assert "model.init_from=" in msg and "missing" in msg


def test_parallel_auto_defers_the_layout(tmp_path):
    cfg = load_run_config(write(tmp_path, "parallel: auto\n"))
    assert cfg.parallel.auto and (cfg.parallel.data, cfg.parallel.tensor, cfg.parallel.pipeline) == (None, None, None)
    validate(cfg)  # nothing to check against the model yet
    assert "parallel.data" in error_of(gradient_accumulation_steps, cfg)
    assert "not chosen" in error_of(deepspeed_config, cfg)
    chosen = with_layout(cfg, data=2, tensor=2, pipeline=1)
    validate(chosen)
    assert gradient_accumulation_steps(chosen) == 2
    # a pinned dimension is kept and still checked against the model
    pinned = load_run_config(None, ["parallel=auto", "parallel.tensor=3"])
    assert pinned.parallel.tensor == 3 and pinned.parallel.data is None
    assert "parallel.tensor=3 does not divide model.n_heads=4" in error_of(validate, pinned)
    # the override form, over a file with a fixed layout
    over = load_run_config(ROOT / "configs" / "tiny-cpu.yaml", ["parallel=auto"])
    assert over.parallel.auto and over.parallel.data is None
    # and without `auto`, an unset dimension is an error
    unset = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, auto=False, tensor=1, pipeline=1))
    assert "parallel.data is not set" in error_of(validate, unset)


# ------------------------------------------------------------------------------------------ loading errors
def test_unknown_key_in_a_file_names_the_dotted_key_the_file_and_a_suggestion(tmp_path):
    p = write(tmp_path, "optimizer:\n  lr: 0.1\n  weight_decya: 0.1\n")
    msg = error_of(load_run_config, p)
    assert "optimizer.weight_decya" in msg and str(p) in msg and "did you mean 'optimizer.weight_decay'" in msg


def test_unknown_section_and_misplaced_keys(tmp_path):
    p = write(tmp_path, "optimiser:\n  lr: 0.1\n")
    msg = error_of(load_run_config, p)
    assert "'optimiser'" in msg and str(p) in msg and "did you mean 'optimizer'" in msg
    msg = error_of(load_run_config, None, ["optimiser.lr=1"])
    assert "optimiser.lr" in msg and "did you mean 'optimizer.lr'" in msg
    msg = error_of(load_run_config, None, ["train.lr=1"])  # right key, wrong section
    assert "train.lr" in msg and "did you mean 'optimizer.lr'" in msg
    msg = error_of(load_run_config, None, ["model.overrides.vocab=1"])
    assert "model.overrides.vocab" in msg and "did you mean 'model.overrides.vocab_size'" in msg
    assert "train.steps.x" in error_of(load_run_config, None, ["train.steps.x=1"])


def test_wrong_types_name_the_key(tmp_path):
    p = write(tmp_path, "train:\n  steps: many\n")
    msg = error_of(load_run_config, p)
    assert "train.steps must be an integer" in msg and "'many'" in msg and str(p) in msg
    assert "train.steps must be an integer" in error_of(load_run_config, None, ["train.steps=2.5"])
    assert "optimizer.betas" in error_of(load_run_config, None, ["optimizer.betas=0.9"])
    assert "item 1" in error_of(load_run_config, None, ["optimizer.betas=[0.9, x]"])
    assert "model.activation_checkpointing must be true or false" in error_of(
        load_run_config, None, ["model.activation_checkpointing=1"]
    )
    msg = error_of(load_run_config, None, ["train.precision=bf61"])
    assert "train.precision must be one of" in msg and "did you mean 'bf16'" in msg
    assert "model.overrides.n_layers must be an integer" in error_of(
        load_run_config, None, ["model.overrides.n_layers=two"]
    )
    assert "train must be a mapping" in error_of(load_run_config, write(tmp_path, "train: 5\n", "t.yaml"))
    assert "a mapping of sections" in error_of(load_run_config, write(tmp_path, "- 1\n", "l.yaml"))
    assert "expected KEY=VALUE" in error_of(load_run_config, None, ["train.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = error_of(load_run_config, missing)
    assert str(missing) in msg and "not found" in msg
    bad = write(tmp_path, "train:\n  steps: 5\n  seed: [1, 2\nlogging: {}\n", "bad.yaml")
    msg = error_of(load_run_config, bad)
    assert str(bad) in msg and "invalid YAML" in msg and "line 4" in msg


def test_check_paths_names_missing_local_paths_and_leaves_uris_to_the_reader(tmp_path):
    from neoxray.platform.train.config import check_paths

    cfg = load_run_config(None, [f"data.path={tmp_path / 'nope'}", f"model.init_from={tmp_path / 'none'}"])
    msg = error_of(check_paths, cfg)
    assert f"data.path={tmp_path / 'nope'}" in msg and f"model.init_from={tmp_path / 'none'}" in msg
    check_paths(load_run_config(None, ["data.path=s3://bucket/pile-neox"]))  # no error: read remotely


# ------------------------------------------------------------------------------------------- validation
def test_tensor_parallel_must_divide_heads_vocab_and_ffn():
    msg = invalid("parallel.tensor=3")
    assert "parallel.tensor=3 does not divide model.n_heads=4" in msg
    assert "model.vocab_size=4096" in msg and "valid parallel.tensor values: 1, 2, 4" in msg
    assert "model.vocab_size=4097" in invalid("parallel.tensor=2", "model.overrides.vocab_size=4097")


def test_pipeline_must_not_exceed_layers():
    msg = invalid("parallel.pipeline=3")
    assert "parallel.pipeline=3 exceeds model.n_layers=2" in msg
    assert "parallel.pipeline=0 must be >= 1" in invalid("parallel.pipeline=0")


def test_global_batch_must_divide_by_micro_batch_times_data():
    msg = invalid("train.global_batch=10", "train.micro_batch=2", "parallel.data=2")
    assert "train.global_batch=10" in msg and "train.micro_batch=2 x parallel.data=2 = 4" in msg
    assert "8 or 12" in msg  # the nearest valid global batches
    assert "1, 5" in msg  # micro-batches that would divide 10 / 2
    assert "train.global_batch=10 is not divisible" in error_of(
        gradient_accumulation_steps, load_run_config(None, ["train.global_batch=10", "parallel.data=2"])
    )


def test_other_validation_errors_name_their_keys():
    assert "train.seq_len=512 exceeds the model's max_seq_len=256" in invalid("train.seq_len=512")
    assert "parallel.zero_stage=2" in invalid("parallel.zero_stage=2")
    assert "optimizer.lr=0.0001 is below optimizer.min_lr=0.001" in invalid(
        "optimizer.lr=1e-4", "optimizer.min_lr=1e-3"
    )
    assert "train.steps=0 must be > 0" in invalid("train.steps=0")
    assert "checkpoint.every=-1" in invalid("checkpoint.every=-1")
    msg = invalid("model.preset=tinyy")
    assert "model.preset='tinyy'" in msg and "did you mean 'tiny'" in msg
    assert "schedule.warmup_steps=5 and schedule.warmup_fraction=0.1" in invalid(
        "schedule.warmup_steps=5", "schedule.warmup_fraction=0.1"
    )
    assert "optimizer.betas" in invalid("optimizer.betas=[0.9]")
    assert "train.precision=fp16 needs GPUs" in invalid("train.precision=fp16", "train.device=cpu")
    assert "parallel.pipeline_partition" in invalid("parallel.pipeline_partition=best")
    assert "name=" in invalid("name=a/b")
    assert "model.d_model (64) must be divisible by model.n_heads (3)" in invalid("model.overrides.n_heads=3")
    # every problem is reported at once
    msg = invalid("parallel.tensor=3", "train.steps=0")
    assert "parallel.tensor=3" in msg and "train.steps=0" in msg


def test_the_lora_section_is_checked_by_the_adapters_own_rules():
    """The validator reports a LoRA setup's problems in the words `LoRASpec` (the model's description of an adapter,
    `neoxray.model.lora_spec`) uses for them, beside the schema's own (rank 0: off; a base to train on)."""
    from neoxray.model.lora_spec import LoRASpec

    msg = invalid("lora.rank=4", "lora.alpha=0", "lora.dropout=1.5", "lora.targets=[query_key_value, mlp]")
    assert "lora.rank=4 trains adapters on a frozen base, but model.init_from is not set" in msg
    for kw in (dict(alpha=0.0), dict(dropout=1.5), dict(targets=["query_key_value", "mlp"])):
        assert error_of(functools.partial(LoRASpec, r=4, **kw)) in msg
    assert "lora.rank=-1 must be an integer >= 0" in invalid("lora.rank=-1")
    validate(load_run_config(None, ["lora.alpha=0"]))  # rank 0: no LoRA, nothing else of the section matters
    assert load_run_config(None, []).lora.targets == list(LoRASpec().targets)


# --------------------------------------------------------------------- values the optimizer cannot hold
def adamw_first_step_overflows(lr: float, beta1: float) -> bool:
    """torch's own AdamW, one step on an fp32 weight (the optimizer always steps on fp32 weights or fp32 master
    copies): does it raise 'value cannot be converted to type float without overflow'?"""
    import torch

    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 0.1)
    opt = torch.optim.AdamW([w], lr=lr, betas=(beta1, 0.95))
    try:
        opt.step()
    except RuntimeError as e:
        assert "without overflow" in str(e), e
        return True
    return False


@pytest.mark.parametrize(
    "lr, beta1",
    [(1e39, 0.9), (1e38, 0.9), (3.5e37, 0.9), (3.3e37, 0.9), (4e36, 0.99), (3e36, 0.99), (1e-3, 0.9), (1e20, 0.9)],
)
def test_an_lr_is_refused_exactly_when_adamws_step_overflows_float32(lr, beta1):
    """AdamW hands its step size lr / (1 - beta1^t), largest at the first step, to the fp32 weights as a scalar:
    beyond float32's range it raises deep inside a worker. Validation refuses exactly those values, naming the key
    (the reference is torch's AdamW itself)."""
    cfg = load_run_config(None, [f"optimizer.lr={lr}", "optimizer.min_lr=0", f"optimizer.betas=[{beta1}, 0.95]"])
    if adamw_first_step_overflows(lr, beta1):
        msg = error_of(validate, cfg)
        assert msg.startswith(f"optimizer.lr={lr} ") and "float32" in msg, msg
    else:
        validate(cfg)


def test_eps_and_weight_decay_beyond_float32_are_refused():
    """eps becomes float32 infinity in AdamW's denominator (every update silently zero), lr x weight_decay in its
    decay factor (every weight infinite)."""
    assert "optimizer.eps=1e+39" in invalid("optimizer.eps=1e39")
    msg = invalid("optimizer.lr=1e10", "optimizer.weight_decay=1e30")
    assert "optimizer.weight_decay=1e+30" in msg and "float32" in msg
    validate(load_run_config(None, ["optimizer.eps=1e30", "optimizer.lr=1e10", "optimizer.weight_decay=1e20"]))


@pytest.mark.e2e  # the CLI in a real process
@pytest.mark.parametrize("ray", [False, True], ids=["no-ray", "ray"])
def test_an_lr_beyond_float32_is_one_line_before_any_worker_starts(ray, prepared, ray_local, tmp_path):
    """`neoxray train` with optimizer.lr=1e39: one `neoxray: error:` line naming the key, no traceback, no retry,
    no run directory; on the Ray path the check runs before Ray is reached."""
    from tests.conftest import run_cli

    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "model.overrides.vocab_size=1024", "model.overrides.max_seq_len=32"]
    args += [f"data.path={prepared}", "train.global_batch=4", "train.steps=3", "schedule.warmup_steps=0"]
    args += ["optimizer.lr=1e39", "optimizer.min_lr=0", "logging.tensorboard=false"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = run_cli(*args, *([] if ray else ["--no-ray"]), check=False, env=env, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("neoxray: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("neoxray: error: optimizer.lr=1e+39 ") and "float32" in errors[0], errors[0]
    assert "restart" not in proc.stderr and "Ray dashboard" not in proc.stderr
    assert not run.exists()


# ---------------------------------------------------------------------------------------- the lr schedule
def test_cosine_schedule_shape():
    cfg = load_run_config(
        None, ["train.steps=100", "schedule.warmup_steps=10", "optimizer.lr=1e-3", "optimizer.min_lr=1e-4"]
    )
    lrs = [cfg.lr_at(s) for s in range(0, 121)]
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert lrs[5] == pytest.approx(0.5e-3)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # falling after it
    assert lrs[55] == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lrs[100] == pytest.approx(1e-4) and all(x == pytest.approx(1e-4) for x in lrs[100:])
    assert cfg.lr_multiplier(10) == pytest.approx(1.0)


def test_linear_constant_fraction_and_decay_steps():
    lin = load_run_config(
        None,
        [
            "train.steps=100",
            "schedule.warmup_steps=0",
            "schedule.style=linear",
            "optimizer.lr=1.0",
            "optimizer.min_lr=0.0",
        ],
    )
    assert [lin.lr_at(s) for s in (0, 25, 50, 100, 200)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    const = apply_overrides(lin, ["schedule.style=constant", "schedule.warmup_steps=4"])
    assert [const.lr_at(s) for s in (0, 2, 4, 50, 500)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    frac = apply_overrides(
        lin,
        [
            "schedule.warmup_steps=null",
            "schedule.warmup_fraction=0.1",
            "schedule.decay_steps=50",
            "schedule.style=cosine",
        ],
    )
    assert frac.warmup_steps() == 5 and frac.decay_steps() == 50
    assert frac.lr_at(5) == pytest.approx(1.0) and frac.lr_at(50) == pytest.approx(0.0)
    assert frac.lr_at(80) == 0.0  # min_lr after the decay, before train.steps


# ------------------------------------------------------------------------------------ the DeepSpeed config
@pytest.fixture(scope="module")
def deepspeed_parser():
    """Build DeepSpeed's own `DeepSpeedConfig` from our dict without a process group: its data-parallel world
    size comes from an `mpu` stub, the global rank is 0."""
    import deepspeed.comm as dist
    import deepspeed.runtime.config as ds_config

    def parse(d: dict, dp: int):
        class Mpu:
            def get_data_parallel_world_size(self):
                return dp

        mp = pytest.MonkeyPatch()
        mp.setattr(dist, "get_rank", lambda *a, **k: 0)
        try:
            return ds_config.DeepSpeedConfig(d, mpu=Mpu())
        finally:
            mp.undo()

    return parse


def _known_deepspeed_keys() -> set[str]:
    import deepspeed.runtime.constants as c
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    return {v for k, v in vars(c).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_config_contents(precision, deepspeed_parser):
    cfg = load_run_config(
        None,
        [
            "parallel.data=2",
            "train.global_batch=16",
            "train.micro_batch=2",
            "optimizer.clip_grad=0.5",
            f"train.precision={precision}",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 == gradient_accumulation_steps(cfg)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert set(ds) <= _known_deepspeed_keys()
    json.dumps(ds)  # JSON-serialisable
    parsed = deepspeed_parser(ds, dp=2)
    assert parsed.train_batch_size == 16 and parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == 1 and parsed.gradient_clipping == 0.5
    assert parsed.float16_config.enabled is (precision == "fp16")
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    if precision == "fp16":
        assert parsed.float16_config.loss_scale == 0  # dynamic
    if precision == "bf16":
        assert parsed.grad_accum_dtype == "fp32"


def test_deepspeed_parses_every_shipped_config(deepspeed_parser):
    for path in RUN_CONFIGS:
        cfg = load_run_config(path)
        parsed = deepspeed_parser(deepspeed_config(cfg), dp=cfg.parallel.data)
        assert parsed.train_batch_size == cfg.train.global_batch, path.name
        assert parsed.gradient_accumulation_steps == gradient_accumulation_steps(cfg), path.name
    neox = load_run_config(ROOT / "configs" / "neox-20b.yaml")
    parsed = deepspeed_parser(deepspeed_config(neox), dp=12)
    assert parsed.gradient_accumulation_steps == 32 and parsed.zero_optimization_stage == 1
    assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0
    assert parsed.float16_config.initial_scale_power == 12


def test_zero_stage_zero_and_bf16():
    ds = deepspeed_config(load_run_config(None, ["parallel.zero_stage=0", "train.precision=bf16"]))
    assert ds["zero_optimization"] == {"stage": 0} and "data_types" not in ds


# ------------------------------------------------------------------------------------------------- output
def test_yaml_dump_round_trips(tmp_path):
    cfg = load_run_config(ROOT / "configs" / "neox-20b.yaml", ["model.overrides.max_seq_len=4096"])
    path = save_run_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_run_config(path) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert not [p for p in path.parent.iterdir() if p.name != "config.yaml"]  # no temporary left behind
    auto = load_run_config(None, ["parallel=auto"])
    assert load_run_config(write(tmp_path, dump_yaml(auto), "auto.yaml")) == auto
    text = dump_yaml(cfg)
    assert text.index("model:") < text.index("parallel:") < text.index("train:")
    assert "betas: [0.9, 0.95]" in text
