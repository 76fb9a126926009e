"""Shared test helpers (one module; test modules import from here, never from each other): tiny random models
(no network: each is built from a small config), a tiny Llama checkpoint with a real (tiny, trained-here) tokenizer,
small data files, and the PEFT parity case table."""

from __future__ import annotations

import copy
import json
import random
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*bos_token_id.*")
warnings.filterwarnings("ignore", message=".*eos_token_id.*")


def copy_trainable(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Copy ``src``'s trainable parameters into ``dst``'s in order (two models with the same adapter layout)."""
    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters()):
            if q.requires_grad:
                p.copy_(q)
    return dst


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


def clone(model):
    return copy.deepcopy(model)


# --- checkpoints and data files -------------------------------------------------------------------------

WORDS = ("good great fine awful bad poor movie film plot actor scene story boring lovely dull superb "
         "terrible nice review sentiment positive negative the a was is and but very not").split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + [" positive negative"] * 20 + ["Review: the movie was good\nSentiment: positive"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def make_model_dir(path: Path, seed: int = 0, *, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                   kv_heads: int = 2, positions: int = 256) -> Path:
    """A tiny Llama checkpoint folder (config, safetensors, the tiny tokenizer)."""
    return _save_with_tokenizer(path, lambda tok: _llama(tok, seed, hidden, intermediate, heads, kv_heads, positions))


def make_moe_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-MoE checkpoint folder (4 experts, top 2) with the tiny tokenizer."""
    import transformers as tf

    def build(tok):
        torch.manual_seed(seed)
        cfg = tf.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=1,
                                eos_token_id=2, pad_token_id=2)
        return tf.Qwen3MoeForCausalLM(cfg)
    return _save_with_tokenizer(path, build)


def _save_with_tokenizer(path: Path, build) -> Path:
    tok = make_tokenizer()
    build(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _llama(tok, seed, hidden, intermediate, heads, kv_heads, positions):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg)


def make_data(path: Path, n: int = 64, kind: str = "pc", seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            good = rng.random() < 0.5
            words = " ".join(rng.choice(WORDS[:8] if good else WORDS[3:11]) for _ in range(6))
            if kind == "pc":
                f.write(json.dumps({"prompt": f"Review: {words}\nSentiment:",
                                    "completion": " positive" if good else " negative"}) + "\n")
            else:
                f.write(json.dumps({"text": f"{words} is {'good' if good else 'bad'}"}) + "\n")
    return path


# --- PEFT parity cases: name -> (model kind, LoraConfig fields) ---------------------------------------------

CASES = {
    "list": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.(q|k|down)_proj")),
    "all_linear_llama": ("llama", dict(target_modules="all-linear")),
    "all_linear_gpt2": ("gpt2", dict(target_modules="all-linear")),
    "exclude": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    "exclude_regex": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*\.1\..*")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    "layers_to_transform_nopattern": ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=0)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                               rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
                               alpha_pattern={"v_proj": 3.0, "down_proj": 16})),
    "bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "bias_lora_only": ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
    "rslora": ("llama", dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "dora_llama": ("llama", dict(target_modules="all-linear", use_dora=True)),
    "dora_gpt2_bias": ("gpt2", dict(target_modules=["c_attn", "c_fc"], use_dora=True)),
    "dora_bert": ("bert", dict(target_modules=["query", "dense"], use_dora=True, use_rslora=True)),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": ("gpt2", dict(target_modules=["wte", "c_proj"], use_dora=True)),
    "conv": ("cnn", dict(target_modules=["conv1", "conv2", "conv1d", "fc"])),
    "conv_dora": ("cnn", dict(target_modules=["conv1", "conv2", "conv1d"], use_dora=True)),
    "mlp_all_linear": ("mlp", dict(target_modules="all-linear", exclude_modules=["out"])),
    "modules_to_save": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "modules_to_save_llama": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
}


# --- numeric comparisons ------------------------------------------------------------------------------------
# Two code paths (fused and reference, lorafit and PEFT, merged and unmerged, resumed and uninterrupted) sum in
# different orders, and so does one path on another SIMD kernel set (ATEN_CPU_CAPABILITY=default, avx2, avx512):
# float results then agree only to rounding, whose size follows the magnitude of the values. Every such comparison
# states its tolerance at the call site and what it is relative to; properties that hold exactly (bit-identical
# base weights, save/load round trips) stay torch.equal.

