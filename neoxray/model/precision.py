"""Names of dtypes, devices and training precisions, resolved in one place.

Every command, config and file names a numeric format one of three ways: our short names (`fp32`, `bf16`,
`fp16`, used by `--dtype`, `train.precision` and checkpoints' meta.json), Hugging Face's `torch_dtype` strings
(`float32`, `bfloat16`, `float16`) and torch dtypes. `auto` means: decided by the device (bf16 on GPUs, fp32 on
CPUs for inference; the file's own dtype when loading a Hugging Face directory). Devices: `auto` is `cuda` where
this process sees a GPU, else `cpu`; on a Ray cluster `use_gpu` decides from the cluster's GPUs instead.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from neoxray.errors import NeoxrayError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
"""Short names of the numeric formats neoxray trains and runs in."""
DTYPE_CHOICES = ("auto", *PRECISIONS)
"""What `--dtype` accepts."""
DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""What `train.device`, `--device` accept (`--device` also takes `cuda:N`)."""

_HF_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@cache
def _by_name() -> dict[str, torch.dtype]:
    import torch  # here, not at the top: the config schema and the CLI's parser use this module without torch

    short = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return {**short, **{_HF_NAMES[k]: v for k, v in short.items()}}


def to_dtype(name: str | None, what: str = "dtype") -> torch.dtype | None:
    """`fp32` / `bf16` / `fp16` (or Hugging Face's `float32` / `bfloat16` / `float16`) -> the torch dtype;
    `auto` or None -> None (the caller decides). Anything else is a NeoxrayError naming `what`."""
    if name is None or name == "auto":
        return None
    try:
        return _by_name()[str(name)]
    except KeyError:
        raise NeoxrayError(f"{what}={name!r} is not one of {', '.join(DTYPE_CHOICES)}") from None


def short_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (our names; `hf_name` gives Hugging Face's)."""
    return next(k for k in PRECISIONS if _by_name()[k] == dtype)


def hf_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16', the `torch_dtype` string of a Hugging Face config.json."""
    return str(dtype).removeprefix("torch.")


def hf_dtype(name: str | None) -> torch.dtype:
    """The dtype a Hugging Face config.json records (`torch_dtype` / `dtype`); fp32 when absent or unknown."""
    return _by_name().get(str(name or "float32"), _by_name()["fp32"])


def resolve_device(name: str = "auto") -> str:
    """`auto` -> `cuda` when this process sees a GPU, else `cpu`; any other name is returned as given."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def inference_dtype(device: str, dtype: torch.dtype | None = None) -> torch.dtype:
    """`dtype`, or for None the default for inference on `device`: bf16 on GPUs, fp32 on CPUs (where bf16
    matmuls are slow)."""
    if dtype is not None:
        return dtype
    return _by_name()["bf16" if str(device).startswith("cuda") else "fp32"]


def use_gpu(device: str, cluster_gpus: float, workers: int = 1) -> bool:
    """Whether `workers` training workers take one GPU each: `train.device` `cuda` always, `cpu` never, `auto`
    when the cluster has a GPU for every worker."""
    if device == "auto":
        return cluster_gpus >= max(1, workers)
    return device == "cuda"
