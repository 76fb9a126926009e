"""`lorafit plan`: what a LoRA config adapts in a model, and what training it will cost, without training.

Peak training memory (bytes) of ``lorafit train`` on the CPU (and on MPS, whose unified memory is the host's) is
estimated as its peak RSS:

    runtime      the process after importing torch + transformers (measured here) + tokenizer and data
  + weights      every base parameter at its dtype; with ``quantize``, the linears ``lorafit.quantize`` replaces
                 at their quantized size (NF4: 4 bits per weight + an int8 scale per 64-weight block + one
                 compute-dtype factor per <=256 scales; int8: 1 byte per weight + a float32 scale and an int8
                 zero point per output row)
  + adapter      16 bytes per trainable parameter: fp32 value, gradient and AdamW's two moments
  + activations  what backward keeps per token and layer, in the base's dtype (decoder transformer: ~10·H + 4·kv +
                 4·I values; with gradient checkpointing only each layer's input), plus each distinct input of an
                 adapted module (A's gradient needs it; with dropout, its mask too: 1 more byte per value, 2
                 over a bfloat16 base, whose masks are bfloat16), plus the logits and their loss tensors (~4·V)

The activation coefficients were calibrated against measured peak RSS (tests/test_plan.py checks the estimate is
within 25% of a real run).

On CUDA the same tensors live on the GPU and the host-only runtime term goes (Python, torch, transformers, the
tokenizer and the data stay in host memory). What the GPU must hold is

    tensors      weights + adapter + activations + logits, as above: the run loads the base straight onto the GPU
                 in its dtype, and fused AdamW keeps the same two fp32 moments. This is what the step's
                 ``torch.cuda.max_memory_allocated`` should come near (measured by benchmarks/gpu.py)
  + slack        ``ALLOCATOR_SLACK`` (10%) of the tensors: PyTorch's caching allocator rounds blocks up (512 B, 2 MiB
                 segments for large ones) and fragments, so ``torch.cuda.memory_reserved`` runs above the allocated
                 peak (CUDA semantics notes, "Memory management")
  + context      ``CUDA_CONTEXT`` (512 MiB): the CUDA context with the kernels it loads and the cuBLAS/cuDNN handles
                 and workspaces; outside the caching allocator, so not in ``max_memory_allocated``, but taken from
                 the GPU (a few hundred MiB on current drivers with lazy module loading; to be checked on a GPU)

and ``plan`` compares that total with the GPU's free memory (``torch.cuda.mem_get_info``). Reading it creates this
process's own CUDA context, so the free memory read is low by about one context once this process has exited (on the
safe side for ``lorafit plan`` and ``suggest``; exact for ``tune``, which keeps it while its trials run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import fused
from ..layers import adapter_shapes, magnitude_shape
from ..lora_config import LoraConfig
from ..targets import Target, output_layer_names, select_targets

MiB = 2**20
TOKENIZER_AND_DATA = 60 * MiB  # tokenizer, tokenized data, metrics and plotting, measured on the demo run
CUDA_CONTEXT = 512 * MiB  # the CUDA context, loaded kernels, cuBLAS/cuDNN handles and workspaces (module docstring)
ALLOCATOR_SLACK = 0.10  # the caching allocator's reserved memory above its allocated peak, as a share of it


@dataclass
class MemoryEstimate:
    """Peak training memory by parts, in bytes (the module docstring says how each is estimated). On the CPU
    ``total`` is the peak RSS; on CUDA ``tensors`` is the step's ``torch.cuda.max_memory_allocated`` and ``total``
    what the GPU must have free (``slack`` and ``context`` are 0 on the CPU, ``runtime`` is 0 on CUDA)."""

    runtime: int
    weights: int
    adapter: int
    activations: int
    logits: int
    slack: int = 0
    context: int = 0

    @property
    def tensors(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits

    @property
    def total(self) -> int:
        return self.runtime + self.tensors + self.slack + self.context


def current_rss() -> int:
    """This process's peak resident set size so far, in bytes (``ru_maxrss`` in its platform's unit)."""
    from ..train.distributed import peak_rss_bytes

    return peak_rss_bytes()


def as_device(device: torch.device | str | None) -> torch.device:
    """The device a plan is for: None is the CPU (the estimate as it always was), a name is resolved as
    ``--device`` is (``auto`` picks CUDA where there is one; an absent device is a ConfigError)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str):
        from ..devices import resolve_device

        return resolve_device(device)[0]
    return torch.device(device)


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, as ``torch.cuda.mem_get_info`` reports them (module docstring)."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def adapter_parameters(model: nn.Module, targets: list[Target], use_dora: bool) -> dict[str, int]:
    """Adapter parameter count per targeted module."""
    counts = {}
    for t in targets:
        if t.kind == "param":
            e, n_in, n_out = _param_dims(model, t.name)
            counts[t.name] = t.r * e * (n_in + n_out)
            continue
        module = model.get_submodule(t.name)
        a, b = adapter_shapes(module, t.kind, t.r)
        n = math.prod(a) + math.prod(b)
        if use_dora:
            n += math.prod(magnitude_shape(module, t.kind))
        counts[t.name] = n
    return counts


