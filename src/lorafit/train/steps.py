"""One optimizer step that reads nothing back from the device, and the one read per logging interval.

A host read (``.item()``, ``float(t)``, ``if t``) makes the CPU wait for every kernel queued on a GPU. So a step
keeps its loss, token count and gradient norm on the device, and its non-finite check is a device flag: once a loss
or gradient is non-finite, the flag stays set and torch's fused AdamW skips every later update on the device (its
``found_inf``, as under a GradScaler). ``read_steps`` reads the interval's numbers in one transfer (one all-reduce
under torchrun) every ``log_every`` steps and before every evaluation and checkpoint; it names the first bad step
and raises, so non-finite weights are never saved and the run keeps its last good checkpoint. An optimizer without
``found_inf`` (FSDP2's DTensor shards, a device without fused AdamW) is read after every step instead.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from ..hf import IGNORE, to_device, token_loss_sum
from . import distributed as D
from .data import collate


@dataclass
class StepNumbers:
    """What one step leaves on the device until the next read."""

    step: int
    lr: float
    elapsed: float
    loss_sum: torch.Tensor  # () this rank's summed token loss
    tokens: int  # labelled tokens of the global batch
    norm: torch.Tensor  # () gradient norm before clipping


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes a ``found_inf`` flag and skips its update on the device (torch's fused Adam)."""
    return optimizer.defaults.get("fused") is True


def labelled_tokens(row: dict) -> int:
    """The tokens of an example that carry a loss (position t predicts token t+1, so its first label never counts):
    ``loop.training_set`` stores it as ``n_labels``, so that a step adds numbers instead of walking labels."""
    n = row.get("n_labels")
    return n if n is not None else sum(label != IGNORE for label in row["labels"][1:])


def _micro_batches(state, batches) -> tuple[list[dict], int]:
    """This rank's ``grad_accum`` collated micro-batches (on the host), and the labelled tokens of the whole global
    batch: every rank draws the same global indices, so each knows the total without an all-reduce."""
    cfg, d = state.cfg, state.d
    micro, tokens = [], 0
    for _ in range(cfg.grad_accum):
        idx = next(batches)  # the global micro-batch, every rank's rows
        tokens += sum(labelled_tokens(state.train_set[i]) for i in idx)
        rows = [state.train_set[i] for i in idx[d.rank * cfg.batch_size:(d.rank + 1) * cfg.batch_size]]
        micro.append(collate(rows, state.tok.pad_token_id))
    return micro, tokens


def train_step(state, batches, step: int) -> StepNumbers:
    """One optimizer step over ``grad_accum`` micro-batches: the loss is the mean over every labelled token of the
    global batch. Nothing is read back from the device; a non-finite loss or gradient sets ``state.bad``, which
    skips this update and every later one until ``read_steps`` stops the run (float16: an overflowing gradient is
    the scaler's to skip, and to lower its scale)."""
    cfg, d, device, scaler = state.cfg, state.d, state.device, getattr(state, "scaler", None)
    micro, tokens = _micro_batches(state, batches)
    scale = d.world / max(tokens, 1)  # the step's loss is the mean over all its tokens; DDP averages the ranks'
    loss = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        sync = k == len(micro) - 1 or state.strategy != "ddp"
        with (contextlib.nullcontext() if sync else state.model.no_sync()):
            loss_sum = token_loss_sum(state.model, to_device(batch, device))
            mean = loss_sum * scale
            (mean if scaler is None else scaler.scale(mean)).backward()
        loss += loss_sum.detach().float()
    if scaler is not None:
        scaler.unscale_(state.optimizer)  # the true gradients, for clipping; inf ones recorded for scaler.step
    norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the ranks into a plain tensor, on the device
        norm = norm.full_tensor()
    if scaler is not None:
        scaler.step(state.optimizer)  # fused AdamW takes the scaler's found_inf: no host read
        scaler.update()
        state.scheduler.step()
    else:
        state.bad |= ~torch.isfinite(loss) | ~torch.isfinite(norm)
        if skips_on_device(state.optimizer):
            state.optimizer.found_inf = state.bad.float()  # the fused kernel skips the update where it is 1
        if skips_on_device(state.optimizer) or not state.bad.item():  # else read every step: it cannot skip
            state.optimizer.step()
            state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return StepNumbers(step, state.scheduler.get_last_lr()[0], time.time() - state.t0, loss, tokens, norm)


def read_steps(state, pending: list[StepNumbers]) -> list[dict]:
    """The metrics records of the pending steps, from one read of the device (one all-reduce under torchrun).
    Raises the run's TrainingError at the first step whose loss or gradient was non-finite: that step and every
    later one left the weights as they were."""
    if not pending:
        return []
    losses = D.all_sum_tensor(torch.stack([p.loss_sum for p in pending]), state.d)
    rows = torch.stack([losses, torch.stack([p.norm.float() for p in pending])]).tolist()  # the interval's one read
    records = []
    for p, loss_sum, norm in zip(pending, *rows):
        tokens = p.tokens
        if not math.isfinite(loss_sum):
            raise state.stopping(f"loss became {loss_sum}", p.step, before_update=True)
        skipped = not math.isfinite(norm) and getattr(state, "scaler", None) is not None  # float16 overflow
        if not math.isfinite(norm) and not skipped:
            raise state.stopping("gradients became non-finite", p.step, before_update=True)
        records.append({"step": p.step, "loss": loss_sum / max(tokens, 1.0), "lr": p.lr,
                        "grad_norm": None if skipped else norm, "elapsed": round(p.elapsed, 2),
                        **({"skipped": "float16 overflow: the scaler lowered its scale"} if skipped else {})})
    return records
