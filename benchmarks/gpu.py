"""The GPU acceptance run of issue 32 ("devices"): lorafit on one accelerator, checked against the CPU and PEFT.

    python benchmarks/gpu.py                          # the device auto picks (cuda where there is one), full sizes
    python benchmarks/gpu.py --device cpu --quick     # the same code on the CPU, tiny sizes (tests/test_gpu_script.py)
    python benchmarks/gpu.py --only sync,bench --json out.json

It prints the device line, then one table row per check (check | result | detail), and exits 1 if any row FAILs.
A result is "pass", "FAIL", "measured" (benchmark rows: they must run, their targets are reported, not enforced) or
"n/a: <reason>", only where the issue allows it: CUDA-only tools (sync debug mode, max_memory_allocated) off CUDA,
and torchao where it cannot run on the device. Everything else that cannot run is a FAIL naming the error.

Checks (``--only`` takes their names):
  train   a tiny random Llama trained by ``lorafit.train.loop.run`` on the device equals the same run on the CPU
          (float32, TF32 off, LoRA and DoRA: loss curve and final adapter tensors; tolerances below); float32 with
          TF32 on, lorafit's own default there, is reported beside it; a bfloat16 run's losses are finite and its
          eval loss goes down. The device run's initial adapter is drawn from the CPU's generator, as the CPU run's
          is: lorafit draws it from the device's own, so one seed starts the two devices from different adapters.
  fused   the fused LoRA/DoRA layer (``fused.lora_linear``) against the reference composition (``layers.FUSED =
          False``) on the device, dropout 0.1 (both paths draw the same masks): outputs, x's and every parameter's
          gradient, in float32, over a bfloat16 base, and under torch.autocast(bfloat16).
  sync    ``torch.cuda.set_sync_debug_mode("error")`` around every ``train_step`` after 3 warm-up steps of a real
          ``loop.run`` (log_every past the end, so no read falls inside): LoRA and DoRA with dropout, and a float16
          run with its gradient scaler. A sync is then listed with its lorafit line from a "warn" rerun.
  eval    ``loop.evaluate``, greedy ``generate.generate`` and ``lorafit.per_row`` (prefill and decode schedules, a
          LoRA and a DoRA adapter and the base in one batch) on the device, against the CPU and the single-adapter
          path.
  quant   ``loop.run`` with ``quantize`` nf4 and int8 (bfloat16 compute) on the device: finite losses, adapter moved.
  memory  ``torch.cuda.max_memory_allocated`` over a ``loop.run`` at SmolLM2-135M's shape (bfloat16, r=16
          all-linear, batch 8 x 512 packed) against ``lorafit.plan(device=...)``'s estimate of the step's tensors
          (``memory.tensors``): a FAIL outside 0.5-2x; only reported where plan has no CUDA estimate.
  bench   one training step (forward, backward, AdamW) of lorafit and PEFT side by side in interleaved rounds, as
          benchmarks/step.py does, against the frozen floor (the same model with nothing trainable, run forward and
          backward to its input embeddings, no optimizer): random Llamas at SmolLM2-135M's shape and at a 1B shape,
          bfloat16, r=16 all-linear, dropout 0.05, LoRA and DoRA. Step time by CUDA events (perf_counter on the CPU);
          peak memory = what the configuration keeps between steps + the step's own peak above that
          (max_memory_allocated on CUDA, torch.profiler's memory events on the CPU). Targets: the step's overhead
          over the floor at most 1/3 of PEFT's, and its extra peak memory over the floor at most 1/2 of PEFT's.

Tolerances (each comparison is max |got - want| against a share of max |want|, tensor by tensor, except losses,
which are compared loss by loss):
  FP32_RTOL 1e-4      one float32 forward/backward on two code paths or devices: ~800 ulps, 10x the CPU tests'
                      1e-5 (tests/core/test_fused.py) for cuBLAS kernels that sum in other orders (split-K); a
                      wrong formula, mask or scale is off by O(1).
  BF16_OUT 2^-6,      bfloat16 (8-bit mantissa): outputs to a few ulps of the largest |output|, float32 gradients
  BF16_GRAD 3e-2      of a bfloat16 computation to 3e-2 (tests/core/test_bf16.py's numbers).
  TRAIN_LOSS_RTOL,    a float32 run on the device against the CPU. TF32 is off for it: lorafit's loop sets
  TRAIN_ADAPTER_RTOL  torch.set_float32_matmul_precision("high") for every float32 CUDA run, so the call is held
                      at "highest" while the run goes (and "highest" is set again after). Rounding that differs in
                      the last bits grows through AdamW (it divides by sqrt(v), so a near-zero gradient's update is
                      ~lr whatever its rounding): measured on the CPU between two SIMD kernel sets
                      (ATEN_CPU_CAPABILITY=default vs avx2, the same 30-step run otherwise): losses 2e-7 relative,
                      adapter tensors 2.2e-5 of their largest |value|. The bounds, 1e-4 and 1e-2, leave ~500x for
                      a GPU's other kernels (exp, rsqrt, attention) and still catch a real difference: one skipped
                      or doubled update moves the next losses by ~5e-3 relative; another dropout mask by O(1)
                      (dropout is 0 here: CUDA draws its masks from its own generator, so they differ from the
                      CPU's by design). TF32 (10-bit mantissa) is reported beside it, not enforced.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; a GPU machine may have no network at all
if (ROOT / "src" / "lorafit").is_dir():
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's lorafit, installed or not (a copy on another machine)

import lorafit  # noqa: E402
from lorafit import fused, layers  # noqa: E402

FP32_RTOL = 1e-4
BF16_OUT_RTOL, BF16_GRAD_RTOL = 2 ** -6, 3e-2
TRAIN_LOSS_RTOL, TRAIN_ADAPTER_RTOL = 1e-4, 1e-2
R, ALPHA = 16, 32  # the benchmark's adapter (benchmarks/step.py's, whose make_step configurations it runs)

# check -> the rows it reports (tests/test_gpu_script.py asserts every one is printed)
ROWS = {
    "train": ["train fp32 = cpu", "train bf16"],
    "fused": ["fused fp32", "fused bf16", "fused autocast"],
    "sync": ["sync-free steps"],
    "eval": ["eval", "generate", "per_row"],
    "quant": ["nf4 step", "int8 step"],
    "memory": ["peak vs plan"],
    "bench": [f"bench {shape} {kind}" for shape in ("135m", "1b") for kind in ("floor", "lora", "dora")],
}


@dataclass
class Row:
    check: str
    name: str
    result: str  # pass | FAIL | measured | n/a: <reason>
    detail: str
    data: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.result == "FAIL"


@dataclass
class Ctx:
    """What every check shares: the device, the size switch, a temporary folder and lazily built files."""

    device: torch.device
    quick: bool
    tmp: Path
    rows: list = field(default_factory=list)
    check: str = ""
    _files: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def add(self, name: str, result: str, detail: str, **data) -> None:
        self.rows.append(Row(self.check, name, result, detail, data))

    def tiny(self) -> tuple[Path, Path]:
        """(a tiny random Llama folder with a trained-here tokenizer, a prompt/completion JSONL), built once."""
        if "tiny" not in self._files:
            tok = make_tokenizer()
            model_dir = save_llama(self.tmp / "tiny-llama", tok, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            self._files["tiny"] = (model_dir, make_sentiment_data(self.tmp / "sentiment.jsonl", n=96))
        return self._files["tiny"]


# --- files: a tiny tokenizer, random Llamas, data (as tests/helpers.py builds them; tests/ is not imported) ------

WORDS = ("good great fine awful bad poor movie film plot actor scene story boring lovely dull superb "
         "terrible nice review sentiment positive negative the a was is and but very not").split()


def make_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) trained here on WORDS: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + [" positive negative"] * 20 + ["Review: the movie was good\nSentiment: positive"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def llama_config(**shape):
    from transformers import LlamaConfig

    shape.setdefault("max_position_embeddings", 2048)
    return LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)


def random_llama(device, dtype=torch.float32, seed: int = 0, **shape):
    """A random LlamaForCausalLM built straight on ``device`` in ``dtype`` (a 1B model never exists in float32 on
    the host)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(llama_config(**shape), dtype=dtype)


