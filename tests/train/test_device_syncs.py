"""No host reads in a training step: what a GPU would wait for, counted on the CPU.

* A sync counter: a TorchDispatchMode counts ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``if t``) and
  ``aten.nonzero``, and a TorchFunctionMode counts ``Tensor.tolist`` (which the CPU answers without dispatch), each
  with the innermost lorafit frame that called it, over 20 steps of a tiny Llama (LoRA, RSLoRA and DoRA, dropout
  0.1). ``fused.HOST_LOOKUP`` is emptied, so DoRA runs as on an accelerator. The only reads in a step are on host
  tensors, named below with their reason; ``read_steps`` reads once per ``log_every`` steps.
* The meta device: the same step, an evaluation and mixed-adapter batches (``per_row``) with every weight and batch
  on ``meta``, whose tensors cannot be read at all, and whose every new tensor must follow the model's device (a CPU
  tensor mixed in fails). probe's own meta and sync tests are in tests/advise/test_probe_device.py.
* A lint: no ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``float/int/bool(tensor expression)`` or
  ``if t.any()`` in the modules a step runs, except the allow-listed lines, each with its reason.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafit
from helpers import counted_reads, make_data, make_model_dir, tiny_llama
from lorafit import fused
from lorafit.train import loop, steps
from lorafit.train.data import batch_indices
from lorafit.train.distributed import Dist
from lorafit.train.train_config import TrainConfig

SRC = Path(lorafit.__file__).parent

# reads a step makes on purpose: (module, function) -> why it costs no device sync
HOST_READS = {
    ("fused.py", "dropout_seed"): "a mask's seed is drawn from torch's CPU generator: a host tensor on every device",
    ("hf.py", "label_positions"): "the label positions of a batch, found on the host before the batch is copied",
    ("hf.py", "to_device"): "whether a host batch is padded on the right only, before it is copied",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("syncs")
    return make_model_dir(d / "m"), make_data(d / "d.jsonl", n=48)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "float16"])
def test_a_step_reads_only_host_tensors_and_the_loop_reads_once_per_interval(files, tmp_path, monkeypatch, variant):
    """float16: a float16 base, trained with torch.amp.GradScaler, which hands fused AdamW its found_inf."""
    model_dir, data = files
    monkeypatch.setattr(fused, "HOST_LOOKUP", ())  # DoRA as on an accelerator: no lookup of zero magnitudes
    step_reads, interval_reads = [], []
    monkeypatch.setattr(loop, "train_step", counted_reads(steps.train_step, step_reads))
    monkeypatch.setattr(loop, "read_steps", counted_reads(steps.read_steps, interval_reads))
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1, use_rslora=variant == "rslora",
                use_dora=variant == "dora")
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "run"), steps=20, log_every=10,
                      batch_size=4, max_length=48, lora=lora, dtype="float16" if variant == "float16" else "float32")
    loop.run(cfg, quiet=True)

    assert len(step_reads) == 20 and len(interval_reads) == 2  # steps 10 and 20
    in_steps = sum(step_reads, Counter())
    unexpected = {frame: n for frame, n in in_steps.items() if tuple(frame.split(":")) not in HOST_READS}
    assert not unexpected, unexpected  # nothing in fused, layers, mixed, ops, hf's forward or the step itself
    # per step: one seed per dropout input (attention in, o_proj in, MLP in, down_proj in; 2 layers), and the host
    # batch's label positions (3 nonzero) and padding check (1 read)
    assert all(r[("fused.py:dropout_seed")] == 8 for r in step_reads), step_reads[0]
    assert all(r["hf.py:label_positions"] == 3 and r["hf.py:to_device"] == 1 for r in step_reads), step_reads[0]
    assert [dict(r) for r in interval_reads] == [{"train/steps.py:read_steps": 1}] * 2


class _TorchsStep(torch.optim.AdamW):
    """AdamW whose step does nothing: fused AdamW has no meta kernel, and its step is torch's code, not lorafit's."""

    def step(self, closure=None):
        return None


def _meta_state(variant: str, p: float):
    """A RunState-like object of a tiny Llama whose weights, adapter and optimizer state are all on ``meta``."""
    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=p,
                                             use_rslora=variant == "rslora", use_dora=variant == "dora"))
    model = model.to("meta").train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = _TorchsStep(params, lr=1e-3)
    optimizer.defaults["fused"] = True  # takes found_inf, as fused AdamW does
    cfg = TrainConfig(batch_size=2, grad_accum=2, lora=dict(r=4))
    rows = [{"input_ids": list(range(3, 13)), "labels": [-100] * 6 + list(range(9, 13))} for _ in range(8)]
    return SimpleNamespace(cfg=cfg, d=Dist(device=torch.device("meta")), device=torch.device("meta"), model=model,
                           params=params, optimizer=optimizer, strategy="single", train_set=rows,
                           tok=SimpleNamespace(pad_token_id=0), t0=0.0,
                           bad=torch.zeros((), dtype=torch.bool, device="meta"),
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_a_step_on_the_meta_device_reads_nothing_and_creates_nothing_elsewhere(variant, p):
    """Every tensor a step makes follows the model onto ``meta``: a CPU tensor there would fail the op it meets,
    and any read of a meta tensor raises."""
    state = _meta_state(variant, p)
    batches = batch_indices(len(state.train_set), state.cfg.batch_size, 0)
    for step in (1, 2):
        numbers = steps.train_step(state, batches, step)
        assert {numbers.loss_sum.device.type, numbers.norm.device.type} == {"meta"}
        assert numbers.tokens == 2 * 2 * 4  # counted on the host: 2 micro-batches of 2 rows, 4 labelled tokens each
    assert all(q.grad is None for q in state.params)  # zero_grad ran
    assert state.optimizer.found_inf.device.type == "meta"


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_evaluation_on_the_meta_device_reads_only_its_final_sums(variant, monkeypatch):
    """Every batch of an evaluation runs on ``meta``; the one read is of the three sums at the end (handed here to
    a stand-in that returns CPU zeros in their place)."""
    state = _meta_state(variant, 0.1)
    seen = []
    monkeypatch.setattr(loop.D, "all_sum_tensor", lambda t, d: seen.append(t) or torch.zeros(3))
    task = SimpleNamespace(eval=[{"prompt": "Review: good\nSentiment:", "completion": "p"}] * 3,
                           choices=["n", "p"])  # one token each: the accuracy is scored too
    tok = _Tok()
    cfg = TrainConfig(batch_size=2, max_length=16, lora=dict(r=4))
    assert loop.evaluate(state.model, tok, task, cfg) == {"eval_loss": 0.0, "eval_accuracy": 0.0}
    assert len(seen) == 1 and seen[0].device.type == "meta" and seen[0].shape == (3,)


class _Tok:
    """A stand-in tokenizer: one token per character."""

    pad_token_id, eos_token_id, chat_template = 0, 2, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_mixed_adapter_batches_on_the_meta_device(variant):
    """per_row: each row its own adapter (or the base), both schedules (long rows and one-token rows), on meta."""
    model = tiny_llama()
    for name in ("a", "b"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 use_dora=variant == "dora"), name=name)
    model = model.to("meta").eval()
    for length in (12, 1):
        ids = torch.zeros(3, length, dtype=torch.long, device="meta")
        with torch.no_grad(), lorafit.per_row(model, ["a", None, "b"]):
            assert model(input_ids=ids).logits.device.type == "meta"


# --- the lint ------------------------------------------------------------------------------------------------------

HOT = ("fused.py", "layers.py", "mixed.py", "ops.py", "hf.py", "train/steps.py")
# (module, function, the read's source) -> why it is allowed
ALLOWED = {
    ("fused.py", "dropout_seed", "int(torch.randint(0, 1 << 62, ()))"): HOST_READS[("fused.py", "dropout_seed")],
    ("fused.py", "forward", "bool((magnitude == 0).any())"): "only where fused.HOST_LOOKUP (the CPU): free there",
    ("fused.py", "_magnitude_grad", "zero.any()"): "only where fused.HOST_LOOKUP (the CPU): free there",
    ("hf.py", "to_device", "bool((mask[:, 1:] <= mask[:, :-1]).all())"): HOST_READS[("hf.py", "to_device")],
    ("train/steps.py", "train_step", "state.bad.item()"): "only an optimizer without found_inf (FSDP2's DTensors)",
    ("train/steps.py", "read_steps", "torch.stack("): "the one read of a logging interval",
}


def _reads(path: Path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    owner = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                owner[id(node)] = fn.name  # the innermost function wins: ast.walk visits outer ones first
    for node in ast.walk(tree):
        read = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("item", "tolist", "numpy", "cpu"):
            read = node
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("float", "int", "bool") and node.args and \
                not isinstance(node.args[0], (ast.Constant, ast.Name)):
            read = node
        elif isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
            test = node.test.operand if isinstance(node.test, ast.UnaryOp) else node.test
            if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and test.func.attr in ("any", "all"):
                read = test
        if read is not None:
            yield owner.get(id(node), "<module>"), ast.get_source_segment(text, read), read.lineno


def test_no_host_read_in_the_modules_a_step_runs_except_the_allowed_ones():
    found = []
    for rel in HOT:
        for function, source, line in _reads(SRC / rel):
            if not any(rel == m and function == f and source.startswith(s) for m, f, s in ALLOWED):
                found.append(f"{rel}:{line} in {function}: {source}")
    assert not found, "host reads in a training step's modules (allow-list them in ALLOWED with a reason):\n" + \
        "\n".join(found)
