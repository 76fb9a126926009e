"""A quantized base (QLoRA): NF4 or int8 frozen weights from torchao under a float LoRA adapter.

    NF4 (QLoRA, Dettmers et al., 2023, https://arxiv.org/abs/2305.14314, §3): each block of 64 weights stores
    4-bit indices into the 16 NormalFloat levels and one absmax scale; the scales are quantized again to 8 bits in
    blocks of (up to) 256 ("double quantization"): 4 + 8/64 + 32/(64·256) ≈ 4.13 bits per weight.
    int8 (weight-only, per output row): W ≈ diag(s)·Q with Q int8 and s = max|W_i| / 127, 8 bits per weight.

The adapter's A and B stay float32 (and train), the base is frozen, and ``F.linear`` on a quantized weight
dequantizes it inside (torchao's kernels); the fused training path dequantizes one layer at a time where it needs W0
itself (the input gradient, DoRA's norm), so no float copy of all weights ever exists. An adapter trained over a
quantized base is an ordinary PEFT-format adapter; ``dequantize`` gives the float base it was trained against.

Only ``nn.Linear`` weights are quantized, and "all-linear" means what it means for ``target_modules``: every linear
layer but the output layer (QLoRA keeps the head in 16 bits). Weights tied to another module (an output layer tied to
the embeddings) and NF4 weights whose size is not a multiple of 64 are skipped, and named, with the reason.

A model transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (bitsandbytes ``Linear4bit`` modules) needs
no ``quantize``: ``attach`` works over it as it is (``layers.py``), and ``dequantize`` turns each ``Linear4bit`` into
an ``nn.Linear`` of its dequantized values, the float base to merge into.
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch
from torch import nn

from .errors import ConfigError, MissingExtraError
from .layers import LoraLayer
from .model import _set_module, has_adapter
from .targets import name_matches, output_layer_names
from .tensors import cpu_inference_layout, dense, is_packed, is_quantized

FORMATS = ("nf4", "int8")
NF4_BLOCK = 64  # weights per absmax scale (QLoRA §3)
NF4_SCALER_BLOCK = 256  # scales per double-quantization block (QLoRA §3), or the largest divisor below it


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence import-time warnings (torchao's optional CUDA kernels that cannot load on this machine)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def _torchao():
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import torchao  # noqa: F401
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        raise MissingExtraError("quantizing the base needs torchao, which is not installed: "
                                "pip install 'lorafit[quant]'") from None
    return to_nf4, Int8WeightOnlyConfig, quantize_


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown quantization format {fmt!r}; use one of: {', '.join(FORMATS)}")
    return fmt


DEVICES = ("cpu", "cuda")  # where torchao's NF4 and int8 weight-only tensors have kernels


def check_device(fmt: str, device: torch.device) -> None:
    """ConfigError, before any work, when ``fmt`` cannot run on ``device`` (torchao has no MPS kernels for it)."""
    if torch.device(device).type not in DEVICES:
        raise ConfigError(f"--quantize {fmt} on {device}: torchao's {fmt} weights run on the CPU and CUDA only; use "
                          f"--device cpu or cuda, or drop --quantize to train on {device} in bfloat16 or float32")


def scaler_block(n_blocks: int) -> int:
    """The largest divisor of ``n_blocks`` up to NF4_SCALER_BLOCK (torchao needs whole double-quantization blocks)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def _chosen(model: nn.Module, modules) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """(name, module) of the modules ``modules`` selects and can quantize, and (name, reason) of those it skips.

    ``modules``: "all-linear", a list of module names (suffix match at a dot, as target_modules) or a regex matched
    in full. Selected modules that are not nn.Linear are skipped (only linear weights are quantized).
    """
    heads = output_layer_names(model)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen, skipped = [], []
    for name, m in model.named_modules():
        if not name:
            continue
        if modules == "all-linear":
            if not isinstance(m, nn.Linear) or name in heads:
                continue
        elif isinstance(modules, str):
            if re.fullmatch(modules, name) is None:
                continue
        elif not name_matches(name, modules):
            continue
        if not isinstance(m, nn.Linear):
            skipped.append((name, f"a {type(m).__name__}: only nn.Linear weights are quantized"))
        elif is_quantized(m.weight):
            skipped.append((name, "already quantized"))
        elif uses.get(id(m.weight), 0) > 1:
            skipped.append((name, "its weight is tied to another module (quantizing it would change that one)"))
        else:
            chosen.append((name, m))
    return chosen, skipped


def skipped(model: nn.Module, modules="all-linear", fmt: str = "nf4") -> list[tuple[str, str]]:
    """(name, reason) of the modules ``quantize(model, fmt, modules=modules)`` would leave in float."""
    chosen, skip = _chosen(model, modules)
    if fmt == "nf4":
        skip += [(n, f"{m.weight.numel()} weights are not a multiple of NF4's block of {NF4_BLOCK}")
                 for n, m in chosen if m.weight.numel() % NF4_BLOCK]
    return skip