def save_llama(path: Path, tok, *, dtype=torch.float32, device="cpu", **shape) -> Path:
    """A random Llama checkpoint folder (config, safetensors, the tokenizer); vocab = the tokenizer's unless given."""
    shape.setdefault("vocab_size", len(tok))
    model = random_llama(device, dtype, **shape)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def make_sentiment_data(path: Path, n: int, seed: int = 0) -> Path:
    """Prompt/completion reviews whose completion (" positive" / " negative") follows from their words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            good = rng.random() < 0.5
            words = " ".join(rng.choice(WORDS[:8] if good else WORDS[3:11]) for _ in range(6))
            f.write(json.dumps({"prompt": f"Review: {words}\nSentiment:",
                                "completion": " positive" if good else " negative"}) + "\n")
    return path


def make_text_data(path: Path, n: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


# --- small helpers ---------------------------------------------------------------------------------------------

def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are zero; inf for a shape mismatch or a non-finite value)."""
    if got.shape != want.shape:
        return math.inf
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
        return math.inf
    scale = w.abs().max().item() if w.numel() else 0.0
    err = (g - w).abs().max().item() if w.numel() else 0.0
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def worst(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[str, float]:
    """(name, error) of the pair with the largest ``rel_err``."""
    errs = {k: rel_err(g, w) for k, (g, w) in pairs.items()}
    name = max(errs, key=errs.get)
    return name, errs[name]


def strict_fp32() -> None:
    """float32 matmuls in float32 (no TF32) from here on, whatever a run before set."""
    torch.set_float32_matmul_precision("highest")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def tf32_held_off():
    """TF32 stays off while the block runs, though lorafit's loop asks for it on a float32 CUDA run (it calls
    torch.set_float32_matmul_precision("high")): the calls are recorded, not applied. Yields the list of them."""
    asked: list[str] = []
    real = torch.set_float32_matmul_precision
    strict_fp32()
    torch.set_float32_matmul_precision = asked.append
    try:
        yield asked
    finally:
        torch.set_float32_matmul_precision = real
        strict_fp32()


@contextlib.contextmanager
def captured():
    """The block's prints (lorafit's run lines, warnings) into a buffer, shown only when a check fails."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**20:.2f} MiB"


def lorafit_frame(frames) -> str:
    """'module.py:line function' of the innermost frame under src/lorafit, and the innermost frame outside it
    (this script's and the warnings module's own frames left out)."""
    src, me = Path(lorafit.__file__).resolve().parent, Path(__file__).resolve()
    frames = [f for f in frames if Path(f.filename).name != "warnings.py" and Path(f.filename).resolve() != me]
    inner = [f for f in frames if src in Path(f.filename).resolve().parents]
    last = frames[-1] if frames else None
    where = f"{Path(inner[-1].filename).resolve().relative_to(src)}:{inner[-1].lineno} {inner[-1].name}" if inner \
        else "outside lorafit"
    if last is not None and (not inner or last is not inner[-1]):
        where += f" (via {Path(last.filename).name}:{last.lineno} {last.name})"
    return where


# --- 1. training on the device = training on the CPU ---------------------------------------------------------------

TRAIN_LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)


def train_run(ctx: Ctx, device, tag: str, *, dtype: str = "float32", lora: dict | None = None,
              quantize: str | None = None, steps: int | None = None, log_every: int = 5) -> dict:
    """One ``loop.run`` of the tiny Llama on ``device``: its summary, per-step losses, final adapter and output."""
    from safetensors.torch import load_file

    from lorafit.train import loop
    from lorafit.train.checkpoint import read_metrics
    from lorafit.train.train_config import TrainConfig

    model_dir, data = ctx.tiny()
    out = ctx.tmp / f"run-{tag}"
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(out), steps=steps or (8 if ctx.quick else 30),
                      batch_size=8, max_length=48, lr=5e-3, log_every=log_every, dtype=dtype, device=str(device),
                      seed=0, eval_max=16, quantize=quantize, lora=dict(lora or TRAIN_LORA))
    with captured() as log:
        try:
            summary = loop.run(cfg, quiet=True)
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {e}; run output: {log.getvalue()[-800:]}") from e
    losses = [m["loss"] for m in read_metrics(out) if m.get("kind") != "eval" and "loss" in m]
    return {"summary": summary, "losses": torch.tensor(losses, dtype=torch.float64),
            "adapter": load_file(str(out / "adapter_model.safetensors")), "cfg": cfg}


@contextlib.contextmanager
def adapters_drawn_on_the_cpu():
    """Adapters initialised from the CPU's generator while the block runs. lorafit draws an adapter's initial A
    (kaiming-uniform) with the generator of its base weights' device, so a CUDA run and a CPU run of one seed start
    from different adapters; for the comparison the device run's A and B are drawn on the CPU (the CPU run's draws,
    in its order) and copied to the device."""
    from lorafit import ops

    real = ops.init_lora

    def on_cpu(A, B, kind, init, r):
        if A.device.type == "cpu":
            return real(A, B, kind, init, r)
        a, b = torch.empty(A.shape, dtype=A.dtype), torch.empty(B.shape, dtype=B.dtype)
        real(a, b, kind, init, r)
        A.copy_(a)
        B.copy_(b)

    ops.init_lora = on_cpu
    try:
        yield
    finally:
        ops.init_lora = real


def compare_runs(got: dict, want: dict) -> tuple[float, str, float]:
    """(worst relative loss difference, the adapter tensor that differs most, its difference)."""
    if got["losses"].shape != want["losses"].shape:
        return math.inf, "loss curve length", math.inf
    loss = ((got["losses"] - want["losses"]).abs() / want["losses"].abs()).max().item()
    if got["adapter"].keys() != want["adapter"].keys():
        return loss, "adapter keys", math.inf
    name, err = worst({k: (got["adapter"][k], want["adapter"][k]) for k in want["adapter"]})
    return loss, name.removeprefix("base_model.model."), err


def check_train(ctx: Ctx) -> None:
    strict_fp32()
    here = {}
    for mode, lora in (("lora", TRAIN_LORA), ("dora", dict(TRAIN_LORA, use_dora=True))):
        cpu = train_run(ctx, "cpu", f"cpu-{mode}", lora=lora)
        with tf32_held_off() as asked, adapters_drawn_on_the_cpu():
            dev = train_run(ctx, ctx.device, f"dev-{mode}", lora=lora)
        here[mode] = (compare_runs(dev, cpu), len(cpu["losses"]), asked)
        if mode == "lora" and ctx.cuda:
            with adapters_drawn_on_the_cpu():
                tf32 = compare_runs(train_run(ctx, ctx.device, "dev-tf32"), cpu)
            strict_fp32()
        elif mode == "lora":
            tf32 = None
    ok = all(loss <= TRAIN_LOSS_RTOL and err <= TRAIN_ADAPTER_RTOL for (loss, _, err), _, _ in here.values())
    detail = "; ".join(f"{mode} {n} steps: losses {loss:.1e} (<= {TRAIN_LOSS_RTOL:g}), adapter {err:.1e} at {name} "
                       f"(<= {TRAIN_ADAPTER_RTOL:g})" for mode, ((loss, name, err), n, _) in here.items())
    asked = here["lora"][2]
    detail += (f"; TF32 held off (lorafit asked for {asked})" if asked else "; TF32 off") + \
        (f"; with TF32 on (lorafit's default): losses {tf32[0]:.1e}, adapter {tf32[2]:.1e}" if tf32 else "")
    ctx.add("train fp32 = cpu", "pass" if ok else "FAIL", detail)

    bf16 = train_run(ctx, ctx.device, "dev-bf16", dtype="bfloat16")
    before, after = bf16["summary"]["before"]["eval_loss"], bf16["summary"]["after"]["eval_loss"]
    finite = bool(torch.isfinite(bf16["losses"]).all()) and math.isfinite(after)
    ok = finite and after < before
    ctx.add("train bf16", "pass" if ok else "FAIL",
            f"{len(bf16['losses'])} steps, train loss {bf16['losses'][0]:.3f} -> {bf16['losses'][-1]:.3f}, eval loss "
            f"{before:.3f} -> {after:.3f}" + ("" if finite else "; a loss is not finite"))


# --- 2. fused against reference, one layer -------------------------------------------------------------------------

FUSED_SHAPE = dict(n_in=256, n_out=192, r=16, x=(4, 33))  # several warps' worth, odd token count


def make_layer(device, mode: str, base_dtype: torch.dtype):
    """A LoraLayer over a random nn.Linear (bias trained too), every parameter drawn on the CPU, then moved."""
    from torch import nn

    from lorafit import ops
    from lorafit.layers import LoraLayer

    s = FUSED_SHAPE
    torch.manual_seed(0)
    base = nn.Linear(s["n_in"], s["n_out"], bias=True)
    layer = LoraLayer(base, "linear", s["r"], 2 * s["r"], ops.scaling(s["r"], 2 * s["r"], False), 0.1,
                      use_dora=mode == "dora")
    layer.reset_adapter(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(layer.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        layer.weight.data = layer.weight.data.to(base_dtype)
        layer.bias.data = layer.bias.data.to(base_dtype)
    layer.bias.requires_grad_(True)
    return layer.to(device).train()


def layer_run(layer, x: torch.Tensor, *, fused_path: bool, autocast: bool):
    """(output, x.grad, {parameter: grad}) of one forward/backward with the dropout seed fixed, and how many times
    the fused autograd function ran."""
    calls, cls = [], fused.LoraLinearFunction
    own, real = vars(cls).get("apply"), cls.apply  # torch.autograd.Function's classmethod, unless the class has one
    cls.apply = lambda *a: calls.append(1) or real(*a)
    layers.FUSED = fused_path
    try:
        x = x.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same dropout seed for both paths: the same masks
        dev = x.device.type
        with torch.autocast(dev, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            out = layer(x)
        w = torch.linspace(-1, 1, out.numel(), device=x.device).view(out.shape)
        (out.float() * w).sum().backward()
    finally:
        if own is None:
            del cls.apply
        else:
            cls.apply = own
        layers.FUSED = True
    grads = {n.rpartition(".")[2]: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach().float(), x.grad.float(), grads, len(calls)


def check_fused(ctx: Ctx) -> None:
    strict_fp32()
    cases = {"fused fp32": (torch.float32, False, FP32_RTOL, FP32_RTOL),
             "fused bf16": (torch.bfloat16, False, BF16_OUT_RTOL, BF16_GRAD_RTOL),
             "fused autocast": (torch.float32, True, BF16_OUT_RTOL, BF16_GRAD_RTOL)}
    x = torch.randn(*FUSED_SHAPE["x"], FUSED_SHAPE["n_in"], generator=torch.Generator().manual_seed(1))
    for name, (base_dtype, autocast, out_tol, grad_tol) in cases.items():
        parts, ok = [], True
        for mode in ("lora", "dora"):
            layer = make_layer(ctx.device, mode, base_dtype)
            xd = x.to(base_dtype).to(ctx.device)
            want = layer_run(layer, xd, fused_path=False, autocast=autocast)
            got = layer_run(layer, xd, fused_path=True, autocast=autocast)
            out_err = rel_err(got[0], want[0])
            grads = {"x": (got[1], want[1]), **{k: (got[2][k], want[2][k]) for k in want[2]}}
            gname, gerr = worst(grads) if got[2].keys() == want[2].keys() else ("parameter set", math.inf)
            ran = got[3] > 0 and want[3] == 0
            ok &= out_err <= out_tol and gerr <= grad_tol and ran
            parts.append(f"{mode}: output {out_err:.1e}, grads {gerr:.1e} ({gname})"
                         + ("" if ran else " [the fused function did not run]"))
        ctx.add(name, "pass" if ok else "FAIL", "; ".join(parts) + f" (<= {out_tol:.2g} / {grad_tol:.2g}; dropout 0.1,"
                f" {FUSED_SHAPE['x']} x {FUSED_SHAPE['n_in']} -> {FUSED_SHAPE['n_out']}, r={FUSED_SHAPE['r']})")


# --- 3. no host read in a step -----------------------------------------------------------------------------------

WARMUP_STEPS = 3
SYNC_VARIANTS = {"lora": ("float32", dict(TRAIN_LORA, lora_dropout=0.1)),
                 "dora": ("float32", dict(TRAIN_LORA, lora_dropout=0.1, use_dora=True)),
                 "float16": ("float16", dict(TRAIN_LORA, lora_dropout=0.1))}


@contextlib.contextmanager
def steps_under(mode: str | None, counter: Counter):
    """loop.train_step run under torch.cuda.set_sync_debug_mode(``mode``) after the warm-up steps (None: plain);
    every reads of the interval (read_steps) stays outside. ``counter['steps']`` counts the watched steps."""
    from lorafit.train import loop

    real = loop.train_step

    def watched(state, batches, step):
        if mode is None or step <= WARMUP_STEPS:
            return real(state, batches, step)
        counter["steps"] += 1
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return real(state, batches, step)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    loop.train_step = watched
    try:
        yield
    finally:
        loop.train_step = real


def sync_sites(ctx: Ctx, variant: str) -> Counter:
    """Every synchronizing call of the watched steps, by lorafit line, from a rerun in "warn" mode."""
    sites, counter = Counter(), Counter()

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[lorafit_frame(traceback.extract_stack()[:-1])] += 1

    dtype, lora = SYNC_VARIANTS[variant]
    with warnings.catch_warnings(), steps_under("warn", counter):
        warnings.simplefilter("always")
        warnings.showwarning = hook
        try:
            train_run(ctx, ctx.device, f"sync-warn-{variant}", dtype=dtype, lora=lora, steps=WARMUP_STEPS + 4,
                      log_every=1000)
        except Exception as e:  # the sites found so far still say where
            sites[f"the rerun failed: {e}"[:200]] += 1
    return sites


def check_sync(ctx: Ctx) -> None:
    steps = WARMUP_STEPS + (4 if ctx.quick else 10)
    parts, ok = [], True
    for variant, (dtype, lora) in SYNC_VARIANTS.items():
        counter = Counter()
        try:
            with steps_under("error" if ctx.cuda else None, counter):
                train_run(ctx, ctx.device, f"sync-{variant}", dtype=dtype, lora=lora, steps=steps, log_every=1000)
            parts.append(f"{variant}: {counter['steps'] if ctx.cuda else steps - WARMUP_STEPS} steps")
        except Exception as e:
            if not ctx.cuda or "synchroniz" not in str(e):
                raise
            ok = False
            sites = sync_sites(ctx, variant)
            parts.append(f"{variant}: a sync in step {WARMUP_STEPS + counter['steps']}; "
                         + (", ".join(f"{n}x {s}" for s, n in sites.most_common(6)) or
                            lorafit_frame(traceback.extract_tb((e.__cause__ or e).__traceback__))))
    if not ctx.cuda:
        ctx.add("sync-free steps", f"n/a: {ctx.device.type} has no sync debug mode",
                "torch.cuda.set_sync_debug_mode is CUDA only; the same steps ran here unwatched: " + "; ".join(parts))
        return
    ctx.add("sync-free steps", "pass" if ok else "FAIL",
            f"set_sync_debug_mode('error') over train_step after {WARMUP_STEPS} warm-up steps, dropout 0.1: "
            + "; ".join(parts))


# --- 4. eval, generate, per_row, quantized steps on the device -------------------------------------------------

def two_adapter_model(ctx: Ctx, device):
    """The tiny Llama on ``device`` with adapters "a" (LoRA) and "b" (DoRA), every adapter value drawn on the CPU."""
    from lorafit.hf import load_model

    model_dir, _ = ctx.tiny()
    model, tok = load_model(model_dir, "float32", device=device)
    for name, dora in (("a", False), ("b", True)):
        lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora,
                                                 init_lora_weights=False), name=name)
    g = torch.Generator().manual_seed(3)  # every value from the CPU's generator: the same adapters on every device
    with torch.no_grad():
        for _, layer in lorafit.adapter_layers(model):
            for name in ("a", "b"):
                ad = layer.adapters[name]
                for p in (ad.lora_A, ad.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                if ad.use_dora:
                    noise = 1 + 0.1 * torch.randn(ad.lora_magnitude.shape, generator=g)
                    ad.lora_magnitude.copy_(layer.weight_norm(ad).view(noise.shape) * noise.to(device))
    lorafit.set_active(model, "a")
    return model.eval(), tok


def check_eval(ctx: Ctx) -> None:
    from lorafit.generate import generate, render
    from lorafit.train import loop
    from lorafit.train.data import file_task
    from lorafit.train.train_config import TrainConfig

    strict_fp32()
    _, data = ctx.tiny()
    task = file_task(data, eval_split=0.25, seed=0, eval_max=32)
    cfg = TrainConfig(batch_size=8, max_length=48)
    scores, answers, mixed = {}, {}, None
    for where in ("cpu", ctx.device):
        model, tok = two_adapter_model(ctx, where)
        scores[str(where)] = loop.evaluate(model, tok, task, cfg)
        prompt = render(tok, prompt=task.eval[0]["prompt"], raw=True)
        answers[str(where)] = generate(model, tok, prompt, max_new_tokens=12)
        if where != "cpu":
            mixed = per_row_result(ctx, model, tok, prompt, answers[str(where)])
        del model
    cpu, dev = scores["cpu"], scores[str(ctx.device)]
    err = abs(dev["eval_loss"] - cpu["eval_loss"]) / abs(cpu["eval_loss"])
    ctx.add("eval", "pass" if err <= FP32_RTOL else "FAIL",
            f"eval loss {dev['eval_loss']:.5f} vs cpu {cpu['eval_loss']:.5f} ({err:.1e} <= {FP32_RTOL:g}), accuracy "
            f"{dev.get('eval_accuracy', float('nan')):.3f} vs {cpu.get('eval_accuracy', float('nan')):.3f}, "
            f"{len(task.eval)} examples")
    same = answers["cpu"] == answers[str(ctx.device)]
    ctx.add("generate", "pass" if same else "FAIL",
            f"greedy, 12 new tokens, adapter a: {answers[str(ctx.device)]} " + ("= cpu" if same else
                                                                                f"!= cpu {answers['cpu']}"))
    ctx.add("per_row", *mixed)


def rows_alone(model, ids: torch.Tensor, names: list) -> torch.Tensor:
    """Each row's logits with its adapter alone active (None: the base model), the single-adapter path."""
    out = []
    for i, name in enumerate(names):
        with (lorafit.disabled(model) if name is None else contextlib.nullcontext()):
            lorafit.set_active(model, name or "a")
            out.append(model(input_ids=ids[i:i + 1]).logits)
    lorafit.set_active(model, "a")
    return torch.cat(out)


