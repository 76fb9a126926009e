"""Fine-tune a causal LM with LoRA: a resumable training loop with checkpoints, metrics and evaluation.

Output folder layout:
    config.yaml                 the effective configuration (``lorafit train --config`` takes it back)
    metrics.jsonl               one object per optimizer step ({"step", "loss", "lr", ...}) and per evaluation
    checkpoint-<step>/          adapter + trainer_state.pt (optimizer, scheduler, RNG, step), written atomically
    adapter_config.json, adapter_model.safetensors   the final adapter (PEFT layout)
    report.png                  loss curve and eval before/after
    trainer_state.json          {"finished": true, ...} once the run is complete
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import io as lio
from .config import ConfigError, LoraConfig
from .data import IGNORE, DataError, batch_indices, collate, read_examples, split, tokenize
from .checkpoint import (append_metrics, latest_checkpoint, load_optimizer_state, optimizer_state, read_metrics,
                         save_checkpoint, write_text_atomic)
from .model import adapter_parameter_names, attach, trainable_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, a broken checkpoint); the message says what is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; ``config.yaml`` in the output folder is this dataclass."""

    model: Optional[str] = None  # a local transformers causal-LM folder; None = the embedded SmolLM2-135M-Instruct
    data: Optional[str] = None  # JSONL/CSV of {"text"} or {"prompt","completion"}; None = the embedded sentiment task
    output: Optional[str] = None  # default runs/<timestamp>
    steps: int = 100  # optimizer steps (ignored when epochs is set)
    epochs: Optional[float] = None  # passes over the training split; sets steps
    batch_size: int = 8  # examples per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate; LoRA tolerates ~10x full fine-tuning's (LoRA §5)
    schedule: str = "cosine"  # cosine | linear | constant, after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_length: int = 256  # tokens per example (prompts are cut from the left)
    seed: int = 0
    eval_split: float = 0.1  # share of the data held out for evaluation
    eval_max: Optional[int] = 500  # at most this many eval examples
    eval_every: int = 0  # evaluate every N steps (0: only before and after training)
    save_every: int = 0  # checkpoint every N steps (0: never)
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights of the base model)
    add_eos: bool = True  # append EOS to completions / texts
    strategy: str = "auto"  # under torchrun: ddp | fsdp | auto (DDP when a weight copy fits, else FSDP2)
    dist_timeout: float = 300  # seconds a collective may wait for a peer before the job fails
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, lora_alpha=16,
                                                                target_modules=["q_proj", "v_proj"]))

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig.from_dict(self.lora, strict=True)
        positive = ("steps", "batch_size", "grad_accum", "max_length")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} is invalid: expected a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r} is invalid: expected an integer >= 0")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or not self.epochs > 0):
            raise ConfigError(f"epochs={self.epochs!r} is invalid: expected a positive number")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr!r} is invalid: expected a number in (0, 1), e.g. 1e-3")
        if not isinstance(self.eval_split, (int, float)) or not 0 <= self.eval_split < 1:
            raise ConfigError(f"eval_split={self.eval_split!r} is invalid: expected a number in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")
        if self.strategy not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"strategy={self.strategy!r} is invalid: expected auto, ddp or fsdp")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
        for name in ("weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}={v!r} is invalid: expected a finite number >= 0")
        for name in ("model", "data", "output"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected a path")
        if self.eval_max is not None and (isinstance(self.eval_max, bool) or not isinstance(self.eval_max, int)
                                          or self.eval_max < 1):
            raise ConfigError(f"eval_max={self.eval_max!r} is invalid: expected a positive integer or null")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not math.isfinite(self.epochs)):
            raise ConfigError(f"epochs={self.epochs!r} is invalid: expected a positive number")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) \
                or not math.isfinite(self.dist_timeout) or self.dist_timeout <= 0:
            raise ConfigError(f"dist_timeout={self.dist_timeout!r} is invalid: expected a positive number of seconds")
        for name in ("gradient_checkpointing", "add_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected true or false")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length!r} is invalid: an example needs at least 2 tokens")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora"}
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError("a training config must be a mapping of setting names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(known))}"
                              " (LoRA settings go under 'lora:')")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(str(e)) from None


