"""`lorafit plan`: what a LoRA config adapts in a model, and what training it will cost, without training.

Peak training memory (bytes) of ``lorafit train`` on the CPU is estimated as

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
"""

from __future__ import annotations

import math
import resource
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


@dataclass
class MemoryEstimate:
    runtime: int
    weights: int
    adapter: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.adapter + self.activations + self.logits


def current_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def adapter_parameters(model: nn.Module, targets: list[Target], use_dora: bool) -> dict[str, int]:
    """Adapter parameter count per targeted module."""
    counts = {}
    for t in targets:
        module = model.get_submodule(t.name)
        a, b = adapter_shapes(module, t.kind, t.r)
        n = math.prod(a) + math.prod(b)
        if use_dora:
            n += math.prod(magnitude_shape(module, t.kind))
        counts[t.name] = n
    return counts


def adapted_inputs(model: nn.Module, targets: list[Target]) -> int:
    """Values per token that backward keeps for the adapters: each distinct input of an adapted module (q, k and v
    read one input, so it counts once) is saved to compute A's gradient, even where the frozen base needs none."""
    from ..layers import in_out_features
    seen = {}
    for t in targets:
        parent = t.name.rsplit(".", 1)[0] if "." in t.name else ""
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
                    adapter_inputs: int = 0, quantize: str | None = None, dropout: float = 0.0) -> MemoryEstimate:
    """Peak training memory, by parts (see the module docstring); ``quantize``: the base's nf4/int8 linears;
    ``dropout`` > 0 adds the saved mask of each adapted input (1 byte per value; 2 over a bfloat16 base, where the
    adapter's products and so its masks are bfloat16)."""
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
    return MemoryEstimate(
        runtime=(runtime if runtime is not None else current_rss()) + TOKENIZER_AND_DATA,
        weights=weight_bytes(model, quantize),
        adapter=16 * n_adapter,
        activations=tokens * (layers * per_token_layer * act_bytes + per_token_adapters * (act_bytes + mask_bytes)),
        logits=4 * tokens * vocab * 4,
    )


def plan(model: nn.Module, cfg: LoraConfig, *, batch_size: int = 8, max_length: int = 256,
         gradient_checkpointing: bool = False, runtime: int | None = None, quantize: str | None = None) -> dict:
    """Targets, parameter counts, adapter file size and the memory estimate, as a dict (``quantize``: over an
    nf4/int8 base, as ``lorafit train --quantize``; ``quantized`` counts its quantized linears)."""
    targets = select_targets(model, cfg)
    per_module = adapter_parameters(model, targets, cfg.use_dora)
    n_adapter = sum(per_module.values())
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mem = estimate_memory(model, n_adapter, batch_size=batch_size, max_length=max_length,
                          gradient_checkpointing=gradient_checkpointing, runtime=runtime,
                          adapter_inputs=adapted_inputs(model, targets), quantize=quantize,
                          dropout=cfg.lora_dropout)
    return {"targets": targets, "per_module": per_module, "trainable": n_adapter, "total": total,
            "file_bytes": 4 * n_adapter + 200 * len(targets), "memory": mem,
            "quantized": len(quantized_linears(model, quantize)) if quantize else 0}


def _fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def plan_json(p: dict) -> str:
    """The facts of ``plan(...)`` as JSON (targets, parameter counts, file size, memory in bytes)."""
    import dataclasses
    import json

    mem = dataclasses.asdict(p["memory"])
    return json.dumps({"targets": [dataclasses.asdict(t) for t in p["targets"]], "trainable": p["trainable"],
                       "total": p["total"], "file_bytes": p["file_bytes"], "quantized": p["quantized"],
                       "memory_bytes": {**mem, "total": p["memory"].total}}, indent=2)


def plan_table(model: nn.Module, p: dict) -> list[str]:
    """One line per kind of adapted module (leaf name): count, shape, ranks, alphas, scalings, parameters."""
    from ..ops import as_matrix

    groups: dict[str, list[Target]] = {}
    for t in p["targets"]:
        groups.setdefault(t.name.rsplit(".", 1)[-1], []).append(t)
    lines = [f"  {'module kind':<22} {'count':>5} {'shape (out x in)':>18} {'r':>6} {'alpha':>7} {'scaling':>8} "
             f"{'params':>12}"]
    for leaf, ts in groups.items():
        out_f, in_f = as_matrix(model.get_submodule(ts[0].name).weight, ts[0].kind).shape
        rs = sorted({t.r for t in ts})
        alphas = sorted({t.alpha for t in ts})
        scal = sorted({round(t.scaling, 4) for t in ts})
        lines.append(f"  {leaf + ' (' + ts[0].kind + ')':<22} {len(ts):>5} {f'{out_f} x {in_f}':>18} "
                     f"{'/'.join(map(str, rs)):>6} {'/'.join(f'{a:g}' for a in alphas):>7} "
                     f"{'/'.join(f'{s:g}' for s in scal):>8} {sum(p['per_module'][t.name] for t in ts):>12,}")
    return lines


def plan_report(model_dir: str | Path, cfg: LoraConfig, *, batch_size: int = 8, max_length: int = 256,
                dtype: str = "float32", gradient_checkpointing: bool = False, as_json: bool = False,
                quantize: str | None = None) -> str:
    """The text table `lorafit plan` prints (or the same facts as JSON): load (shapes), compute, format."""
    runtime = current_rss()
    from ..hf import meta_model

    model = meta_model(model_dir, dtype)
    p = plan(model, cfg, batch_size=batch_size, max_length=max_length, gradient_checkpointing=gradient_checkpointing,
             runtime=runtime, quantize=quantize)
    if as_json:
        return plan_json(p)
    mem: MemoryEstimate = p["memory"]
    quantized = f", {p['quantized']} linears in {quantize}" if quantize else ""
    lines = [f"plan for {model_dir}: r={cfg.r} lora_alpha={cfg.lora_alpha} target_modules={cfg.target_modules!r} "
             f"use_dora={cfg.use_dora} use_rslora={cfg.use_rslora}", "", *plan_table(model, p), "",
             f"  trainable parameters  {p['trainable']:,} of {p['total']:,} "
             f"({100 * p['trainable'] / max(p['total'], 1):.3f}%)",
             f"  adapter file          ~{_fmt_bytes(p['file_bytes'])} (float32 safetensors)",
             f"  peak training memory  ~{_fmt_bytes(mem.total)} for batch {batch_size} x {max_length} tokens, "
             f"{dtype}{quantized}{', gradient checkpointing' if gradient_checkpointing else ''}:",
             f"      runtime {_fmt_bytes(mem.runtime)} + weights {_fmt_bytes(mem.weights)} + adapter with grads "
             f"and AdamW {_fmt_bytes(mem.adapter)} + activations {_fmt_bytes(mem.activations)} + logits/loss "
             f"{_fmt_bytes(mem.logits)}"]
    return "\n".join(lines)