@torch.no_grad()
def per_row_result(ctx: Ctx, model, tok, prompt: list[int], greedy_a: list[int]) -> tuple[str, str]:
    """per_row on the device: a batch of rows with adapters a (LoRA), none and b (DoRA), long rows (the bmm
    schedule) and one-token rows (the stacked decode schedule), against each adapter alone; and generate under it."""
    from lorafit.generate import generate

    names = ["a", None, "b"]
    ids = torch.randint(3, len(tok), (3, 24), generator=torch.Generator().manual_seed(2)).to(ctx.device)
    errs = {}
    for label, batch in (("prefill", ids), ("decode", ids[:, :1])):
        with lorafit.per_row(model, names):
            got = model(input_ids=batch).logits
        errs[label] = rel_err(got, rows_alone(model, batch, names))
    with lorafit.per_row(model, ["a"]):
        mixed = generate(model, tok, prompt, max_new_tokens=12)
    ok = max(errs.values()) <= FP32_RTOL and mixed == greedy_a
    return ("pass" if ok else "FAIL",
            ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f" (<= {FP32_RTOL:g}) against each adapter alone; "
            "generate under per_row(['a']) " + ("= adapter a's" if mixed == greedy_a else f"{mixed} != {greedy_a}"))


def torchao_here(device: torch.device) -> str | None:
    """Why torchao's NF4/int8 weights cannot run on ``device`` (None: they can)."""
    import importlib.util

    from lorafit import quant

    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if device.type not in getattr(quant, "DEVICES", ("cpu", "cuda")):
        return f"torchao's kernels are not on {device.type}"
    return None