# --- the pieces of a run ---------------------------------------------------------------------------------

@dataclass
class Task:
    """What to train on: tokenizable examples plus, for classification-like data, the answer choices."""

    train: list[dict]
    eval: list[dict]
    choices: Optional[list[str]] = None  # single-token completions scored by next-token log-probability
    name: str = "custom"


def load_task(cfg: TrainConfig) -> Task:
    """The user's data file split into train/eval, or the embedded sentiment task."""
    if cfg.data is None:
        from .tasks import sentiment_task
        return sentiment_task(cfg.seed, cfg.eval_max)
    examples = read_examples(cfg.data)
    train, held = split(examples, cfg.eval_split, cfg.seed, cfg.eval_max)
    completions = sorted({e["completion"] for e in examples if "completion" in e})
    choices = completions if 2 <= len(completions) <= 10 else None
    return Task(train, held, choices)


def resolve_model_dir(cfg: TrainConfig, progress: bool = True) -> Path:
    if cfg.model is None:
        from .assets import smollm2
        return smollm2(progress=progress)
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise DataError(f"model folder {path} is not a transformers checkpoint (no config.json); pass a folder "
                        "saved with save_pretrained")
    return path


def load_model(model_dir: Path, dtype: str):
    """A transformers causal LM and its tokenizer from a local folder (no network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot load a causal LM and tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) over the adapter parameters, with torch's fused kernel where it applies.

    The fused kernel updates every tensor in one pass instead of ~10 small ops per tensor: on the CPU, one step over
    SmolLM2's 420 all-linear adapter tensors takes ~7 ms instead of ~44 ms. It needs plain floating-point tensors on
    the CPU or a CUDA device; FSDP2's DTensor shards keep torch's default implementation.
    """
    fused = fused and bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return f


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a label is predicted: (N, V) logits, (N,) targets, and (B, K) which of the kept positions
    each row labels. The LM head runs on the K labelled positions instead of all T (transformers'
    ``logits_to_keep``), which for one-token answers saves most of the head's time and the (B, T, V) logits."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE
    cols = mask.any(0).nonzero().squeeze(1)  # (K,)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from .distributed import unwrap
    if _accepts_logits_to_keep(unwrap(model)):
        logits = model(**kwargs, logits_to_keep=cols).logits  # (B, K, V)
    else:
        logits = model(**kwargs).logits[:, :-1][:, cols]  # (B, K, V)
    sel = mask[:, cols]  # (B, K)
    return logits[sel], targets[:, cols][sel], sel


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (non-IGNORE) positions."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets)


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (the caller divides by the step's token count,
    so micro-batches and ranks with different numbers of tokens weigh each token equally)."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


@torch.no_grad()
def evaluate(model, tok, task: Task, cfg: TrainConfig, progress: bool, d=None) -> dict[str, float]:
    """Eval loss over the held-out split, and choice accuracy when the task has single-token choices. Under
    torchrun each rank scores every world-th example and the sums are all-reduced."""
    from tqdm.auto import tqdm

    from .distributed import Dist, all_sum

    d = d or Dist()
    if not task.eval:
        return {}
    examples = task.eval[d.rank::d.world]
    was_training = model.training
    model.eval()
    choice_ids = None
    if task.choices:
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in task.choices]
        choice_ids = [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None
    total, count, correct = 0.0, 0, 0
    for i in tqdm(range(0, len(examples), cfg.batch_size), desc="evaluating", disable=not progress, leave=False):
        chunk = examples[i:i + cfg.batch_size]
        batch = collate([tokenize(e, tok, cfg.max_length, cfg.add_eos) for e in chunk], tok.pad_token_id)
        logits, targets, sel = labelled_logits(model, batch)  # (N, V), (N,), (B, K)
        logits = logits.float()
        total += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        if choice_ids is not None:
            first = sel.cumsum(1).eq(1) & sel  # (B, K): each row's first labelled position
            rows = logits[first[sel]]  # (B, V): the logits that predict the first answer token
            gold = torch.tensor([task.choices.index(e["completion"]) for e in chunk])
            correct += int((rows[:, choice_ids].argmax(1) == gold).sum())
    model.train(was_training)
    total, count, correct = all_sum([total, float(count), float(correct)], d)
    out = {"eval_loss": total / max(count, 1)}
    if choice_ids is not None:
        out["eval_accuracy"] = correct / len(task.eval)
    return out


# --- the run ---------------------------------------------------------------------------------------------

def _say(quiet: bool):
    import sys

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)
    return say


