"""Fine-tune a causal LM with LoRA: a resumable training loop with checkpoints, metrics and evaluation.

``run`` reads as its steps: ``prepare`` (check the input, load model and data, attach or restore the adapter) ->
``restore`` (optimizer, scheduler and RNG from the last checkpoint) -> ``fit`` (one ``train_step`` per optimizer
step, evaluations and checkpoints between them) -> ``finish`` (final eval, adapter, report, summary).

Output folder layout:
    config.yaml                 the effective configuration (``lorafit train --config`` takes it back)
    metrics.jsonl               one object per optimizer step ({"step", "loss", "lr", ...}) and per evaluation
    checkpoint-<step>/          adapter + trainer_state.pt (optimizer, scheduler, RNG, step), written atomically
    adapter_config.json, adapter_model.safetensors   the final adapter (PEFT layout)
    report.png                  loss curve and eval before/after
    trainer_state.json          {"finished": true, ...} once the run is complete
"""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import peft_format
from ..devices import accumulation_dtype, device_line, resolve_device
from ..errors import DataError, TrainingError
from ..experts import expert_weights, left_out_note
from ..files import read_json, write_json, write_text
from ..hf import (
    DTYPES,
    IGNORE,
    bf16_speed,
    check_model_dir,
    labelled_logits,
    load_model,
    native_bf16,
    to_device,
    use_chat_template,
)
from ..model import adapter_parameter_names, attach, state_of, trainable_parameters
from ..quant import check_device
from ..targets import output_layer_names, select_targets
from . import distributed as D
from . import trackers
from .checkpoint import (
    append_metrics,
    latest_checkpoint,
    load_optimizer_state,
    optimizer_state,
    read_metrics,
    save_checkpoint,
    set_device_rng_state,
)
from .data import Task, batch_indices, collate, file_task, pack, tokenize_all
from .steps import read_steps, skips_on_device, train_step
from .train_config import TrainConfig


def load_task(cfg: TrainConfig) -> Task:
    """The user's data file split into train/eval, or the embedded sentiment task."""
    if cfg.data is None:
        from ..demo.task import CHOICES, NAME, sentiment_examples
        train, held = sentiment_examples(cfg.seed, cfg.eval_max)
        return Task(train, held, choices=list(CHOICES), name=NAME)
    return file_task(cfg.data, eval_split=cfg.eval_split, seed=cfg.seed, eval_max=cfg.eval_max)


def resolve_model_dir(cfg: TrainConfig, progress: bool = True) -> Path:
    """The model folder of ``cfg``, or the embedded SmolLM2-135M-Instruct (built on first use)."""
    if cfg.model is None:
        from ..demo.assets import smollm2
        return smollm2(progress=progress)
    return check_model_dir(cfg.model)


def load_for(cfg: TrainConfig, progress: bool = True):
    """(model, tokenizer, task, model_dir) for ``cfg``, loaded as ``lorafit train`` loads them."""
    task = load_task(cfg)
    model_dir = resolve_model_dir(cfg, progress=progress)
    model, tok = load_model(model_dir, cfg.dtype)
    return model, tok, task, model_dir


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
    warmup = cfg.warmup(total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return f


def model_device(model) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model, tok, task: Task, cfg: TrainConfig, *, progress: bool = False, d=None) -> dict[str, float]:
    """Eval loss over the held-out split, and choice accuracy when the task has single-token choices. Under
    torchrun each rank scores every world-th example and the sums are all-reduced."""
    from tqdm.auto import tqdm

    d = d or D.Dist()
    if not task.eval:
        return {}
    examples = task.eval[d.rank::d.world]
    was_training = model.training
    model.eval()
    choice_ids = None
    if task.choices:
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in task.choices]
        choice_ids = [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None
    device = d.device if d.enabled else model_device(model)
    # loss, tokens, correct answers: summed on the device, read once at the end
    sums = torch.zeros(3, dtype=accumulation_dtype(device), device=device)
    for i in tqdm(range(0, len(examples), cfg.batch_size), desc="evaluating", disable=not progress, leave=False):
        chunk = examples[i:i + cfg.batch_size]
        rows, _ = tokenize_all(chunk, tok, cfg.max_length, cfg.add_eos, train_on_prompt=cfg.train_on_prompt)
        if not rows:
            continue
        batch = to_device(collate(rows, tok.pad_token_id), device)
        logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,), (B, K)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum")
        sums[1] += targets.numel()
        if choice_ids is not None:
            answers = logits.index_select(0, batch["label_first"])  # (B, V): the logits of each answer's first token
            gold = to_device({"gold": torch.tensor([task.choices.index(e["completion"]) for e in chunk])},
                             device)["gold"]  # pinned and non_blocking, as the batch
            sums[2] += (answers[:, choice_ids].argmax(1) == gold).sum()
    model.train(was_training)
    total, count, correct = D.all_sum_tensor(sums, d).tolist()
    out = {"eval_loss": total / max(count, 1)}
    if choice_ids is not None:
        out["eval_accuracy"] = correct / len(task.eval)
    return out