@torch.no_grad()
def quantize(model: nn.Module, fmt: str, *, modules="all-linear") -> list[str]:
    """Replace the frozen weights of ``modules``' linear layers with NF4 or int8 tensors, in place; return the
    names quantized (``skipped`` says which were left in float, and why).

    The quantized weights keep the dtype they had as their compute dtype (bfloat16 for QLoRA's recipe: load the model
    in bfloat16 first). Call before ``lorafit.attach``; the model must not have an adapter yet.
    """
    check_format(fmt)
    if has_adapter(model):
        raise ConfigError("lorafit.quantize: the model already has an adapter; quantize the base first, then "
                          "attach (or merge/delete the adapter)")
    to_nf4, Int8WeightOnlyConfig, quantize_ = _torchao()
    chosen, _ = _chosen(model, modules)
    if fmt == "nf4":
        chosen = [(n, m) for n, m in chosen if m.weight.numel() % NF4_BLOCK == 0]
    if not chosen:
        raise ConfigError(f"lorafit.quantize: modules={modules!r} selects no linear layer that can be quantized "
                          f"to {fmt}: " + "; ".join(f"{n}: {why}" for n, why in skipped(model, modules, fmt)[:5]))
    for name, m in chosen:
        w = m.weight
        if not w.dtype.is_floating_point:
            raise ConfigError(f"lorafit.quantize: {name}.weight is {w.dtype}, not a float weight")
        if fmt == "nf4":
            q = to_nf4(w.detach(), NF4_BLOCK, scaler_block(w.numel() // NF4_BLOCK))
            m.weight = nn.Parameter(q, requires_grad=False)
        else:
            with _quiet("torchao"):
                quantize_(m, Int8WeightOnlyConfig(), filter_fn=lambda mod, fqn: mod is m)
            m.weight.requires_grad_(False)
    _release_freed_memory()
    return [n for n, _ in chosen]


def _release_freed_memory() -> None:
    """Give the float weights just freed back to the OS (glibc's ``malloc_trim``), so the quantization's savings show
    in the process's memory, not only in its live tensors: glibc keeps freed chunks of the size it has seen freed in
    its heap, and measured on SmolLM2 (NF4) the peak RSS of training steps drops by ~170 MB with it. No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


@torch.no_grad()
def dequantize(model: nn.Module) -> int:
    """Put float weights (the dequantized values, in the compute dtype) in place of every quantized weight; return
    how many were replaced. The float base an adapter trained over the quantized one was trained against.

    A bitsandbytes ``Linear4bit`` (a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``), bare or under an
    adapter, is replaced by an ``nn.Linear`` holding its dequantized values in the dtype they were quantized from
    (the model's dtype; bitsandbytes casts them to its compute dtype in forward) and the same bias; after it,
    ``lorafit.merge`` works."""
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and is_quantized(w):
            m.weight = nn.Parameter(dense(w).clone(), requires_grad=False)
            n += 1
    return n + _dequantize_bnb(model)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise MissingExtraError("this model holds bitsandbytes layers; dequantizing them needs bitsandbytes, which "
                                "is not installed: pip install bitsandbytes") from None
    return bitsandbytes


def _bnb_weight(bnb, name: str, module: nn.Module) -> torch.Tensor:
    """The float (out, in) values of a bitsandbytes Linear4bit's packed weight, in the dtype it was quantized from."""
    if not isinstance(module, bnb.nn.Linear4bit):
        raise ConfigError(f"lorafit.dequantize: {name!r} is a bitsandbytes {type(module).__name__}; only 4-bit "
                          "layers (Linear4bit, load_in_4bit=True) can be dequantized")
    w = module.weight
    if cpu_inference_layout(w):  # back from bitsandbytes' CPU inference layout, as its own state_dict() does
        w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).reshape(module.out_features, module.in_features)


def _dequantize_bnb(model: nn.Module) -> int:
    """Replace every bitsandbytes Linear4bit (bare, or wrapped by a LoraLayer) with an nn.Linear; return how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and is_packed(m.weight)]
    if not found:
        return 0
    bnb = _bitsandbytes()
    for name, m in found:
        layer = m if isinstance(m, LoraLayer) else None
        base = layer.base if layer is not None else m
        values = _bnb_weight(bnb, name, base)
        plain = nn.Linear(base.in_features, base.out_features, bias=False, device=values.device, dtype=values.dtype)
        plain.weight = nn.Parameter(values.clone(), requires_grad=False)
        bias = base.bias  # the same Parameter, unless bitsandbytes' forward cast it to its compute dtype
        if bias is not None and bias.dtype != values.dtype:
            bias = nn.Parameter(bias.detach().to(values.dtype), requires_grad=bias.requires_grad)
        plain.bias = bias
        plain.train(layer.training if layer is not None else base.training)
        if layer is None:
            _set_module(model, name, plain)
        else:  # the layer keeps its adapters; W0 is now a float weight it can merge into
            object.__setattr__(layer, "base", plain)
            layer.weight = plain.weight
            if bias is not None:
                layer.bias = bias
    return len(found)


def weight_bytes(weight: torch.Tensor) -> int:
    """Bytes a (possibly quantized) weight holds: the sum over its inner tensors for a tensor subclass."""
    if not is_quantized(weight):
        return weight.numel() * weight.element_size()
    names, _ = weight.__tensor_flatten__()
    return sum(weight_bytes(getattr(weight, n)) for n in names if getattr(weight, n) is not None)
