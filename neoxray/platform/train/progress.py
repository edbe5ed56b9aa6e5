"""What a person watching `neoxray train` sees: the progress of the run (`step N/total`, loss, validation loss,
tokens per second, an ETA; redrawn in place with a bar on a terminal, a plain line every `logging.every` steps in
a log) and, at the end, a summary: final and validation loss, time, the newest checkpoint, how to look at the run
and how to export and serve it. Under Ray the driver follows RUN_DIR/metrics.jsonl (`follow`), so workers'
own output stays out of the console unless `--verbose`."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

from neoxray.platform.checkpoint import latest_checkpoint, read_meta

BAR = 24


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Prints training records as progress (see the module docstring). `update` takes metrics records (and
    events such as a resume); `close` ends a redrawn line."""

    def __init__(self, total_steps: int, every: int = 1, stream=None):
        self.total = total_steps
        self.every = max(1, every)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started: tuple[int, float] | None = None  # (step, time) of the first step seen
        self.val_loss: float | None = None
        self._drawn = False

    def line(self, record: dict) -> str:
        step = record.get("step", 0)
        parts = [f"step {step}/{self.total}"]
        if record.get("loss") is not None:
            parts.append(f"loss {record['loss']:.4f}")
        if self.val_loss is not None:
            parts.append(f"val_loss {self.val_loss:.4f}")
        if record.get("tokens_per_s") is not None:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {record['mfu']:.3f}")
        if self.started is not None and step > self.started[0]:
            per_step = (time.monotonic() - self.started[1]) / (step - self.started[0])
            parts.append(f"ETA {_clock(per_step * (self.total - step))}")
        return " | ".join(parts)

    def update(self, record: dict) -> None:
        if "event" in record:
            if record["event"] == "resumed":
                self._print(f"resumed at step {record['step']} from its checkpoint", final=True)
            return
        step = record.get("step")
        if not isinstance(step, int) or "eval" in record or "eval_error" in record:
            return  # evaluations of checkpoints are announced by the driver itself
        if self.started is None:
            self.started = (step - 1, time.monotonic() - float(record.get("step_time_s") or 0.0))
        if record.get("val_loss") is not None:
            self.val_loss = record["val_loss"]
        text = self.line(record)
        if self.tty:
            done = int(BAR * step / max(1, self.total))
            self._print(f"[{'#' * done}{'.' * (BAR - done)}] {text}", final=step >= self.total)
        elif step % self.every == 0 or step >= self.total or "val_loss" in record:
            self._print(text, final=True)

    def _print(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self._drawn = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def follow(path: Path, progress: Progress, stop: threading.Event, poll_s: float = 0.5) -> threading.Thread:
    """A daemon thread feeding each record appended to the JSON-lines file `path` to `progress`, until `stop`
    is set (then the rest of the file is read once more)."""

    offset = path.stat().st_size if path.exists() else 0  # records of earlier attempts are not news

    def run() -> None:
        nonlocal offset
        while True:
            finished = stop.wait(poll_s)
            if path.exists():
                if path.stat().st_size < offset:
                    offset = 0  # rewritten (a resume dropped records of steps it redoes)
                with open(path, encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode("utf-8"))
                for line in complete.splitlines():
                    try:
                        progress.update(json.loads(line))
                    except json.JSONDecodeError:
                        continue
            if finished:
                progress.close()
                return

    thread = threading.Thread(target=run, name="neoxray-progress", daemon=True)
    thread.start()
    return thread


def summary(run_dir: Path, seconds: float, metrics_file: str | None = "metrics.jsonl", store=None) -> str:
    """The lines printed when a run ends: its last losses, its time, its newest checkpoint and what to do next
    (only tools that are installed are named). `store`: the run's `RunStore` when it lives on object storage
    (`run_dir` then holds a copy of its metrics file)."""
    last: dict = {}
    val: float | None = None
    path = run_dir / metrics_file if metrics_file else None
    if path is not None and path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in record:
                last = record
            if record.get("val_loss") is not None:
                val = record["val_loss"]
    if store is not None:
        newest, meta = _newest_on_store(store)
        run_dir = store.uri
    else:
        newest = latest_checkpoint(run_dir)
        meta = read_meta(newest) if newest is not None else {}
    out = [f"run finished in {_clock(seconds)}: {run_dir}"]
    if last:
        out.append(f"  final loss      {last['loss']:.4f} at step {last['step']}")
    if val is not None:
        out.append(f"  validation loss {val:.4f}")
    out.append(f"  newest checkpoint {newest or 'none'}")
    out.append(f"  plots           neoxray report {run_dir}")
    if store is None and (run_dir / "tensorboard").exists() and importlib.util.find_spec("tensorboard") is not None:
        out.append(f"  TensorBoard     tensorboard --logdir {run_dir / 'tensorboard'}")
    if meta.get("lora"):  # adapters only: export a peft adapter, serve it on its base
        base = meta["base"]["path"]
        name = str(run_dir).rstrip("/").rsplit("/", 1)[-1]
        out.append(f"  export          neoxray export --checkpoint {run_dir} --out {run_dir}-adapter  (peft)")
        out.append(f"  serve           neoxray serve --model {base} --lora {name}={run_dir}-adapter")
    elif newest is not None:
        out.append(f"  export          neoxray export --checkpoint {run_dir} --out {run_dir}-hf")
        out.append(f"  serve           neoxray serve --model {run_dir}")
    return "\n".join(out)


def _newest_on_store(store) -> tuple[str | None, dict]:
    """(URI of the newest complete checkpoint on the store or None, its meta.json)."""
    from neoxray.platform.run_store import store_checkpoints

    for name, meta, problem in store_checkpoints(store):
        if problem is None:
            return store.path(name), meta
    return None, {}