# --- the run ---------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """The state of one run as its steps pass it along."""

    cfg: TrainConfig
    d: D.Dist
    out: Path
    say: Callable[[str], None]
    show: bool  # progress bars (rank 0, not --quiet)
    quiet: bool
    t0: float = field(default_factory=time.time)
    task: Any = None
    tok: Any = None
    model_dir: Optional[Path] = None
    core: Any = None  # the user's (unwrapped) model; under FSDP2 it is sharded in place
    model: Any = None  # what forward runs: core, or its DDP wrapper
    train_set: list = field(default_factory=list)
    steps: int = 0
    strategy: str = "single"
    params: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    ckpt: Optional[Path] = None  # the last complete checkpoint (resumed from, then written)
    start: int = 0
    kept: list = field(default_factory=list)  # metrics records of the steps before ``start``
    counts: dict = field(default_factory=dict)  # training examples cut to max_length / dropped
    device: torch.device = torch.device("cpu")  # where the model and every batch are
    bad: Optional[torch.Tensor] = None  # () on the device: a loss or gradient was non-finite (``steps``)
    read_every: int = 1  # steps between reads of the device (``steps.read_steps``)
    scaler: Any = None  # float16's torch.amp.GradScaler
    trackers: Any = None  # rank 0's experiment trackers (``trackers.Reporting``), or None
    group: Optional[trackers.Group] = None  # the tune study or sweep this run is a trial of

    def log(self, *records: dict) -> None:
        """metrics.jsonl lines (rank 0), and the trackers' in one call (one MLflow request per read interval)."""
        if self.d.main:
            for record in records:
                append_metrics(self.out, record)
            if self.trackers is not None:
                self.trackers.log(records)

    def stopping(self, what: str, step: int, *, before_update: bool = False) -> TrainingError:
        """The error that ends a run at ``step`` because ``what`` (e.g. "loss became nan"), naming what is kept."""
        kept = f"the last good checkpoint is {self.ckpt}" if self.ckpt else "no checkpoint was written"
        when = "stopping before the update" if before_update else "stopping"
        return TrainingError(f"{what} at step {step}; {when} ({kept}). Lower --lr, use float32, or check the data")


def _say(quiet: bool):
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


def run(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, notes: tuple[str, ...] = (),
        group: Optional[trackers.Group] = None) -> dict:
    """Train per ``cfg`` (or continue the run in ``cfg.output`` with ``resume``) and return a summary dict.

    Bad input (data, model folder, LoRA config) raises before anything is written to the output folder. Under
    torchrun, every rank trains its share of each global batch and rank 0 writes the files. The first line names
    the device, its dtype, the attention kernel and why; ``notes`` (e.g. why this dtype) follow it. ``group``: the
    tune study or sweep whose trial this run is (its tracker runs are grouped under it).
    """
    device, why = resolve_device(cfg.device)  # an absent device fails here, before any work
    trackers.check_installed(trackers.parse_report_to(cfg.report_to))  # a missing tracker library too
    if cfg.quantize:
        check_device(cfg.quantize, device)
    d = D.init_distributed(cfg.dist_timeout, device)
    precision = torch.get_float32_matmul_precision()
    try:
        summary = _run(cfg, d, resume=resume, quiet=quiet, device_why=why, notes=notes, group=group)
    finally:  # _run may have turned TF32 on for a float32 CUDA run: the caller's process gets its setting back
        torch.set_float32_matmul_precision(precision)
    # Every reference to the model died with _run's frame; collect the cycles too, so that the DDP wrapper (whose
    # reducer holds the process group) is freed while every peer is still there, then leave the group together.
    gc.collect()
    D.leave(d)
    return summary


