"""Where a run computes: one resolver for every command's ``--device`` and the library's ``device=``.

``auto`` picks the accelerator people train on, as Axolotl and accelerate do: ``cuda:LOCAL_RANK`` under torchrun,
else ``cuda`` (the current GPU), else ``mps`` (Apple silicon), else ``cpu``. A device that is named but absent
(``cuda`` without CUDA, ``cuda:3`` on a one-GPU machine, ``mps`` off a Mac, an unknown name) is a ConfigError
before any work, naming the device and what to use instead.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from .errors import ConfigError

CHOICES = "auto, cpu, cuda, cuda:N or mps"
_NAME = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def is_device_name(name) -> bool:
    """Whether ``name`` is spelled as a device lorafit knows (present or not: ``resolve_device`` checks that)."""
    m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
    return m is not None and (m.group(2) is None or m.group(1) == "cuda")


def _local_rank() -> Optional[int]:
    """torchrun's LOCAL_RANK when this process is one of several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda(index: Optional[int], asked: str) -> tuple[torch.device, str]:
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {asked}: CUDA is not available here (no NVIDIA GPU, or a CPU-only torch build); "
                          f"use --device cpu or auto")
    count = torch.cuda.device_count()
    rank = _local_rank()
    if index is None:
        index, why = (rank, f"torchrun LOCAL_RANK={rank}") if rank is not None else (torch.cuda.current_device(),
                                                                                     "the current GPU")
    else:
        why = "asked"
    if index >= count:
        raise ConfigError(f"--device {asked}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                          f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}); "
                          + ("torchrun started more processes per node than GPUs" if rank is not None and
                             asked in ("auto", "cuda") else "name one of them or use --device auto"))
    return torch.device("cuda", index), why


def resolve_device(name: Optional[str] = "auto") -> tuple[torch.device, str]:
    """(the device, why it was chosen, in words) for ``name``: auto, cpu, cuda, cuda:N or mps (None: auto)."""
    asked = (name or "auto").strip().lower()
    if not is_device_name(asked):
        raise ConfigError(f"--device {name!r} is not a device lorafit knows; use {CHOICES}")
    m = _NAME.match(asked)
    kind, index = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
    if kind == "cpu":
        return torch.device("cpu"), "asked"
    if kind == "cuda":
        return _cuda(index, asked)
    if kind == "mps":
        if not mps_available():
            raise ConfigError("--device mps: Apple's Metal (MPS) backend is not available here (it needs a Mac with "
                              "Apple silicon and a torch build with MPS); use --device cpu or auto")
        return torch.device("mps"), "asked"
    if torch.cuda.is_available():
        device, why = _cuda(None, "auto")
        return device, f"auto: CUDA is available ({why})"
    if mps_available():
        return torch.device("mps"), "auto: Apple's MPS is available and CUDA is not"
    return torch.device("cpu"), "auto: no CUDA or MPS device"


def device_label(device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The run's first-line name of its device, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3, bfloat16)``."""
    parts = []
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    elif device.type == "mps":
        parts.append("Apple MPS")
    if dtype is not None:
        parts.append(str(dtype).removeprefix("torch."))
    return f"{device}" + (f" ({', '.join(parts)})" if parts else "")


def device_line(device: torch.device, dtype: Optional[torch.dtype] = None, why: str = "", extra: str = "") -> str:
    """Every command's first line, e.g. ``device: cuda:0 (NVIDIA H100 80GB HBM3, float32), sdpa attention (asked)``
    (``extra``: what follows the device, as train's attention kernel)."""
    return f"device: {device_label(device, dtype)}" + (f", {extra}" if extra else "") + (f" ({why})" if why else "")


def accumulation_dtype(device) -> torch.dtype:
    """float64 for sums of many terms (losses, Fisher traces, sketches, dot products), float32 where the device has no
    float64 (Apple's MPS): float32 sums of n terms err by at most ~n·2⁻²⁴ relative, pairwise ones by ~log2(n)·2⁻²⁴
    (what that does to a probe: lorafit.advise.probe; to DoRA's norms: lorafit.fused.row_sq_norms)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64