def _pairs(got, want):
    """[(key, got, want)] for two tensors (key None) or two dicts of tensors with the same keys."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (sorted(got), sorted(want))
        return [(k, got[k], want[k]) for k in want]
    return [(None, got, want)]


def _label(msg: str, key) -> str:
    return " ".join(str(part) for part in (msg, key) if part)


def max_diff(a, b) -> float:
    """max |a - b| over two tensors, or over two dicts of tensors with the same keys."""
    return max((x.double() - y.double()).abs().max().item() for _, x, y in _pairs(a, b))


def close(got, want, *, rtol: float, atol: float, msg: str = "") -> None:
    """Elementwise |got - want| <= atol + rtol·|want| (torch.testing.assert_close: same shapes and dtypes), for two
    tensors or two dicts of tensors with the same keys. For values whose own size sets the rounding (losses,
    parameters, singular values)."""
    for key, g, w in _pairs(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol,
                                   msg=lambda m, key=key: f"{_label(msg, key)}\n{m}".lstrip())


def close_to_scale(got, want, *, rtol: float, atol: float = 0.0, msg: str = "") -> None:
    """max |got - want| <= rtol·max |want| + atol, tensor by tensor (for dicts, each tensor at its own scale). For
    results of sums and products (matmul outputs, logits, gradients), whose rounding error follows the largest
    terms summed, not each element: an element that cancels to near zero keeps the error of its terms."""
    for key, g, w in _pairs(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (key, g.shape, w.shape, g.dtype, w.dtype)
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        bound = rtol * scale + atol
        assert err <= bound, (f"{_label(msg, key)}: max |difference| {err:.3g} > {bound:.3g} "
                              f"(rtol {rtol:g} of max |want| {scale:.3g}, atol {atol:g})")


# --- a tiny chat model ------------------------------------------------------------------------------------

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose tokenizer has a ChatML template (its two tokens added, embeddings resized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def make_chat_model_dir(path: Path, seed: int = 0) -> Path:
    """make_model_dir's tiny Llama with a ChatML template (``with_chat_template``)."""
    return with_chat_template(make_model_dir(path, seed), path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lorafit ARGV`` in this process; argparse errors exit through SystemExit."""
    from lorafit.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- counting host reads (the sync counter of tests/train/test_device_syncs.py and tests/advise/test_probe_device.py)

def _lorafit_frame() -> str:
    """The innermost frame in src/lorafit that led here, as 'module.py:function'."""
    import traceback

    import lorafit

    src = Path(lorafit.__file__).parent
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if src in path.parents:
            return f"{path.relative_to(src).as_posix()}:{frame.name}"
    return "outside lorafit"


def counted_reads(fn, log: list):
    """fn, with every host read while it runs counted into a new Counter ({lorafit frame: reads}) appended to
    ``log``: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t``) and ``aten.nonzero`` through a
    dispatch mode, and ``Tensor.tolist`` (which the CPU answers without dispatch) through a function mode."""
    from collections import Counter

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self, seen: Counter):
            super().__init__()
            self.seen = seen

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
                self.seen[_lorafit_frame()] += 1
            return func(*args, **(kwargs or {}))

    class ListReads(TorchFunctionMode):
        def __init__(self, seen: Counter):
            super().__init__()
            self.seen = seen

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.tolist:
                self.seen[_lorafit_frame()] += 1
            return func(*args, **(kwargs or {}))

    def wrapper(*args, **kwargs):
        seen = Counter()
        with Reads(seen), ListReads(seen):
            out = fn(*args, **kwargs)
        log.append(seen)
        return out
    return wrapper


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, experts: int = 4):
    """A tiny random mixture-of-experts causal LM built with transformers' own classes: Qwen3-MoE (experts
    (E, 2I, H) and (E, H, I)), Mixtral (the same layout) or gpt-oss (transposed (E, in, out), with biases)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, head_dim=8)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=experts,
                                num_experts_per_tok=2, **common)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=16, num_local_experts=experts, num_experts_per_tok=2, **common)
        model = tf.MixtralForCausalLM(cfg)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(intermediate_size=16, num_local_experts=experts, num_experts_per_tok=2,
                              layer_types=["full_attention"] * 2, **common)
        model = tf.GptOssForCausalLM(cfg)
        with torch.no_grad():  # random experts and biases (gpt-oss initialises some of them to zero)
            for n, p in model.named_parameters():
                if ".experts." in n:
                    p.normal_(std=0.1)
    else:
        raise ValueError(family)
    return model.eval()


class Loaded(Exception):
    """Raised by ``stop_at_load``'s stand-in for from_pretrained: the command got as far as loading a model."""


def stop_at_load(monkeypatch) -> list:
    """AutoModelForCausalLM.from_pretrained replaced by a stand-in that records the ``device_map`` it was asked for
    and raises ``Loaded``; returns the list it records into."""
    from transformers import AutoModelForCausalLM

    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        raise Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return asked


def save_lora(model_dir: Path, out: Path, config, seed: int) -> Path:
    """An adapter of ``config`` for the model in ``model_dir``, perturbed (``perturb_trainable``, so not a no-op)
    and saved in ``out``."""
    from transformers import AutoModelForCausalLM

    import lorafit

    model = lorafit.attach(AutoModelForCausalLM.from_pretrained(model_dir), config)
    perturb_trainable(model, seed=seed, std=0.2)
    return lorafit.save(model, out)