def _run(cfg: TrainConfig, d: D.Dist, *, resume: bool, quiet: bool, device_why: str = "",
         notes: tuple[str, ...] = (), group: Optional[trackers.Group] = None) -> dict:
    state = RunState(cfg, d, prepare_output(cfg, resume), _say(quiet) if d.main else (lambda msg: None),
                     show=not quiet and d.main, quiet=quiet, device=d.device, group=group)
    state_file = state.out / "trainer_state.json"
    summary = read_json(state_file, error=DataError) if resume and state_file.is_file() else {}
    if summary.get("finished"):
        state.say(f"{state.out}: this run is already finished; nothing to do")
        return summary
    if state.device.type == "cuda" and cfg.dtype == "float32":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (Ampere and later), as HF Trainer's tf32=True
    state.say(device_line(state.device, DTYPES[cfg.dtype], device_why,
                          f"{cfg.attn_implementation or 'default'} attention"))
    for note in notes:
        state.say(note)
    try:
        prepare(state, resume=resume)
        restore(state)
        before = fit(state)
        return finish(state, before)
    except BaseException as e:
        if state.trackers is not None:  # the tracker's run ends marked, not left running (a tune trial's study
            # stops a pruned trial with an exception whose ``outcome`` is "pruned")
            outcome = getattr(e, "outcome", None)
            state.trackers.finish(outcome if outcome in trackers.OUTCOMES
                                  else "failed" if isinstance(e, Exception) else "killed")
        raise


def prepare(state: RunState, *, resume: bool) -> None:
    """Load and check everything, then attach (or restore) the adapter and build the optimizer. Nothing is
    written before every rank has validated its input."""
    cfg, d = state.cfg, state.d
    if state.quiet or not d.main:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    state.task = load_task(cfg)
    state.model_dir = resolve_model_dir(cfg, progress=state.show)
    model, state.tok = load_model(state.model_dir, cfg.dtype, device=state.device,
                                  attn_implementation=cfg.attn_implementation)
    if cfg.chat_template:
        use_chat_template(state.tok, cfg.chat_template)
    select_targets(model, cfg.lora)  # a config that does not fit the model fails here, before any file is written
    training_set(state)
    check_bf16(state)
    if cfg.quantize:
        quantize_base(state, model)
    D.barrier(d)  # every rank has validated its input before rank 0 writes anything

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state.ckpt = latest_checkpoint(state.out) if resume else None
    peft_format.load(model, state.ckpt, name="default") if state.ckpt is not None else attach(model, cfg.lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    state.strategy = D.choose_strategy(cfg.strategy, model, d) if d.enabled else "single"
    state.core = model
    state.model = D.wrap(model, state.strategy, d) if d.enabled else model
    state.model.train()
    names = set(adapter_parameter_names(state.core))
    state.params = [p for n, p in state.core.named_parameters() if n in names]
    state.optimizer = adamw(state.params, cfg.lr, cfg.weight_decay, fused=state.strategy != "fsdp")
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lr_lambda(cfg, state.steps))
    state.bad = torch.zeros((), dtype=torch.bool, device=state.device)
    if cfg.dtype == "float16":  # its gradients underflow without a scaled loss (Micikevicius et al., 2018)
        state.scaler = torch.amp.GradScaler(state.device.type)
        state.say("dtype float16: with a gradient scaler (torch.amp.GradScaler), which skips the steps that overflow")
    state.read_every = cfg.log_every if skips_on_device(state.optimizer) else 1


