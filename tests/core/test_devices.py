"""lorafit.devices.resolve_device with CUDA, MPS and torchrun's environment monkeypatched: what ``auto`` picks and
that an absent or unknown device is one ConfigError naming it."""

from __future__ import annotations

import pytest
import torch

from lorafit import devices
from lorafit.errors import ConfigError


@pytest.fixture
def machine(monkeypatch):
    """``machine(gpus=N, mps=bool, local_rank=None or k)``: what this process sees."""
    def set_up(gpus: int = 0, mps: bool = False, local_rank=None, world: int = 2):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(devices, "mps_available", lambda: mps)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        if local_rank is not None:
            monkeypatch.setenv("LOCAL_RANK", str(local_rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
    return set_up


@pytest.mark.parametrize("gpus,mps,local_rank,want", [
    (0, False, None, "cpu"), (0, True, None, "mps"), (1, True, None, "cuda:0"), (4, False, None, "cuda:0"),
    (4, False, 3, "cuda:3"), (2, True, 1, "cuda:1"),
])
def test_auto_picks_cuda_at_the_local_rank_then_mps_then_cpu(machine, gpus, mps, local_rank, want):
    machine(gpus=gpus, mps=mps, local_rank=local_rank)
    for name in ("auto", None, " AUTO "):
        device, why = devices.resolve_device(name)
        assert str(device) == want and why.startswith("auto: ")
    if local_rank is not None:
        assert f"LOCAL_RANK={local_rank}" in devices.resolve_device("auto")[1]


def test_named_devices_that_exist(machine):
    machine(gpus=2, mps=True)
    assert [str(devices.resolve_device(n)[0]) for n in ("cpu", "cuda", "cuda:1", "mps")] == \
        ["cpu", "cuda:0", "cuda:1", "mps"]
    machine(gpus=2, local_rank=1)
    assert str(devices.resolve_device("cuda")[0]) == "cuda:1"  # one GPU per torchrun rank


def test_a_single_process_ignores_a_stray_local_rank(machine, monkeypatch):
    machine(gpus=2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # WORLD_SIZE unset: not a torchrun worker
    assert str(devices.resolve_device("auto")[0]) == "cuda:0"


@pytest.mark.parametrize("setup,name,message", [
    (dict(gpus=0), "cuda", "--device cuda: CUDA is not available here"),
    (dict(gpus=0), "cuda:0", "--device cuda:0: CUDA is not available here"),
    (dict(gpus=1), "cuda:3", "--device cuda:3: this machine has 1 CUDA device (cuda:0); name one of them"),
    (dict(gpus=2, local_rank=5, world=8), "auto",
     "--device auto: this machine has 2 CUDA devices (cuda:0..cuda:1); torchrun started more processes per node"),
    (dict(gpus=1, mps=False), "mps", "--device mps: Apple's Metal (MPS) backend is not available here"),
    (dict(), "tpu", "--device 'tpu' is not a device lorafit knows; use auto, cpu, cuda, cuda:N or mps"),
    (dict(), "cpu:1", "--device 'cpu:1' is not a device lorafit knows"),
    (dict(), "cuda:x", "--device 'cuda:x' is not a device lorafit knows"),
])
def test_an_absent_or_unknown_device_is_one_config_error(machine, setup, name, message):
    machine(**setup)
    with pytest.raises(ConfigError) as e:
        devices.resolve_device(name)
    assert str(e.value).startswith(message), str(e.value)


def test_device_label_names_the_gpu_and_the_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    assert devices.device_label(torch.device("cuda", 0), torch.bfloat16) == "cuda:0 (NVIDIA H100 80GB HBM3, bfloat16)"
    assert devices.device_label(torch.device("cpu"), torch.float32) == "cpu (float32)"
    assert devices.device_label(torch.device("mps")) == "mps (Apple MPS)"