def _param_dims(model: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, in, out) of a targeted parameter."""
    from ..experts import param_dims
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    return param_dims(model.get_parameter(name), bool(getattr(owner, "is_transposed", False)))


def adapted_inputs(model: nn.Module, targets: list[Target]) -> int:
    """Values per token that backward keeps for the adapters: each distinct input of an adapted module (q, k and v
    read one input, so it counts once) is saved to compute A's gradient, even where the frozen base needs none. An
    expert weight's input is each token once per expert it is routed to (``num_experts_per_tok``)."""
    from ..layers import in_out_features
    seen = {}
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 1) or 1
    for t in targets:
        parent = t.name.rsplit(".", 1)[0] if "." in t.name else ""
        if t.kind == "param":
            n_in = _param_dims(model, t.name)[1]
            seen[(t.name, n_in)] = top_k * n_in
            continue
        n_in = in_out_features(model.get_submodule(t.name), t.kind)[0] if t.kind != "embedding" else 0
        seen[(parent, n_in)] = n_in
    return sum(seen.values())


def quantized_linears(model: nn.Module, fmt: str) -> dict[str, nn.Linear]:
    """The linear layers ``lorafit.quantize(model, fmt)`` replaces, by name: every one but the output layer and
    those ``quant.skipped`` names (tied weights; for NF4, sizes that are not whole blocks). Works on the meta
    device."""
    from ..quant import skipped

    left = output_layer_names(model) | {n for n, _ in skipped(model, fmt=fmt)}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in left}


def quantized_bytes(out_features: int, in_features: int, fmt: str, compute_bytes: int) -> int:
    """Bytes of one (out, in) weight as torchao stores it (``quant.weight_bytes`` of the real tensor; tested).

    NF4: the 4-bit codes (n/2), one int8 scale per 64-weight block, one quantization factor per double-quantization
    block of s scales (s: the largest divisor of the block count up to 256) plus their mean and the 16 NF4 levels,
    those in the compute dtype. int8: the int8 codes, and a float32 scale and an int8 zero point per output row.
    """
    from ..quant import NF4_BLOCK, scaler_block

    n = out_features * in_features
    if fmt == "int8":
        return n + out_features * (4 + 1)
    blocks = n // NF4_BLOCK
    return n // 2 + blocks + (blocks // scaler_block(blocks) + 1 + 16) * compute_bytes


def weight_bytes(model: nn.Module, quantize: str | None = None) -> int:
    """Bytes of the base parameters (each shared tensor once), the linears ``quantize`` would replace at their
    quantized size (and those of an already quantized model at theirs)."""
    from ..quant import weight_bytes as stored_bytes

    params = {id(p): stored_bytes(p) for p in model.parameters()}
    for m in (quantized_linears(model, quantize).values() if quantize else ()):
        w = m.weight
        params[id(w)] = quantized_bytes(w.shape[0], w.shape[1], quantize, w.element_size())
    return sum(params.values())


