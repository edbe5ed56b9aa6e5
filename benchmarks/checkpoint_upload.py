"""The cost of checkpoints on a run on object storage: uploading in the background while the next steps train
(what neoxray does) against uploading inside the step, with a local-disk run as the baseline. The Pythia-160M
shape on CPU, layout (1, 1, 1), one process without Ray: the platform's own training loop
(`neoxray.platform.train.worker.train_worker`) on random token ids, a checkpoint every `--every` steps.

    local       run directory on the local disk (no upload): the cost of writing the checkpoints alone
    in-step     run on the store; each rank's upload is waited for as soon as it starts, inside the step
    background  run on the store; the upload runs while the next steps train, and the next checkpoint (or the
                end of the run) waits for it: neoxray's behaviour
    none        local disk, one checkpoint at the end only: the steps alone

The store is a second local folder reached through pyarrow (`--store file`, the default: a store at disk speed)
or moto's S3 server on 127.0.0.1 (`--store moto`, the tests' server: for small shapes only, since it keeps every
object in memory, and on 2026-12-06 it failed pyarrow's multipart uploads of a 1.9 GiB checkpoint with
"seek of closed file" while its process grew past 15 GiB). Reported:
wall time of the whole loop per mode (the engine build excluded), its extra time over `none` per checkpoint,
and background's saving against in-step.

    python benchmarks/checkpoint_upload.py                       # 6 steps, a checkpoint every step
    python benchmarks/checkpoint_upload.py --preset tiny --store moto --every 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from common import engine_run_config, loadavg, machine, now, write_json

MODES = ("none", "local", "in-step", "background")


def _data_fn(seq: int, vocab: int):
    import torch

    from neoxray.platform.train.engine import micro_batch

    def data_fn(engine, split, consumed):
        g = torch.Generator().manual_seed(consumed)
        while True:
            ids = torch.randint(0, vocab, (1, seq + 1), generator=g)
            yield micro_batch(ids[:, :-1], ids[:, 1:])

    return data_fn


def run_mode(mode: str, cfg, store_uri: str | None, root: Path) -> dict:
    """One mode's training loop; -> its wall time (engine build excluded) and the checkpoint bytes."""
    from neoxray.platform.train import upload, worker
    from neoxray.platform.train.run_plan import RunPlan
    from neoxray.platform.train.worker import Reporter, train_worker

    every = cfg.train.steps if mode == "none" else cfg.checkpoint.every
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=every, keep=1))
    on_store = mode in ("in-step", "background")
    plan = RunPlan(
        cfg=cfg,
        model_config=cfg.model_config(),
        run_dir=root / mode,
        store_uri=f"{store_uri}/{mode}" if on_store else None,
    )
    plan.run_dir.mkdir(parents=True)
    marks = {}
    build = worker._build_engine

    def timed_build(p):
        out = build(p)
        marks["built"] = time.perf_counter()
        return out

    begin = upload.CheckpointUploads.begin

    def begin_and_wait(self, folder, names):  # in-step: the upload is waited for where it starts
        begin(self, folder, names)
        self._thread.join()

    with contextlib.ExitStack() as stack:
        stack.callback(setattr, worker, "_build_engine", build)
        worker._build_engine = timed_build
        if mode == "in-step":
            stack.callback(setattr, upload.CheckpointUploads, "begin", begin)
            upload.CheckpointUploads.begin = begin_and_wait
        train_worker(plan, Reporter(), _data_fn(cfg.train.seq_len, cfg.model_config().vocab_size))
        wall = time.perf_counter() - marks["built"]
    ckpt = max(plan.run_dir.glob("checkpoint-step-*"))
    return {
        "mode": mode,
        "wall_s": round(wall, 2),
        "checkpoints": cfg.train.steps // every,
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="pythia-160m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--every", type=int, default=1, help="a checkpoint every this many steps")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--store", choices=("file", "moto"), default="file")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = engine_run_config(
        "ckpt-upload",
        args.preset,
        seq=args.seq,
        micro_batch=1,
        global_batch=1,
        precision="fp32",
        device="cpu",
        steps=args.steps,
        seed=0,
    )
    cfg = dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(cfg.checkpoint, every=args.every),
        logging=dataclasses.replace(cfg.logging, tensorboard=False, ray_metrics=False),
    )
    print(f"checkpoint upload | {now()} | {machine()} | load {loadavg()}")
    print(f"{args.preset}, seq {args.seq}, {args.steps} steps, a checkpoint every {args.every}, store {args.store}")
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="neoxray-ckpt-bench-")))
        if args.store == "moto":
            from tests.support.s3 import s3_server  # the repository root is on sys.path (common)

            server = stack.enter_context(s3_server())
            os.environ.update(server.env)
            store_uri = server.bucket("neoxray-bench") + "/run"
        else:
            (root / "store").mkdir()
            store_uri = f"file://{root / 'store'}"
        rows = []
        for mode in args.modes:
            rows.append(run_mode(mode, cfg, store_uri, root))
            print(f"  {mode:<11} {rows[-1]['wall_s']:8.2f} s  ({rows[-1]['checkpoints']} checkpoints)", flush=True)
    base = next((r for r in rows if r["mode"] == "none"), None)
    by = {r["mode"]: r for r in rows}
    gib = rows[-1]["checkpoint_bytes"] / 2**30
    print(f"checkpoint size {gib:.2f} GiB")
    for r in rows:
        if base is not None and r is not base:
            r["extra_s_per_checkpoint"] = round((r["wall_s"] - base["wall_s"]) / r["checkpoints"], 2)
            print(f"  {r['mode']:<11} +{r['extra_s_per_checkpoint']:.2f} s per checkpoint over none")
    if "in-step" in by and "background" in by:
        ratio = by["background"]["wall_s"] / by["in-step"]["wall_s"]
        print(f"background / in-step wall time: {ratio:.2f}")
    if args.json:
        write_json(args.json, {"date": now(), "machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
