"""Quantized weights as seen by the core: how to tell one, read its values, and key a cache on it.

``lorafit.quant`` puts torchao tensor subclasses (NF4Tensor, Int8Tensor) in place of frozen nn.Linear weights. The
core never imports torchao: ``F.linear`` dispatches on the subclass (it dequantizes block by block inside), and
where the core needs W0 itself (the input gradient, DoRA's norms, merging) it asks ``dense`` for one layer's values
at a time.
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


def weight_key(weight: Tensor) -> tuple:
    """A key that changes when ``weight`` is replaced, modified in place, moved or cast (for caches of values
    derived from a frozen weight). Quantized subclasses have no data pointer of their own: their identity serves."""
    ptr = id(weight) if is_quantized(weight) else weight.data_ptr()
    return (ptr, weight._version, weight.dtype, weight.device)
