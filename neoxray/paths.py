"""What a path names: a local path, or a URI (`s3://bucket/x`, `gs://...`, `file:///x`) on a filesystem that
pyarrow or fsspec reaches. Below every layer, so that the model (reading adapters), the pipelines (reading and
writing datasets through `neoxray.pipelines.fs`) and the platform (runs, checkpoints, models) tell them apart
the same way, and a URI never becomes a local folder named after its scheme (`./s3:/bucket/run`)."""

from __future__ import annotations

import os
from pathlib import Path

from neoxray.errors import NeoxrayError


def is_uri(path: str | os.PathLike) -> bool:
    """True when `path` has a scheme (`s3://...`); `file://` counts: it goes through pyarrow too."""
    return "://" in os.fspath(path)


def local_path(path: str | os.PathLike, what: str, sep: str = " ") -> Path:
    """`path` as a local `Path` (`~` expanded), for what is read and written on local paths only yet:
    checkpoints, models and adapters outside a run (on a cluster: a disk every node mounts). A URI is a
    `NeoxrayError` naming `what` (the option or config key that gave it; `what` + `sep` + the URI), before
    anything is read or written."""
    text = os.fspath(path)
    if is_uri(text):
        scheme = text.split("://", 1)[0]
        raise NeoxrayError(
            f"{what}{sep}{text}: this is read and written on local paths (on a cluster, a disk every node "
            f"mounts), not {scheme}:// yet; training run directories (--run-dir) and prepared datasets (data.path) "
            f"can live there"
        )
    return Path(text).expanduser()
