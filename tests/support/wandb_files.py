"""Reading back what W&B wrote offline (`WANDB_MODE=offline`): a run's `run-ID.wandb` file is a LevelDB-style log
(a 7-byte W&B header, then 32 KiB blocks of records, each with a 7-byte header: crc32, length, type; a record
larger than a block's rest is split FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record` protobufs. wandb 0.31 no
longer ships a Python reader of its own, so the test reads the format here, with wandb's own protobuf classes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    out, buf, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + HEADER : pos + HEADER + n]
        pos += HEADER + n
        if kind in (FULL, LAST):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def read_run(path: Path) -> dict:
    """{"name", "project", "config": {key: value}, "history": [row], "summary": {key: value}} of one offline run."""
    run = {"config": {}, "history": [], "summary": {}}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(name=r.run.display_name, project=r.run.project, id=r.run.run_id)
            run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            run["summary"].update({i.key: json.loads(i.value_json) for i in r.summary.update if i.key})
    return run
