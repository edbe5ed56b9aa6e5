"""Training without Ray: one process, or each process of a `torchrun --nproc-per-node N` launch (the world
comes from torchrun's environment; dp x tp x pp must equal it). Checkpoints go to RUN_DIR as under Ray Train;
rank 0 plans and checks the run as the Ray driver does (`preflight.plan_run`) and every rank takes its answer."""

from __future__ import annotations

import os
import sys
import time

from neoxray.errors import NeoxrayError
from neoxray.model.precision import resolve_device
from neoxray.platform.train.preflight import plan_run
from neoxray.platform.train.run_plan import RunPlan, start_run_dir


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_local(cfg, run_dir: str | None = None, verbose: bool = False, start_over: bool = False) -> list[dict]:
    """Plan and check the run on rank 0 (`preflight.plan_run`, as the Ray driver does; every rank takes its
    answer), then train this rank (rank 0 prints the progress and, at the end, a summary; DeepSpeed's own output
    only with `verbose`). `start_over`: train from step 0 in a run directory whose checkpoints are set aside.
    Returns this rank's per-step metrics."""
    import torch.distributed as dist

    from neoxray.platform.train.distributed import init_distributed
    from neoxray.platform.train.progress import summary
    from neoxray.platform.train.worker import Reporter, run_worker

    if verbose:
        os.environ["NEOXRAY_VERBOSE"] = "1"
    if cfg.eval.tasks:
        raise NeoxrayError(
            f"eval.tasks={cfg.eval.tasks} runs on Ray actors beside the training run: train on Ray (without "
            f"--no-ray), or evaluate checkpoints afterwards with `neoxray eval --model RUN_DIR`"
        )
    if resolve_device(cfg.train.device) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    init_distributed(cfg.parallel.backend, cfg.train.device)
    try:
        plan = _plan_on_rank_zero(cfg, run_dir, start_over)
        if plan.cfg.parallel.auto:
            from neoxray.platform.train.auto_layout import auto_layout_local

            plan = plan.with_cfg(auto_layout_local(plan.cfg))
        if dist.get_rank() == 0:
            start_run_dir(plan)
        started = time.monotonic()
        history = run_worker(plan, Reporter())
        if dist.get_rank() == 0:
            store = None
            if plan.store_uri:
                from neoxray.platform.run_store import RunStore

                store = RunStore(plan.store_uri)
            _say(summary(plan.run_dir, time.monotonic() - started, plan.cfg.logging.metrics_file, store=store))
        return history
    finally:  # a process group left alive aborts the interpreter at exit ("terminate called ...") after an error
        if dist.is_initialized():
            dist.destroy_process_group()


def _plan_on_rank_zero(cfg, run_dir, start_over: bool) -> RunPlan:
    """Rank 0 plans the run; every rank gets the plan (or rank 0's refusal, raised on every rank)."""
    import torch.distributed as dist

    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = plan_run(cfg, run_dir, _say, start_over=start_over).to_payload()
        except NeoxrayError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise NeoxrayError(box[0])
    return RunPlan.from_payload(box[0])
