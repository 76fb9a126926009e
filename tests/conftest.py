"""Tiny random models shared by the tests (no network: every model is built from a small config)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contended ones. Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed: int = 0, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises biases to zero: make them visible in the tests
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    return model


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


class MLP(nn.Module):
    def __init__(self, head_name: str = "out"):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(32, 4))

    def forward(self, x):
        return getattr(self, self.head_name)(self.act(self.fc2(self.act(self.fc1(x)))))


def tiny_mlp(seed: int = 0, head_name: str = "out"):
    torch.manual_seed(seed)
    return MLP(head_name).eval()


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):  # (N, 3, 8, 8)
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (N, 8, 3, 3)
        h = self.conv1d(h.flatten(2))  # (N, 6, 9)
        return self.fc(h.mean(-1))


def tiny_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return CNN().eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "mlp": tiny_mlp, "cnn": tiny_cnn}


def example_input(kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if kind in ("llama", "gpt2", "bert"):
        return {"input_ids": torch.randint(0, 128, (2, 10), generator=g)}
    if kind == "mlp":
        return {"x": torch.randn(3, 16, generator=g)}
    return {"x": torch.randn(2, 3, 8, 8, generator=g)}


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb_trainable(model, seed: int = 3, std: float = 0.1):
    """Give every trainable parameter a random non-trivial value (so tests see B·A, magnitudes, biases)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


@pytest.fixture
def fresh():
    """fresh(kind) -> a new tiny model of that kind (same weights each call)."""
    return lambda kind, **kw: MODELS[kind](**kw)


def clone(model):
    return copy.deepcopy(model)
