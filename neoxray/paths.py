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
    """`path` as a local `Path` (`~` expanded), where only this node's disk makes sense (a staging folder, a
    runtime adapter load under --allowed-lora-path) or after a URI was fetched into a local cache. A URI is a
    `NeoxrayError` naming `what` (the option or config key that gave it; `what` + `sep` + the URI), before
    anything is read or written."""
    text = os.fspath(path)
    if is_uri(text):
        scheme = text.split("://", 1)[0]
        raise NeoxrayError(
            f"{what}{sep}{text}: this is a folder on this node's disk (a local path), not {scheme}://; runs, "
            f"models, checkpoints, adapters and prepared datasets can live there"
        )
    return Path(text).expanduser()
