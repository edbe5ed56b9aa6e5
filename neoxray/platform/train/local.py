"""Training without Ray: one process, or each process of a `torchrun --nproc-per-node N` launch (the world
comes from torchrun's environment; dp x tp x pp must equal it). Checkpoints go to RUN_DIR as under Ray Train."""

from __future__ import annotations

import os
from pathlib import Path

from neoxray.model.precision import resolve_device


def run_local(cfg, run_dir: str | None = None) -> list[dict]:
    """Validate, then train this rank. Returns this rank's per-step metrics."""
    import torch.distributed as dist

    from neoxray.platform.train.config import dump_yaml, resolved, validate
    from neoxray.platform.train.distributed import init_distributed
    from neoxray.platform.train.worker import LocalReporter, run_worker

    validate(cfg)
    cfg = resolved(cfg)
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if resolve_device(cfg.train.device) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    init_distributed(cfg.parallel.backend, cfg.train.device)
    if cfg.parallel.auto:
        from neoxray.platform.train.auto_layout import auto_layout_local

        cfg = auto_layout_local(cfg)
    if dist.get_rank() == 0:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_worker(cfg, str(run_dir), LocalReporter(run_dir, keep=cfg.checkpoint.keep))
