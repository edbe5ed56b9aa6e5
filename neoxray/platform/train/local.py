"""Training without Ray: one process, or each process of a `torchrun --nproc-per-node N` launch (the world
comes from torchrun's environment; dp x tp x pp must equal it). Checkpoints go to RUN_DIR as under Ray Train;
rank 0 runs the same checks before training (`preflight`) and every rank takes its answer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from neoxray.errors import NeoxrayError
from neoxray.model.precision import resolve_device


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_local(cfg, run_dir: str | None = None, verbose: bool = False) -> list[dict]:
    """Validate and check the run, then train this rank (rank 0 prints the progress and, at the end, a summary;
    DeepSpeed's own output only with `verbose`). Returns this rank's per-step metrics."""
    import torch.distributed as dist

    from neoxray.platform.train.config import dump_yaml, from_dict, resolved, to_dict, validate
    from neoxray.platform.train.distributed import init_distributed
    from neoxray.platform.train.preflight import nothing_to_train, preflight
    from neoxray.platform.train.progress import summary
    from neoxray.platform.train.worker import Reporter, run_worker

    if verbose:
        os.environ["NEOXRAY_VERBOSE"] = "1"
    validate(cfg)
    if cfg.eval.tasks:
        raise NeoxrayError(
            f"eval.tasks={cfg.eval.tasks} runs on Ray actors beside the training run: train on Ray (without "
            f"--no-ray), or evaluate checkpoints afterwards with `neoxray eval --model RUN_DIR`"
        )
    cfg = resolved(cfg)
    run_dir = Path(run_dir or cfg.run_dir or Path("runs") / cfg.name).resolve()
    if resolve_device(cfg.train.device) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    init_distributed(cfg.parallel.backend, cfg.train.device)
    try:
        box: list = [None]
        if dist.get_rank() == 0:
            try:
                checked = preflight(cfg, run_dir, _say)
                if checked.finished_at is not None:
                    raise nothing_to_train(run_dir, checked, cfg.train.steps)
                box[0] = (to_dict(checked.cfg), checked.resume_from)
            except NeoxrayError as e:
                box[0] = str(e)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise NeoxrayError(box[0])
        cfg, resume_from = from_dict(box[0][0]), box[0][1]
        if cfg.parallel.auto:
            from neoxray.platform.train.auto_layout import auto_layout_local

            cfg = auto_layout_local(cfg)
        if dist.get_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        started = time.monotonic()
        history = run_worker(cfg, str(run_dir), Reporter(), resume_from)
        if dist.get_rank() == 0:
            _say(summary(run_dir, time.monotonic() - started, cfg.logging.metrics_file))
        return history
    finally:  # a process group left alive aborts the interpreter at exit ("terminate called ...") after an error
        if dist.is_initialized():
            dist.destroy_process_group()