def check_quant(ctx: Ctx) -> None:
    why = torchao_here(ctx.device)
    for fmt in ("nf4", "int8"):
        if why:
            ctx.add(f"{fmt} step", f"n/a: {why}", f"lorafit.quantize {fmt} needs torchao on {ctx.device}")
            continue
        run = train_run(ctx, ctx.device, f"quant-{fmt}", dtype="bfloat16", quantize=fmt, steps=4 if ctx.quick else 10)
        finite = bool(torch.isfinite(run["losses"]).all())
        moved = max(t.abs().max().item() for k, t in run["adapter"].items() if "lora_B" in k)
        ev = run["summary"]["after"]["eval_loss"]
        ok = finite and moved > 0 and math.isfinite(ev)
        ctx.add(f"{fmt} step", "pass" if ok else "FAIL",
                f"{len(run['losses'])} steps over a {fmt} base (bfloat16 compute): loss {run['losses'][0]:.3f} -> "
                f"{run['losses'][-1]:.3f}, eval loss {ev:.3f}, max |lora_B| {moved:.2e}")


# --- 5. peak memory of a run against lorafit.plan ------------------------------------------------------------------

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
               rms_norm_eps=1e-5)
ONE_B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000)
QUICK_SHAPES = {"135m": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
                "1b": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1024)}


