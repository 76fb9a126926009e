"""Run folders: resumable checkpoints and the metrics log.

``checkpoint-<step>/`` holds the adapter (PEFT layout) and ``trainer_state.pt`` (optimizer, scheduler, RNG states
and the step, which is also the position in the data). Each is written into a temporary folder beside its target
and renamed at the end, so a kill at any moment leaves only complete checkpoints; ``latest_checkpoint`` ignores
the temporary folders of an interrupted write.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch

from .. import peft_format
from ..files import append_line, read_jsonl, writing_dir


def optimizer_state(model, optimizer, strategy: str) -> dict:
    """The optimizer state as one full dict (FSDP shards are gathered; every rank must call this)."""
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, strategy: str) -> None:
    if strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def device_rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The random state of ``device``'s own generator (CUDA, MPS), or None for the CPU's (saved as torch_rng)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, rng: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(rng)


def save_checkpoint(out: Path, step: int, model, *, optim_state: dict, scheduler, d=None,
                    device: Optional[torch.device] = None, grad_scaler=None) -> Path:
    """checkpoint-<step>/ with the adapter and everything resume needs, written atomically by rank 0: the step,
    optimizer, scheduler and (float16) gradient scaler, and the random states of Python, the CPU and ``device``'s
    generator."""
    from .distributed import barrier

    device = torch.device(device or "cpu")
    state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "device_type": device.type,
             "device_rng": device_rng_state(device),
             "grad_scaler": None if grad_scaler is None else grad_scaler.state_dict()}
    tensors, config = peft_format.adapter_state_dict(model), peft_format.adapter_config_dict(model)
    path = out / f"checkpoint-{step}"
    if d is not None and not d.main:
        barrier(d)
        return path

    with writing_dir(path) as tmp:
        peft_format.write_adapter_files(tmp, tensors, config)
        torch.save(state, tmp / "trainer_state.pt")
    if d is not None:
        barrier(d)
    return path


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step (temp folders of interrupted writes are ignored)."""
    found = []
    for p in out.glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / "trainer_state.pt").is_file() and (p / peft_format.WEIGHTS_NAME).is_file():
            found.append((int(tail), p))
    return max(found)[1] if found else None


def append_metrics(out: Path, record: dict) -> None:
    """One record appended to the run's metrics.jsonl (``files.append_line``: a torn last line is skipped)."""
    append_line(out / "metrics.jsonl", json.dumps(record))


def read_metrics(out: Path) -> list[dict]:
    """The run's metrics.jsonl records; a line torn by a kill or a full disk is skipped (its step is redone on
    resume)."""
    return read_jsonl(out / "metrics.jsonl")
