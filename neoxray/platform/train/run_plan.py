"""What a training run's workers receive: a `RunPlan`, made once before any worker starts
(`neoxray.platform.train.preflight.plan_run`, under Ray and without it alike), carrying everything they need,
so that no worker reads a file to learn the model again; and the run directory, created (with config.yaml) only
once the plan stands."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from neoxray.model.config import ModelConfig


@dataclass(frozen=True)
class RunPlan:
    """One run as its workers receive it (`to_payload` / `from_payload`: plain data, so it travels to Ray Train
    workers and through a torch.distributed broadcast)."""

    cfg: object
    """The run config: validated, derived defaults written out, local paths absolute, the layout chosen."""
    model_config: ModelConfig
    """The model to build, resolved once (from the preset, or `model.init_from`'s files)."""
    run_dir: Path
    """Where checkpoints, metrics and config.yaml go."""
    resume_from: str | None = None
    """The checkpoint to continue from (weights, optimizer, step, data position), or None: a fresh start."""
    resume_verified: bool = True
    """False when `resume_from` is this run's unverified checkpoint (its first step's loss verifies it)."""
    newest_checkpoint: str | None = None
    """The newest verified checkpoint at the start: what a stop names until the run writes a newer one."""
    store_uri: str | None = None
    """The run directory's URI when the run lives on object storage; `run_dir` is then each node's local mirror
    of it (`neoxray.platform.run_store`)."""
    chat_template: dict | None = None
    """The chat template of the conversation datasets it trains on (their manifests' `chat_template`: source,
    sha256, text, special_tokens), or None (no chat data): recorded in every checkpoint's meta.json and
    tokenizer_config.json, and written by `neoxray export`."""

    def to_payload(self) -> dict:
        from neoxray.platform.train.config import to_dict

        return {
            "config": to_dict(self.cfg),
            "model_config": self.model_config.to_dict(),
            "run_dir": str(self.run_dir),
            "resume_from": self.resume_from,
            "resume_verified": self.resume_verified,
            "newest_checkpoint": self.newest_checkpoint,
            "store_uri": self.store_uri,
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> RunPlan:
        from neoxray.platform.train.config import from_dict

        return cls(
            cfg=from_dict(payload["config"]),
            model_config=ModelConfig.from_dict(payload["model_config"]),
            run_dir=Path(payload["run_dir"]),
            resume_from=payload.get("resume_from"),
            resume_verified=payload.get("resume_verified", True),
            newest_checkpoint=payload.get("newest_checkpoint"),
            store_uri=payload.get("store_uri"),
            chat_template=payload.get("chat_template"),
        )

    def with_cfg(self, cfg) -> RunPlan:
        """The same plan with another config (an `auto` layout chosen)."""
        return dataclasses.replace(self, cfg=cfg)


def start_run_dir(plan: RunPlan) -> None:
    """Create the run directory and write the run's resolved config into it (config.yaml; on object storage
    into the local mirror and the store)."""
    from neoxray.platform.train.config import dump_yaml

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "config.yaml").write_text(dump_yaml(plan.cfg))
    if plan.store_uri:
        from neoxray.platform.run_store import RunStore

        RunStore(plan.store_uri).upload(plan.run_dir / "config.yaml", "config.yaml")


def absolute_paths(cfg):
    """Local paths of the config made absolute: Ray Train workers run in their own working directory."""

    def fix(p):
        return p if (p is None or "://" in str(p) or os.path.isabs(p)) else os.path.abspath(p)

    data = dataclasses.replace(
        cfg.data,
        path=[fix(p) for p in cfg.data.path] if isinstance(cfg.data.path, list) else fix(cfg.data.path),
        validation_path=fix(cfg.data.validation_path),
    )
    return dataclasses.replace(
        cfg,
        data=data,
        model=dataclasses.replace(cfg.model, init_from=fix(cfg.model.init_from)),
        checkpoint=dataclasses.replace(cfg.checkpoint, load_from=fix(cfg.checkpoint.load_from)),
    )
