"""Scale-out on PyTorch's own engine: torchrun sets the environment, torch.distributed does the rest.

* DDP (``DistributedDataParallel``): every rank holds the whole model; only the adapter's gradients are all-reduced
  (frozen parameters are not registered for reduction).
* FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer and the root are sharded; the frozen base and
  the adapter live as DTensor shards and are gathered layer by layer in forward/backward.

Backend: nccl on GPUs, gloo on the CPU. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..hf import unwrap  # noqa: F401 - part of this module's interface (wrap / unwrap)
from ..tensors import is_quantized
from .train_config import STRATEGIES


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(timeout_s: float = 300, device: torch.device | None = None) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single
    process without those variables runs alone on ``device`` (default: the CPU). ``timeout_s`` bounds every
    collective, so a dead peer ends the job with an error instead of a hang. The backend follows the device (from
    ``devices.resolve_device``, which gives each rank cuda:LOCAL_RANK): nccl on CUDA, gloo elsewhere."""
    device = torch.device(device or "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "mps":  # gloo reduces CPU tensors only, and one Mac has one MPS device
        raise ConfigError(f"torchrun with {world} processes on mps: there is one MPS device and no collective "
                          "backend for it; run one process (plain `lorafit train`), or --device cpu under torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent (not by a shell that may exit early)
        watch_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, device)


def watch_launcher(interval_s: float = 1.0) -> None:
    """End this worker when its launcher dies. torchrun's agent stops its workers when it exits or is signalled
    normally, but a SIGKILLed agent leaves them orphaned inside a collective that no peer will join, a wait that the
    collective timeout did not end (gloo, 40 minutes observed). A daemon thread notices the re-parenting and exits
    the process, whatever the main thread is blocked in; the last complete checkpoint stays for --resume."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                sys.stderr.write(f"lorafit: the launcher (pid {parent}) is gone; stopping this worker (exit 1)\n")
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=watch, name="lorafit-launcher-watch", daemon=True).start()


DRAIN_S = 0.2  # seconds without the GIL for gloo's worker threads to free the last collectives' tensors


def leave(d: Dist, *, within_s: float = 30.0) -> None:
    """Meet every peer, then leave the process group. Called once everything is written and every reference to
    the wrapped model is gone.

    Why the order matters (issue 18, reproduced under load with a native stack dump): gloo's process-group
    destructor joins its worker threads while the caller holds the GIL, and a worker that is still freeing a
    finished collective whose tensors Python has already dropped needs the GIL for that: a deadlock. Before, the
    DDP reducer held the last reference to the group and freed it in a garbage collection after
    ``destroy_process_group``, at a random moment. Now the reducer is freed first, the group goes here, after a
    barrier and a short pause in which the workers can finish. As a last resort a C-level watchdog (faulthandler,
    which needs no GIL) ends the process after ``within_s`` seconds with the stacks on stderr (exit status 1), so a
    worker that has written everything never hangs.
    """
    if not (d.enabled and dist.is_initialized()):
        return
    faulthandler.dump_traceback_later(within_s, exit=True)
    try:
        dist.barrier()
        time.sleep(DRAIN_S)
        dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes. ``ru_maxrss`` is in KiB on Linux and in bytes on
    macOS (getrusage(2) on each)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * rss_unit()


def rss_unit() -> int:
    """Bytes per unit of ``ru_maxrss``: 1 on macOS, 1024 elsewhere (Linux)."""
    return 1 if sys.platform == "darwin" else 1024


def host_available_memory() -> int:
    """Bytes of host memory free now: ``SC_AVPHYS_PAGES`` (Linux: MemFree, without the reclaimable page cache, so on
    the low side). macOS has no such sysconf name; there half the physical memory (``SC_PHYS_PAGES``) stands in, a
    conservative guess (macOS keeps most of its memory in use as cache and compresses before it swaps)."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        return page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):  # an unknown name (macOS), or one the system cannot answer
        return page * os.sysconf("SC_PHYS_PAGES") // 2


def device_free_memory(d: Dist) -> int:
    """Bytes one rank can use on its device: a GPU's free memory (``torch.cuda.mem_get_info``; each rank has its own
    GPU), else its share of the host's available memory (the ranks on a host share it)."""
    if d.device.type == "cuda":
        return torch.cuda.mem_get_info(d.device)[0]
    return host_available_memory() // max(1, d.world)


def _least_over_ranks(n: int, d: Dist) -> int:
    """The smallest ``n`` of all ranks, so that every rank makes the same choice from it (one all-reduce; identity
    outside a process group). A tensor on the GPU for nccl, on the CPU for gloo."""
    if not (d.enabled and dist.is_initialized()):
        return n
    t = torch.tensor([n], dtype=torch.int64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def choose_strategy(strategy: str, model: nn.Module, d: Dist) -> str:
    """"auto": DDP when a full copy of the weights fits comfortably (3x its size) in one rank's memory, else FSDP.

    On CUDA that memory is the rank's GPU: its free memory plus the weights already there (the run loads the model
    onto its device before choosing). Elsewhere it is the rank's share of the host's available memory. The smallest
    over the ranks decides, so that all of them choose the same."""
    if strategy != "auto":
        return strategy
    if any(is_quantized(p) for p in model.parameters()):  # torchao tensors: DDP only (see cli.train.require_quant)
        return "ddp"
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    free = device_free_memory(d)
    if d.device.type == "cuda":
        free += sum(p.numel() * p.element_size() for p in params if p.device == d.device)
    return "ddp" if weights * 3 < _least_over_ranks(free, d) else "fsdp"


def wrap(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """DDP- or FSDP2-wrap an adapted model (adapters attached, frozen base)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # quantized frozen weights (torchao tensors) are left out of DDP's initial sync: every rank quantized the same
        # checkpoint to the same codes, and the sync's copy into an NF4 weight re-quantizes it (measured: a change of
        # up to 1.5e-4 on weights of 0.07, on every rank)
        frozen = [n for n, p in model.named_parameters() if is_quantized(p)]
        if frozen:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DistributedDataParallel(model.to(d.device), device_ids=[d.device.index] if d.device.type == "cuda"
                                       else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.to(d.device)
        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the children of the first ModuleList with several entries)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return list(module)
    return []


def all_sum_tensor(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a tensor across ranks in place, on its device, without reading it (identity on one process)."""
    if d.enabled:
        dist.all_reduce(t)
    return t


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


@torch.no_grad()
def max_divergence(params: list[torch.Tensor], d: Dist) -> float:
    """Largest difference between any rank's copy of the (replicated) parameters and rank 0's: 0.0 when DDP kept
    every replica identical, as it must."""
    worst = torch.zeros((), dtype=torch.float64, device=d.device)
    for p in params:
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()