def prepare_output(cfg: TrainConfig, resume: bool) -> Path:
    """The output folder; a fresh run refuses a non-empty folder so that nothing is ever overwritten."""
    out = Path(cfg.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} already exists and is not empty; continue it with --resume {out} "
                        "or choose another --output")
    return out


def run(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False) -> dict:
    """Train per ``cfg`` (or continue the run in ``cfg.output`` with ``resume``) and return a summary dict.

    Bad input (data, model folder, LoRA config) raises before anything is written to the output folder. Under
    torchrun, every rank trains its share of each global batch and rank 0 writes the files.
    """
    import yaml
    from tqdm.auto import tqdm

    from . import distributed as D

    d = D.setup(cfg.dist_timeout)
    t0 = time.time()
    say = _say(quiet) if d.main else (lambda msg: None)
    if quiet or not d.main:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    show = not quiet and d.main
    out = prepare_output(cfg, resume)
    state_file = out / "trainer_state.json"
    if resume and state_file.is_file() and json.loads(state_file.read_text()).get("finished"):
        say(f"{out}: this run is already finished; nothing to do")
        D.teardown(d)
        return json.loads(state_file.read_text())

    task = load_task(cfg)
    model_dir = resolve_model_dir(cfg, progress=show)
    model, tok = load_model(model_dir, cfg.dtype)
    from .targets import select_targets
    select_targets(model, cfg.lora)  # a config that does not fit the model fails here, before any file is written
    train_set = [tokenize(e, tok, cfg.max_length, cfg.add_eos) for e in task.train]
    if not any(lab != IGNORE for ex in train_set for lab in ex["labels"][1:]):
        raise DataError(f"no training example of {cfg.data or 'the task'} has a token to predict (each needs at "
                        "least 2 tokens, or a non-empty completion); add longer examples")
    global_batch = cfg.batch_size * d.world
    if len(train_set) < global_batch:
        raise DataError(f"the training split has {len(train_set)} examples, fewer than one global batch "
                        f"({cfg.batch_size} x {d.world} processes); add data or lower --batch-size")
    steps = math.ceil(cfg.epochs * len(train_set) / (global_batch * cfg.grad_accum)) if cfg.epochs else cfg.steps
    D.barrier(d)  # every rank has validated its input before rank 0 writes anything

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        lio.load(model, ckpt)
    else:
        attach(model, cfg.lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_train, n_total = trainable_parameters(model)
    strategy = D.choose_strategy(cfg.strategy, model, d) if d.enabled else "single"
    core = model  # the user's (unwrapped) model; under FSDP2 it is sharded in place
    if d.enabled:
        model = D.wrap(model, strategy, d)
    model.train()
    names = set(adapter_parameter_names(core))
    params = [p for n, p in core.named_parameters() if n in names]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay, fused=strategy != "fsdp")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    start = 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        load_optimizer_state(model, optimizer, state["optimizer"], strategy)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        start = state["step"]
        say(f"resuming {out} from {ckpt.name}")
    kept = [r for r in read_metrics(out) if r["step"] <= start and (start > 0 or r.get("kind") == "eval")]

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    log = (lambda record: append_metrics(out, record)) if d.main else (lambda record: None)
    say(f"model {model_dir} | trainable {n_train:,} of {n_total:,} parameters ({100 * n_train / n_total:.3f}%) | "
        f"{len(train_set)} train / {len(task.eval)} eval examples | {steps} steps"
        + (f" | {d.world} processes, {strategy}" if d.enabled else ""))

    before = next((r for r in kept if r.get("kind") == "eval" and r["step"] == 0), None)
    if before is None:
        before = {"step": 0, "kind": "eval", **evaluate(model, tok, task, cfg, show, d)}
        log(before)
        say(f"before training: {_fmt(before)}")

    batches = batch_indices(len(train_set), global_batch, cfg.seed, start=start * cfg.grad_accum)
    bar = tqdm(total=steps, initial=start, desc="training", disable=not show, dynamic_ncols=True)
    last_ckpt = ckpt
    for step in range(start + 1, steps + 1):
        micro = []
        for _ in range(cfg.grad_accum):
            idx = next(batches)[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]
            micro.append(collate([train_set[i] for i in idx], tok.pad_token_id))
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        (n_tokens,) = D.all_sum([float(local_tokens)], d)  # the step's loss is the mean over all its tokens
        local_loss = 0.0
        for k, batch in enumerate(micro):
            sync = k == len(micro) - 1 or strategy != "ddp"
            with (contextlib.nullcontext() if sync else model.no_sync()):
                loss_sum = token_loss_sum(model, batch)
                if not torch.isfinite(loss_sum):
                    kept_msg = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    raise TrainingError(f"loss became {loss_sum.item()} at step {step}; stopping ({kept_msg}). "
                                        "Lower --lr, use float32, or check the data")
                (loss_sum * (d.world / max(n_tokens, 1.0))).backward()  # DDP averages over ranks: undo it
            local_loss += loss_sum.item()
        (total,) = D.all_sum([local_loss], d)
        total /= max(n_tokens, 1.0)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(norm):
            kept_msg = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
            raise TrainingError(f"gradients became non-finite at step {step}; stopping before the update "
                                f"({kept_msg}). Lower --lr, use float32, or check the data")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log({"step": step, "loss": total, "lr": scheduler.get_last_lr()[0], "grad_norm": float(norm),
             "elapsed": round(time.time() - t0, 2)})
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if quiet and (step % max(1, steps // 10) == 0 or step == steps):
            say(f"step {step}/{steps} loss {total:.4f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
            ev = {"step": step, "kind": "eval", **evaluate(model, tok, task, cfg, False, d)}
            log(ev)
            say(f"step {step}: {_fmt(ev)}")
        if cfg.save_every and step % cfg.save_every == 0:
            last_ckpt = save_checkpoint(out, step, core, optimizer_state(model, optimizer, strategy), scheduler, d)
    bar.close()

    after = {"step": steps, "kind": "eval", **evaluate(model, tok, task, cfg, show, d)}
    log(after)
    divergence = D.max_divergence(params, d) if strategy == "ddp" else None
    tensors = lio.adapter_state_dict(core)  # a collective under FSDP: every rank gathers
    summary = {"finished": True, "steps": steps, "before": before, "after": after, "trainable": n_train,
               "total": n_total, "wall_time_s": round(time.time() - t0, 1), "output": str(out),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "processes": d.world, "strategy": strategy, "max_rank_divergence": divergence}
    if d.main:
        lio.write_adapter(core, out, tensors)
        from .report import plot_run
        plot_run(read_metrics(out), out / "report.png", title=f"lorafit: {task.name}")
        write_text_atomic(state_file, json.dumps(summary, indent=2))
    say(f"after training:  {_fmt(after)}")
    say(f"done in {summary['wall_time_s']:.0f} s (peak memory {summary['peak_rss_mib']:.0f} MiB); adapter, "
        f"config.yaml, metrics.jsonl and report.png in {out}")
    D.barrier(d)
    D.teardown(d)
    return summary


def _fmt(ev: dict) -> str:
    parts = []
    if "eval_accuracy" in ev:
        parts.append(f"accuracy {ev['eval_accuracy']:.3f}")
    if "eval_loss" in ev:
        parts.append(f"eval loss {ev['eval_loss']:.4f}")
    return ", ".join(parts) or "no eval split"
