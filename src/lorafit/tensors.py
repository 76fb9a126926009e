"""Quantized weights as seen by the core: how to tell one, read its values, and key a cache on it.

``lorafit.quant`` puts torchao tensor subclasses (NF4Tensor, Int8Tensor) in place of frozen nn.Linear weights. The
core never imports torchao: ``F.linear`` dispatches on the subclass (it dequantizes block by block inside), and
where the core needs W0 itself (the input gradient, DoRA's norms, merging) it asks ``dense`` for one layer's values
at a time.

A model loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True)`` holds another kind: bitsandbytes'
``Linear4bit`` modules, whose ``weight`` (``Params4bit``) is 4-bit codes packed two per byte into a (out·in/2, 1)
uint8 tensor with a ``quant_state`` beside it (``Int8Params``: int8 rows with scales ``SCB``). Its shape and dtype are
not the matrix's, no torch op can read it, and only the module's own forward computes with it (``is_packed``).
The core never imports bitsandbytes: it asks the module for its in/out features and calls it for W0·x + b.
"""

from __future__ import annotations

from torch import Tensor


def is_quantized(weight: Tensor) -> bool:
    """Whether ``weight`` is a quantized tensor subclass (torchao's NF4Tensor or Int8Tensor, see ``lorafit.quant``):
    one whose class can give back its float values (``get_original_weight`` or its own ``dequantize``)."""
    cls = type(weight)
    return hasattr(cls, "get_original_weight") or cls.dequantize is not Tensor.dequantize


def dense(weight: Tensor) -> Tensor:
    """``weight``'s values as a plain tensor in its compute dtype: a quantized weight is dequantized into a temporary
    the size of this one weight (never cached, so a quantized model never holds all its weights in float at once);
    any other tensor is returned as it is."""
    if not is_quantized(weight):
        return weight
    original = getattr(weight, "get_original_weight", None)  # torchao NF4Tensor (its dequantize is another thing)
    return original() if original is not None else weight.dequantize()


def linear_dequantizes(weight: Tensor) -> bool:
    """Whether ``F.linear`` over ``weight`` is its dequantized values times the input (torchao's NF4Tensor), so that
    a dense copy already made gives the same product; int8's kernel multiplies the codes itself."""
    return hasattr(type(weight), "get_original_weight")


def is_packed(weight: Tensor) -> bool:
    """Whether ``weight`` is bitsandbytes' packed storage (Params4bit with its ``quant_state``, Int8Params with its
    scales ``SCB``), which only the owning module can compute with; neither attribute is set before quantization."""
    return getattr(weight, "quant_state", None) is not None or getattr(weight, "SCB", None) is not None


def cpu_inference_layout(weight: Tensor) -> bool:
    """Whether bitsandbytes has repacked a 4-bit weight for its CPU inference kernel (an eval-mode, no-grad forward
    on a CPU with AVX512-BF16): that kernel has no backward, so the input gradient through it would be lost."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def weight_key(weight: Tensor) -> tuple:
    """A key that changes when ``weight`` is replaced, modified in place, moved or cast (for caches of values
    derived from a frozen weight). Quantized subclasses have no data pointer of their own: their identity serves."""
    ptr = id(weight) if is_quantized(weight) else weight.data_ptr()
    return (ptr, weight._version, weight.dtype, weight.device)