def plan_estimate(model_dir: Path, lora: dict, batch: int, length: int, device: torch.device):
    """(the estimate of the step's tensor bytes, its MemoryEstimate, a label): plan's own CUDA estimate where plan
    takes ``device=`` (``memory.tensors``: what max_memory_allocated should come near), else its host-RSS model
    without the process's runtime."""
    import inspect

    from lorafit.advise.plan import plan
    from lorafit.hf import meta_model

    model = meta_model(model_dir, "bfloat16")
    cfg = lorafit.LoraConfig(**lora)
    if "device" in inspect.signature(plan).parameters:
        mem = plan(model, cfg, batch_size=batch, max_length=length, runtime=0, device=device)["memory"]
        label = f"plan(device={device.type})"
    else:
        mem = plan(model, cfg, batch_size=batch, max_length=length, runtime=0)["memory"]
        label = "plan (host-RSS model)"
    tensors = mem.weights + mem.adapter + mem.activations + mem.logits  # = memory.tensors, where it exists
    return tensors, mem, label


def memory_run(ctx: Ctx) -> tuple[Path, dict, int, int, str, int]:
    """``loop.run`` at SmolLM2-135M's shape (a stand-in with --quick), bfloat16, packed text: (model folder, LoRA
    settings, batch, length, what it was, CUDA bytes allocated when it started, its peak stats reset there)."""
    from lorafit.train import loop
    from lorafit.train.train_config import TrainConfig

    shape = QUICK_SHAPES["135m"] if ctx.quick else SMOLLM2
    batch, length, steps = (2, 64, 2) if ctx.quick else (8, 512, 4)
    model_dir = save_llama(ctx.tmp / "mem-llama", make_tokenizer(), dtype=torch.bfloat16, device=ctx.device, **shape)
    free(ctx.device)
    data = make_text_data(ctx.tmp / "mem.jsonl", n=(40 if ctx.quick else 400), words=100)
    lora = dict(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.05)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(ctx.tmp / "run-mem"), steps=steps,
                      batch_size=batch, max_length=length, pack=True, dtype="bfloat16", device=str(ctx.device),
                      eval_max=batch, lora=lora, log_every=steps)
    start = 0
    if ctx.cuda:  # the run's own peak: from here (its files are written, the builder's memory is freed)
        sync(ctx.device)
        start = torch.cuda.memory_allocated(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
    with captured():
        loop.run(cfg, quiet=True)
    what = f"bfloat16 {'quick stand-in' if ctx.quick else 'SmolLM2-135M shape'}, r={R} all-linear, batch {batch} x " \
        f"{length} packed, {steps} steps"
    return model_dir, lora, batch, length, what, start


def check_memory(ctx: Ctx) -> None:
    model_dir, lora, batch, length, what, start = memory_run(ctx)
    est, mem, label = plan_estimate(model_dir, lora, batch, length, ctx.device)
    if not ctx.cuda:
        ctx.add("peak vs plan", "n/a: max_memory_allocated is CUDA only",
                f"the run went through on {ctx.device.type} ({what}); {label} tensors: {mib(est)}")
        return
    peak = torch.cuda.max_memory_allocated(ctx.device) - start
    reserved = torch.cuda.max_memory_reserved(ctx.device)
    slack = getattr(mem, "slack", 0)
    ratio = est / peak
    enforced = label.startswith("plan(device")
    ok = 0.5 <= ratio <= 2.0
    ctx.add("peak vs plan", ("pass" if ok else "FAIL") if enforced else "measured",
            f"max_memory_allocated over loop.run {mib(peak)}, {label} tensors {mib(est)}: estimate/measured "
            f"{ratio:.2f} ({'must be 0.5-2' if enforced else 'not enforced: plan has no CUDA estimate'}); "
            f"max_memory_reserved {mib(reserved)} against tensors + slack {mib(est + slack)}; {what}",
            peak=peak, estimate=est, reserved=reserved)


# --- 6. lorafit against PEFT, against the floor ------------------------------------------------------------------

CONFIGS = ("floor", "peft-lora", "lorafit-lora", "peft-dora", "lorafit-dora")


@dataclass
class Bench:
    """One configuration of the benchmark: its step, what it keeps between steps, and its measurements."""

    name: str
    step: object
    live: object  # () -> the tensors it keeps between steps (CPU memory)
    kept: int = 0  # bytes it keeps between steps (model copy, adapter, optimizer state, batch)
    transient: int = 0  # the largest peak of a step above what was allocated before it
    times: list = field(default_factory=list)


def make_step(base, config: str, ids: torch.Tensor, dropout: float = 0.05):
    """(step, live) of ``config`` on a copy of ``base``: benchmarks/step.py's configurations and step, on a
    device."""
    from step import adapted, training_step

    step = training_step(adapted(copy.deepcopy(base).train(), config, dropout), ids)
    return step, step.live_tensors


def timed_step(b: Bench, device: torch.device) -> None:
    """One step: its time (CUDA events, or perf_counter on the CPU) and, on CUDA, its peak above what it found."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.step()
        end.record()
        end.synchronize()
        b.times.append(start.elapsed_time(end) / 1e3)
        b.transient = max(b.transient, torch.cuda.max_memory_allocated(device) - before)
    else:
        t0 = time.perf_counter()
        b.step()
        b.times.append(time.perf_counter() - t0)


def cpu_transient(b: Bench) -> int:
    """The step's peak of live tensor memory above what it found, from torch.profiler's memory events (the CPU's
    allocator keeps no peak): the highest running total less the total before the first allocation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        b.step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            events = sorted((e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"
                             and e["args"].get("Device Type") == 0), key=lambda e: e["ts"])
    events = [e["args"] for e in events]
    if not events:
        return 0
    return max(e["Total Allocated"] for e in events) - (events[0]["Total Allocated"] - events[0]["Bytes"])


def build_benches(base, ids: torch.Tensor, device: torch.device, warmup: int) -> list[Bench]:
    """Every configuration, built one after another so that what each keeps is its own allocation (CUDA), or the
    storages it holds (CPU); the warm-up steps create the optimizer state."""
    benches = []
    for config in CONFIGS:
        sync(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        step, live = make_step(base, config, ids)
        b = Bench(config, step, live)
        for _ in range(warmup):
            step()
        sync(device)
        if device.type == "cuda":
            b.kept = torch.cuda.memory_allocated(device) - before
        else:
            b.kept = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in live()}.values())
        benches.append(b)
    return benches