def estimate_memory(model: nn.Module, n_adapter: int, *, batch_size: int, max_length: int,
                    gradient_checkpointing: bool = False, runtime: int | None = None,
                    adapter_inputs: int = 0, quantize: str | None = None, dropout: float = 0.0,
                    device: torch.device | str | None = None) -> MemoryEstimate:
    """Peak training memory, by parts (see the module docstring); ``quantize``: the base's nf4/int8 linears;
    ``dropout`` > 0 adds the saved mask of each adapted input (1 byte per value; 2 over a bfloat16 base, where the
    adapter's products and so its masks are bfloat16). ``device``: the CPU's peak RSS by default (``runtime``: the
    process baseline, default this one's); on CUDA the GPU's (no runtime; allocator slack and the CUDA context)."""
    cfg = getattr(model, "config", None)
    get = lambda *names, default=0: next((getattr(cfg, n) for n in names if getattr(cfg, n, None)), default)  # noqa
    hidden = get("hidden_size", "n_embd", "d_model")
    inter = get("intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden
    layers = get("num_hidden_layers", "n_layer")
    heads = get("num_attention_heads", "n_head", default=1)
    kv = get("num_key_value_heads", default=heads) * (hidden // max(heads, 1))
    vocab = get("vocab_size")
    # activations run in the base's dtype (bfloat16 bases, QLoRA's bf16 compute: 2 bytes; float32: 4)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    act_bytes = min(4, dtype.itemsize)
    # the adapter's input (and so its mask, fused.mask_dtype) is bfloat16 over a bfloat16 base, else float32
    compute = torch.bfloat16 if dtype == torch.bfloat16 and fused.BF16_COMPUTE else torch.float32
    mask_bytes = fused.mask_dtype(compute).itemsize if dropout > 0 else 0
    tokens = batch_size * max_length
    per_token_layer = hidden if gradient_checkpointing else 10 * hidden + 4 * kv + 4 * inter
    per_token_adapters = 0 if gradient_checkpointing else adapter_inputs
    parts = dict(weights=weight_bytes(model, quantize), adapter=16 * n_adapter,
                 activations=tokens * (layers * per_token_layer * act_bytes
                                       + per_token_adapters * (act_bytes + mask_bytes)),
                 logits=4 * tokens * vocab * 4)
    if as_device(device).type == "cuda":
        return MemoryEstimate(runtime=0, **parts, slack=int(ALLOCATOR_SLACK * sum(parts.values())),
                              context=CUDA_CONTEXT)
    return MemoryEstimate(runtime=(runtime if runtime is not None else current_rss()) + TOKENIZER_AND_DATA, **parts)


def plan(model: nn.Module, cfg: LoraConfig, *, batch_size: int = 8, max_length: int = 256,
         gradient_checkpointing: bool = False, runtime: int | None = None, quantize: str | None = None,
         device: torch.device | str | None = None) -> dict:
    """Targets, parameter counts, adapter file size and the memory estimate, as a dict (``quantize``: over an
    nf4/int8 base, as ``lorafit train --quantize``; ``quantized`` counts its quantized linears).

    ``device``: None or the CPU plans the peak RSS; a CUDA device plans the GPU's memory (``memory.tensors`` is the
    step's ``torch.cuda.max_memory_allocated``, ``memory.total`` what must be free) and adds ``free_bytes`` and
    ``device_bytes``, the GPU's free and total memory (``torch.cuda.mem_get_info``; None elsewhere)."""
    device = as_device(device)
    targets = select_targets(model, cfg)
    per_module = adapter_parameters(model, targets, cfg.use_dora)
    n_adapter = sum(per_module.values())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mem = estimate_memory(model, n_adapter, batch_size=batch_size, max_length=max_length,
                          gradient_checkpointing=gradient_checkpointing, runtime=runtime,
                          adapter_inputs=adapted_inputs(model, targets), quantize=quantize,
                          dropout=cfg.lora_dropout, device=device)
    free, device_bytes = cuda_memory(device) if device.type == "cuda" else (None, None)
    return {"targets": targets, "per_module": per_module, "trainable": n_adapter, "total": total,
            "file_bytes": 4 * n_adapter + 200 * len(targets), "memory": mem,
            "quantized": len(quantized_linears(model, quantize)) if quantize else 0,
            "device": device, "free_bytes": free, "device_bytes": device_bytes}


def _fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def plan_json(p: dict) -> str:
    """The facts of ``plan(...)`` as JSON (targets, parameter counts, file size, memory in bytes)."""
    import dataclasses
    import json

    mem = dataclasses.asdict(p["memory"])
    facts = {"targets": [dataclasses.asdict(t) for t in p["targets"]], "trainable": p["trainable"],
             "total": p["total"], "file_bytes": p["file_bytes"], "quantized": p["quantized"]}
    if p.get("free_bytes") is None:  # the CPU: the facts as they always were
        del mem["slack"], mem["context"]
        return json.dumps({**facts, "memory_bytes": {**mem, "total": p["memory"].total}}, indent=2)
    return json.dumps({**facts, "device": str(p["device"]), "memory_bytes": {
        **mem, "tensors": p["memory"].tensors, "total": p["memory"].total, "free": p["free_bytes"],
        "device_total": p["device_bytes"]}}, indent=2)


def plan_table(model: nn.Module, p: dict) -> list[str]:
    """One line per kind of adapted module (leaf name): count, shape, ranks, alphas, scalings, parameters."""
    from ..ops import as_matrix

    groups: dict[str, list[Target]] = {}
    for t in p["targets"]:
        groups.setdefault(t.name.rsplit(".", 1)[-1], []).append(t)
    lines = [f"  {'module kind':<22} {'count':>5} {'shape (out x in)':>18} {'r':>6} {'alpha':>7} {'scaling':>8} "
             f"{'params':>12}"]
    for leaf, ts in groups.items():
        if ts[0].kind == "param":
            e, in_f, out_f = _param_dims(model, ts[0].name)
            out_f = f"{e} x {out_f}"
        else:
            out_f, in_f = as_matrix(model.get_submodule(ts[0].name).weight, ts[0].kind).shape
        rs = sorted({t.r for t in ts})
        alphas = sorted({t.alpha for t in ts})
        scal = sorted({round(t.scaling, 4) for t in ts})
        lines.append(f"  {leaf + ' (' + ts[0].kind + ')':<22} {len(ts):>5} {f'{out_f} x {in_f}':>18} "
                     f"{'/'.join(map(str, rs)):>6} {'/'.join(f'{a:g}' for a in alphas):>7} "
                     f"{'/'.join(f'{s:g}' for s in scal):>8} {sum(p['per_module'][t.name] for t in ts):>12,}")
    return lines


def fit_line(p: dict) -> str:
    """On CUDA: whether the estimate fits the GPU's free memory ("fits" / "does not fit"), with both numbers."""
    from ..devices import device_label

    need, free = p["memory"].total, p["free_bytes"]
    where = (f"{_fmt_bytes(free)} free of {_fmt_bytes(p['device_bytes'])} on {device_label(p['device'])} "
             "(torch.cuda.mem_get_info)")
    if need <= free:
        return f"  fits: ~{_fmt_bytes(need)} needed, {where}"
    return (f"  does not fit: ~{_fmt_bytes(need)} needed, {where}; try --gradient-checkpointing, a smaller "
            "--batch-size or --max-length, or --quantize nf4")


def memory_lines(p: dict, *, batch_size: int, max_length: int, dtype: str, settings: str) -> list[str]:
    """The peak-memory lines of the report: the total, its parts, and on CUDA whether it fits the GPU."""
    mem: MemoryEstimate = p["memory"]
    on_gpu = p.get("free_bytes") is not None
    head = (f"  {'peak GPU memory' if on_gpu else 'peak training memory':<20}  ~{_fmt_bytes(mem.total)} for batch "
            f"{batch_size} x {max_length} tokens, {dtype}{settings}:")
    tensors = (f"weights {_fmt_bytes(mem.weights)} + adapter with grads and AdamW {_fmt_bytes(mem.adapter)} + "
               f"activations {_fmt_bytes(mem.activations)} + logits/loss {_fmt_bytes(mem.logits)}")
    if not on_gpu:
        return [head, f"      runtime {_fmt_bytes(mem.runtime)} + {tensors}"]
    return [head, f"      {tensors} = {_fmt_bytes(mem.tensors)} of tensors (torch.cuda.max_memory_allocated) + "
                  f"allocator slack {_fmt_bytes(mem.slack)} + CUDA context {_fmt_bytes(mem.context)}", fit_line(p)]


def plan_report(model_dir: str | Path, cfg: LoraConfig, *, batch_size: int = 8, max_length: int = 256,
                dtype: str = "float32", gradient_checkpointing: bool = False, as_json: bool = False,
                quantize: str | None = None, device: torch.device | str | None = None) -> str:
    """The text table `lorafit plan` prints (or the same facts as JSON): load (shapes), compute, format.
    ``device``: as ``plan``'s (None: the CPU)."""
    runtime = current_rss()
    from ..hf import meta_model

    model = meta_model(model_dir, dtype)
    p = plan(model, cfg, batch_size=batch_size, max_length=max_length, gradient_checkpointing=gradient_checkpointing,
             runtime=runtime, quantize=quantize, device=device)
    if as_json:
        return plan_json(p)
    from ..experts import left_out_note

    quantized = f", {p['quantized']} linears in {quantize}" if quantize else ""
    params = f" target_parameters={cfg.target_parameters!r}" if cfg.target_parameters else ""
    note = left_out_note(model, [t.name for t in p["targets"]])
    lines = [f"plan for {model_dir}: r={cfg.r} lora_alpha={cfg.lora_alpha} target_modules={cfg.target_modules!r}"
             f"{params} use_dora={cfg.use_dora} use_rslora={cfg.use_rslora}", *([note] if note else []), "",
             *plan_table(model, p), "",
             f"  trainable parameters  {p['trainable']:,} of {p['total']:,} "
             f"({100 * p['trainable'] / max(p['total'], 1):.3f}%)",
             f"  adapter file          ~{_fmt_bytes(p['file_bytes'])} (float32 safetensors)",
             *memory_lines(p, batch_size=batch_size, max_length=max_length, dtype=dtype,
                           settings=quantized + (", gradient checkpointing" if gradient_checkpointing else ""))]
    return "\n".join(lines)