def check_bf16(state: RunState) -> None:
    """A bfloat16 run where bf16 is slow still runs, with a warning that gives the speed measured here ((256, 256)
    matmuls timed in both dtypes, 5-10 ms, ``hf.bf16_speed``): on hardware without bf16 instructions (emulated), and
    on a CPU whose bf16 instructions time slower than float32 (avx512_bf16 without AMX on Intel)."""
    if state.cfg.dtype != "bfloat16" or not state.d.main:
        return
    native, why = native_bf16(state.d.device.type)
    if state.d.device.type != "cpu":
        if not native:
            state.say(f"warning: dtype bfloat16, but {why}: bf16 is emulated; --dtype float32 is likely faster")
        return
    speed = bf16_speed()
    if not native:
        state.say(f"warning: dtype bfloat16, but {why}: bf16 matmuls run {speed:.2g}x as fast as fp32 here; "
              "--dtype float32 is likely faster")
    elif speed < 1:
        state.say(f"warning: dtype bfloat16, but bf16 matmuls run {speed:.2g}x as fast as float32 here ({why}, but its "
              "bf16 kernels are slower than float32's); --dtype float32 is likely faster")


def quantize_base(state: RunState, model) -> None:
    """QLoRA: the frozen base linears become ``cfg.quantize`` tensors (``lorafit.quant``: every linear layer but
    the output layer) before the adapter attaches; say how many, and which weight matrices stay in float."""
    from ..quant import quantize, skipped

    fmt = state.cfg.quantize
    reasons = dict(skipped(model, fmt=fmt))
    names = set(quantize(model, fmt))
    heads = output_layer_names(model)
    kept = [f"{n} ({reasons.get(n) or ('the output layer' if n in heads else type(m).__name__)})"
            for n, m in model.named_modules() if n not in names and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() >= 2]
    more = f" and {len(kept) - 4} more" if len(kept) > 4 else ""
    experts = expert_weights(model)
    state.say(f"quantized {len(names)} linear layers to {fmt} ({state.cfg.dtype} compute)"
              + (f"; kept in {state.cfg.dtype}: {', '.join(kept[:4])}{more}" if kept else "")
              + (f"; {len(experts)} mixture-of-experts weights stay in {state.cfg.dtype} (torchao's {fmt} tensors "
                 "are 2D, and the experts' grouped matmuls need dense per-expert matrices)" if experts else ""))


def training_set(state: RunState) -> None:
    """Tokenize (and with ``pack``, pack) the training split, check it holds something to learn from for one
    global batch, and set the number of steps."""
    cfg, d = state.cfg, state.d
    state.train_set, state.counts = tokenize_all(state.task.train, state.tok, cfg.max_length, cfg.add_eos,
                                         train_on_prompt=cfg.train_on_prompt, name=str(cfg.data or "the task"))
    if cfg.pack:
        if any("text" not in e for e in state.task.train):
            raise DataError(f"--pack joins text examples into blocks; {cfg.data or 'the task'} is not {{\"text\"}} "
                            "data (prompt/completion and conversations keep one example per row)")
        state.train_set = pack(state.train_set, cfg.max_length, state.tok.eos_token_id)
    for ex in state.train_set:  # counted once here, added up by every step (steps.labelled_tokens)
        ex["n_labels"] = sum(label != IGNORE for label in ex["labels"][1:])
    if not any(ex["n_labels"] for ex in state.train_set):
        raise DataError(f"no training example of {cfg.data or 'the task'} has a token to predict (each needs at "
                        "least 2 tokens, or a non-empty completion); add longer examples")
    global_batch = cfg.batch_size * d.world
    if len(state.train_set) < global_batch:
        raise DataError(f"the training split has {len(state.train_set)} examples, fewer than one global batch "
                        f"({cfg.batch_size} x {d.world} processes); add data or lower --batch-size")
    state.steps = math.ceil(cfg.epochs * len(state.train_set) / (global_batch * cfg.grad_accum)) if cfg.epochs \
        else cfg.steps


