"""Where and in what precision a command runs: the one parser for `--device` and for `--dtype`.

Every command resolves its device and dtype here, once, into a `torch.device` and a
`torch.dtype`; torchrun workers use the same parser (distributed.py), so `cuda:N` means the
same thing everywhere.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, DeviceError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def resolve_dtype(name: str) -> torch.dtype:
    """'float32', 'bf16', 'half' ... -> the torch dtype; anything else is a ConfigError."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: choose one of float32, float16, bfloat16, float64") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (what reports record)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without CUDA is a DeviceError."""
    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but CUDA is not available on this machine "
                              "(no GPU or no CUDA build of torch); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device
