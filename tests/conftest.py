"""Fixtures shared by every test folder; the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch

from helpers import MODELS, make_data, make_model_dir


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contended ones. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh():
    """fresh(kind) -> a new tiny model of that kind (same weights each call)."""
    return lambda kind, **kw: MODELS[kind](**kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama checkpoint folder with its tokenizer (``helpers.make_model_dir``), one per test module."""
    return make_model_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small prompt/completion JSONL file (``helpers.make_data``), one per test module."""
    return make_data(tmp_path_factory.mktemp("d") / "train.jsonl")


@pytest.fixture
def machine(monkeypatch):
    """machine(gpus, mps=False): torch and lorafit.devices see ``gpus`` CUDA devices ("Fake GPU") and MPS or not."""
    import lorafit.devices

    def set_machine(gpus: int, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(lorafit.devices, "mps_available", lambda: mps)
    return set_machine
