"""Probe a training job's own model and data: load them as ``lorafit train`` would, onto the run's device, sample
the batches the run would see first, and call ``probe`` there."""

from __future__ import annotations

import time
from typing import Callable, Optional, Union

from ..devices import device_line, resolve_device
from ..hf import DTYPES, load_model, to_device
from ..train.data import sample_batches
from ..train.loop import load_task, resolve_model_dir
from ..train.train_config import TrainConfig
from .probe import ProbeResult, probe
from .suggest import parse_count


def run_probe(settings: dict, *, batches: int = 4, budget: Union[int, str, None] = None, energy: float = 0.9,
              candidates: Union[str, list[str]] = "all-linear", sketch: Optional[int] = None, max_rank: int = 64,
              curvature: bool = True, newton: int = 0, say: Callable[[str], None] = print):
    """Load the model and data of ``settings`` (TrainConfig fields) onto its device and probe them there; returns
    (ProbeResult, model_dir). An absent device is a ConfigError before anything loads.

    Args:
        settings: TrainConfig fields (model, data, batch_size, max_length, seed, device, dtype, ...).
        batches: how many batches of the training split to accumulate.
        budget: most adapter parameters (a number or "500k"); None: stop at ``energy``.
        energy: share of the predicted gain to cover.
        candidates: target_modules of the modules to consider.
        sketch: keep a rank-K sketch of each gradient instead of the full matrix.
        max_rank: highest rank given to one module.
        curvature: rank by the Fisher-scaled gain (False: raw gradient energy).
        newton: conjugate-gradient steps towards the joint Gauss-Newton step (0: off).
        say: where progress lines go.
    """
    cfg = TrainConfig.from_dict(dict(settings))
    device, why = resolve_device(cfg.device)  # an absent device fails here, before any work
    say(device_line(device, DTYPES[cfg.dtype], why))
    task = load_task(cfg)
    model_dir = resolve_model_dir(cfg)
    model, tok = load_model(model_dir, cfg.dtype, device=device, attn_implementation=cfg.attn_implementation)
    for p in model.parameters():
        p.requires_grad_(False)
    data = [to_device(b, device) for b in sample_batches(task.train, tok, n_batches=batches,
                                                         batch_size=cfg.batch_size, max_length=cfg.max_length,
                                                         add_eos=cfg.add_eos, seed=cfg.seed)]
    say(f"probing {model_dir}: {batches} batches of {cfg.batch_size} examples, candidates {candidates!r}")
    t0 = time.time()
    result: ProbeResult = probe(model, data, candidates, energy=energy, budget=parse_count(budget), sketch=sketch,
                                max_rank=max_rank, logits_fn="default" if curvature else None, seed=cfg.seed,
                                newton=newton)
    say(f"probed in {time.time() - t0:.1f} s")
    return result, model_dir