def run_bench(shape_name: str, ctx: Ctx) -> dict[str, Bench]:
    """The interleaved rounds of one shape: each round one step per configuration, in rotating order."""
    shape = QUICK_SHAPES[shape_name] if ctx.quick else {"135m": SMOLLM2, "1b": ONE_B}[shape_name]
    batch, length = (2, 32) if ctx.quick else ((8, 512) if shape_name == "135m" else (4, 512))
    rounds, warmup = (3, 1) if ctx.quick else (10, 3)
    base = random_llama(ctx.device, torch.bfloat16, **shape)
    ids = torch.randint(0, shape["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))
    benches = build_benches(base, ids.to(ctx.device), ctx.device, warmup)
    del base
    free(ctx.device)
    for rnd in range(rounds):
        for b in benches[rnd % len(benches):] + benches[:rnd % len(benches)]:
            timed_step(b, ctx.device)
    if not ctx.cuda:
        for b in benches:
            b.transient = cpu_transient(b)
    out = {b.name: b for b in benches}
    out["_what"] = f"batch {batch} x {length}, {rounds} rounds (+{warmup} warm-up)"
    return out


def ratio_text(x: float | None, target: float) -> str:
    if x is None:
        return "- (PEFT not above the floor)"
    return f"{x:.2f} (target <= {target:.2g}: {'met' if x <= target else 'missed'})"


def bench_rows(ctx: Ctx, shape_name: str, res: dict) -> None:
    floor = res["floor"]
    peak = {k: b.kept + b.transient for k, b in res.items() if k != "_what"}
    desc = ("quick stand-in " if ctx.quick else "") + ("SmolLM2-135M shape" if shape_name == "135m" else "1B shape")
    clock = "CUDA events" if ctx.cuda else "perf_counter"
    ctx.add(f"bench {shape_name} floor", "measured",
            f"{desc}, bf16, {res['_what']}: step {statistics.median(floor.times) * 1e3:.1f} ms ({clock}), peak "
            f"{mib(peak['floor'])}", step_s=floor.times, peak=peak["floor"])
    for method in ("lora", "dora"):
        lf, pf = res[f"lorafit-{method}"], res[f"peft-{method}"]
        over = [(a - f) / (b - f) for a, b, f in zip(lf.times, pf.times, floor.times) if b - f > 0]
        x_floor = statistics.median(a / f for a, f in zip(lf.times, floor.times))
        p_floor = statistics.median(b / f for b, f in zip(pf.times, floor.times))
        x_peft = statistics.median(a / b for a, b in zip(lf.times, pf.times))
        extra_l, extra_p = peak[lf.name] - peak["floor"], peak[pf.name] - peak["floor"]
        mem = extra_l / extra_p if extra_p > 0 else None
        ctx.add(f"bench {shape_name} {method}", "measured",
                f"lorafit {statistics.median(lf.times) * 1e3:.1f} ms ({x_floor:.2f}x floor), PEFT "
                f"{statistics.median(pf.times) * 1e3:.1f} ms ({p_floor:.2f}x floor), lorafit/PEFT {x_peft:.2f}; "
                f"overhead over floor lorafit/PEFT {ratio_text(statistics.median(over) if over else None, 1 / 3)}; "
                f"extra peak lorafit {mib(extra_l)}, PEFT {mib(extra_p)}, ratio {ratio_text(mem, 1 / 2)}",
                lorafit_s=lf.times, peft_s=pf.times, floor_s=floor.times, extra_lorafit=extra_l, extra_peft=extra_p)


def check_bench(ctx: Ctx) -> None:
    import peft  # noqa: F401 - the comparison needs it: missing, every bench row fails with the ImportError

    for shape_name in ("135m", "1b"):
        res = run_bench(shape_name, ctx)
        bench_rows(ctx, shape_name, res)
        del res
        free(ctx.device)


CHECKS = {"train": check_train, "fused": check_fused, "sync": check_sync, "eval": check_eval, "quant": check_quant,
          "memory": check_memory, "bench": check_bench}


# --- the run -------------------------------------------------------------------------------------------------------

def versions() -> str:
    import importlib.metadata as md

    found = []
    for pkg in ("transformers", "peft", "torchao"):
        try:
            found.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            found.append(f"{pkg} not installed")
    return ", ".join(found)


def device_line(device: torch.device) -> str:
    from lorafit.devices import device_label
    from lorafit.hf import native_bf16

    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    line = f"# torch {torch.__version__}{cuda}, {versions()}, lorafit {lorafit.__version__}; " \
        f"device {device_label(device)}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        line += (f": compute {major}.{minor}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB, "
                 f"bf16 {'native' if native_bf16('cuda')[0] else 'emulated'}, fp16 yes, "
                 f"tf32 {'yes' if major >= 8 else 'no'}")
    else:
        line += f": {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs, bf16 " \
                f"{'native' if native_bf16('cpu')[0] else 'emulated'} ({native_bf16('cpu')[1]}), fp16 emulated"
    return line


def run_check(ctx: Ctx, name: str) -> float:
    """Run one check; an exception fails every row it had not reported yet, with the error and its lorafit line."""
    ctx.check = name
    done = len(ctx.rows)
    t0 = time.perf_counter()
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    try:
        CHECKS[name](ctx)
    except Exception as e:
        seen = {r.name for r in ctx.rows[done:]}
        where = lorafit_frame(traceback.extract_tb((e.__cause__ or e).__traceback__))
        msg = " ".join(f"{type(e).__name__}: {e}".split())[:600]
        for row in ROWS[name]:
            if row not in seen:
                ctx.add(row, "FAIL", f"{msg} [at {where}]")
    finally:
        layers.FUSED = True
        free(ctx.device)
    took = time.perf_counter() - t0
    for r in ctx.rows[done:]:
        r.data["check_s"] = round(took, 1)
    print(f"[{name}] {took:.1f} s", file=sys.stderr, flush=True)
    return took


def table(rows: list[Row]) -> str:
    w1 = max(len("check"), *(len(r.name) for r in rows))
    w2 = max(len("result"), *(len(r.result) for r in rows))
    lines = [f"{'check':<{w1}} | {'result':<{w2}} | detail", f"{'-' * w1}-+-{'-' * w2}-+-{'-' * 6}"]
    lines += [f"{r.name:<{w1}} | {r.result:<{w2}} | {r.detail}" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (lorafit.devices)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps/rounds (the CPU test's mode)")
    ap.add_argument("--only", type=lambda s: [c.strip() for c in s.split(",") if c.strip()], default=list(CHECKS),
                    help=f"comma-separated checks to run: {','.join(CHECKS)} (default: all)")
    ap.add_argument("--json", type=Path, help="also write the table (and the raw measurements) as JSON here")
    args = ap.parse_args(argv)
    unknown = [c for c in args.only if c not in CHECKS]
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from lorafit.devices import resolve_device

    device, why = resolve_device(args.device)
    t0 = time.perf_counter()
    head = device_line(device) + f" ({why}); {'quick' if args.quick else 'full'} sizes; {time.strftime('%Y-%m-%d')}"
    print(head, flush=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="lorafit-gpu-") as tmp:
        ctx = Ctx(device, args.quick, Path(tmp))
        times = {name: round(run_check(ctx, name), 1) for name in args.only}
    failed = sum(r.failed for r in ctx.rows)
    counts = Counter(r.result.split(":")[0] for r in ctx.rows)
    wall = time.perf_counter() - t0
    print(table(ctx.rows))
    print(f"# {len(ctx.rows)} rows: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + f"; {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": head, "quick": args.quick, "wall_s": round(wall, 1),
                                         "check_s": times, "failed": failed,
                                         "rows": [r.__dict__ for r in ctx.rows]}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