def restore(state: RunState) -> None:
    """Continue from the last checkpoint (optimizer, scheduler, RNG, step), and (re)write the run folder's
    config.yaml and the metrics kept up to that step."""
    import yaml

    if state.ckpt is not None:
        # onto the CPU: RNG states are CPU tensors, and the optimizer moves its state to the parameters' device
        saved = torch.load(state.ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        load_optimizer_state(state.model, state.optimizer, saved["optimizer"], state.strategy)
        state.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        restore_device_rng(state, saved)
        if state.scaler is not None and saved.get("grad_scaler"):
            state.scaler.load_state_dict(saved["grad_scaler"])
        state.start = saved["step"]
        state.say(f"resuming {state.out} from {state.ckpt.name}")
    start = state.start
    state.kept = [m for m in read_metrics(state.out) if m["step"] <= start and (start > 0 or m.get("kind") == "eval")]
    if state.d.main:
        state.out.mkdir(parents=True, exist_ok=True)
        write_text(state.out / "config.yaml", yaml.safe_dump(state.cfg.to_dict(), sort_keys=False))
        write_text(state.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in state.kept))
    n_train, n_total = trainable_parameters(state.core)
    state.say(f"model {state.model_dir} | trainable {n_train:,} of {n_total:,} parameters "
              f"({100 * n_train / n_total:.3f}%) | {len(state.train_set)} train / {len(state.task.eval)} eval "
              f"examples{_cut_note(state.counts)} | {state.steps} steps"
              + (f" | {state.d.world} processes, {state.strategy}" if state.d.enabled else ""))
    note = left_out_note(state.core, [t.name for t in state_of(state.core).targets])
    if note:
        state.say(note)
    if state.d.main:
        names = trackers.parse_report_to(state.cfg.report_to)
        state.trackers = trackers.start(names, state.out, trackers.run_params(state.cfg, n_train, n_total), state.say,
                                        state.group)


def restore_device_rng(state: RunState, saved: dict) -> None:
    """The device generator's state, where the checkpoint was written on the same kind of device; from another kind
    (a CUDA checkpoint resumed on the CPU) the run goes on, with a warning: its dropout masks are drawn differently
    there, so the rest of the run is not the one an uninterrupted run would have been."""
    written_on = saved.get("device_type", "cpu")
    if written_on != state.device.type:
        state.say(f"warning: {state.ckpt.name} was written on {written_on} and resumes on {state.device.type}: "
                  "dropout masks differ between device types, so the run goes on, but not bit for bit")
    elif saved.get("device_rng") is not None:
        set_device_rng_state(state.device, saved["device_rng"])


def fit(state: RunState) -> dict:
    """Evaluate before training (unless a resumed run has it), then train from step ``start`` to the end with
    evaluations and checkpoints as configured. The steps' numbers are read from the device every ``read_every``
    steps and before every evaluation and checkpoint (``steps.read_steps``). Returns the eval before training."""
    from tqdm.auto import tqdm

    cfg = state.cfg
    before = next((m for m in state.kept if m.get("kind") == "eval" and m["step"] == 0), None)
    if before is None:
        scores = evaluate(state.model, state.tok, state.task, cfg, progress=state.show, d=state.d)
        before = {"step": 0, "kind": "eval", **scores}
        state.log(before)
        state.say(f"before training: {_fmt(before)}")
    lengths = [len(t["input_ids"]) for t in state.train_set] if cfg.group_by_length else None
    batches = batch_indices(len(state.train_set), cfg.batch_size * state.d.world, cfg.seed,
                            start=state.start * cfg.grad_accum, lengths=lengths)
    bar = tqdm(total=state.steps, initial=state.start, desc="training", disable=not state.show, dynamic_ncols=True)
    pending = []
    for step in range(state.start + 1, state.steps + 1):
        pending.append(train_step(state, batches, step))
        bar.update(1)
        evaluating = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != state.steps
        saving = bool(cfg.save_every) and step % cfg.save_every == 0
        if step % state.read_every == 0 or evaluating or saving or step == state.steps:
            log_steps(state, read_steps(state, pending), bar)
            pending = []
        if evaluating:
            ev = {"step": step, "kind": "eval", **evaluate(state.model, state.tok, state.task, cfg, d=state.d)}
            state.log(ev)
            state.say(f"step {step}: {_fmt(ev)}")
        if saving:
            optim_state = optimizer_state(state.model, state.optimizer, state.strategy)
            state.ckpt = save_checkpoint(state.out, step, state.core, optim_state=optim_state,
                                         scheduler=state.scheduler, d=state.d, device=state.device,
                                         grad_scaler=state.scaler)
    bar.close()
    return before


