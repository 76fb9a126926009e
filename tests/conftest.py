"""Fixtures shared by every test folder; the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch

from helpers import MODELS


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