def log_steps(state: RunState, records: list[dict], bar) -> None:
    """One metrics line per step, the progress bar's loss, and (--quiet) a line every tenth of the run."""
    state.log(*records)
    for record in records:
        step, loss = record["step"], record["loss"]
        if state.quiet and (step % max(1, state.steps // 10) == 0 or step == state.steps):
            state.say(f"step {step}/{state.steps} loss {loss:.4f}")
    if records:
        bar.set_postfix(loss=f"{records[-1]['loss']:.4f}")


def finish(state: RunState, before: dict) -> dict:
    """The final evaluation, adapter, report.png and trainer_state.json (rank 0 writes; all ranks gather)."""
    scores = evaluate(state.model, state.tok, state.task, state.cfg, progress=state.show, d=state.d)
    after = {"step": state.steps, "kind": "eval", **scores}
    state.log(after)
    divergence = D.max_divergence(state.params, state.d) if state.strategy == "ddp" else None
    tensors = peft_format.adapter_state_dict(state.core)  # a collective under FSDP: every rank gathers
    n_train, n_total = trainable_parameters(state.core)
    summary = {"finished": True, "steps": state.steps, "before": before, "after": after, "trainable": n_train,
               "total": n_total, "wall_time_s": round(time.time() - state.t0, 1), "output": str(state.out),
               "peak_rss_mib": round(D.peak_rss_bytes() / 2**20, 1),
               "processes": state.d.world, "strategy": state.strategy, "max_rank_divergence": divergence}
    if state.d.main:
        peft_format.write_adapter(state.core, state.out, tensors)
        from .report import plot_run
        plot_run(read_metrics(state.out), state.out / "report.png", title=f"lorafit: {state.task.name}")
        write_json(state.out / "trainer_state.json", summary)
        if state.trackers is not None:
            state.trackers.finish("complete")
    state.say(f"after training:  {_fmt(after)}")
    if state.cfg.data is None and not state.d.enabled:
        show_answers(state.core, state.tok, state.task.eval[:3], state.say)
    state.say(f"done in {summary['wall_time_s']:.0f} s (peak memory {summary['peak_rss_mib']:.0f} MiB); adapter, "
              f"config.yaml, metrics.jsonl and report.png in {state.out}")
    return summary


def show_answers(model, tok, examples: list[dict], say: Callable[[str], None]) -> None:
    """Greedy answers of the base model (adapters disabled) and of the fine-tuned one, on a few held-out
    prompt/completion examples, each cut at the length in tokens of the expected answer: the default job trains
    without EOS (its answer is one token, scored by choice accuracy), so a longer greedy answer would run on past
    the answer it was taught and repeat it."""
    from ..generate import decode, generate, render
    from ..model import disabled

    model.eval()
    say("greedy answers on held-out examples, as long as the expected answer (base -> fine-tuned, expected):")
    for e in examples:
        ids = render(tok, prompt=e["prompt"], raw=True)
        n = max(1, len(tok(e["completion"], add_special_tokens=False)["input_ids"]))
        with disabled(model):
            base = decode(tok, generate(model, tok, ids, max_new_tokens=n))
        tuned = decode(tok, generate(model, tok, ids, max_new_tokens=n))
        text = e["prompt"].splitlines()[0][:70]
        say(f"  {text!r}: {base.strip()!r} -> {tuned.strip()!r}, expected {e['completion'].strip()!r}")


def _cut_note(counts: dict) -> str:
    parts = [f"{counts[k]} {k}" for k in ("cut", "dropped") if counts.get(k)]
    return f" ({', '.join(parts)} at max_length)" if parts else ""


def _fmt(ev: dict) -> str:
    parts = []
    if "eval_accuracy" in ev:
        parts.append(f"accuracy {ev['eval_accuracy']:.3f}")
    if "eval_loss" in ev:
        parts.append(f"eval loss {ev['eval_loss']:.4f}")
    return ", ".join(parts) or "no eval split"
