"""The LoRA layer: one module for Linear, transformers Conv1D, Embedding and Conv, with DoRA as a mode.

    LoRA (Hu et al., 2021, eq. 3):   h = W0·x + b + s·B·A·drop(x)
    DoRA (Liu et al., 2024, eq. 5):  h = (m / ||W0 + s·B·A||_row) ⊙ (W0·x + s·B·A·drop(x)) + b

The layer keeps the wrapped module's ``weight`` and ``bias`` Parameters by reference, so the base keys of the
model's state_dict do not change (``q_proj.weight`` stays ``q_proj.weight``). The adapter adds ``lora_A`` (r, in),
``lora_B`` (out, r) and, for DoRA, ``lora_magnitude`` (out,). The original module is kept (unregistered) so that
``merge`` can put it back.

Two forward paths compute the same function. In training mode, Linear and Conv1D layers take the fused path
(``fused.lora_linear``: one autograd function, no saved dropout copies, DoRA without the full matrix); the plain
composition below is the reference, used in eval mode, for embeddings and convs, under autocast, and everywhere when
``FUSED`` is False (``lorafit.layers.FUSED = False``, or ``LORAFIT_FUSED=0`` in the environment). Both draw their
dropout masks from ``fused.dropout_seed``, so with the same RNG state they see the same masks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, ops

FUSED = os.environ.get("LORAFIT_FUSED", "1") != "0"  # the fused training path for Linear/Conv1D; False: reference


def layer_kind(module: nn.Module) -> str | None:
    """The ops kind of a supported module, or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "linear_t"
    return None


def in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) of the matrix view W0 (out, in) of a supported module."""
    return tuple(reversed(ops.as_matrix(module.weight, kind).shape))  # type: ignore[return-value]


def adapter_shapes(module: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of lora_A and lora_B for ``module`` at rank r, in PEFT's on-disk layout."""
    w = module.weight
    if kind == "conv":
        ones = (1,) * (w.dim() - 2)
        return (r, w.shape[1], *w.shape[2:]), (w.shape[0], r, *ones)
    n_in, n_out = in_out_features(module, kind)
    return (r, n_in), (n_out, r)


def magnitude_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    """Shape of DoRA's magnitude m: one entry per output row, broadcastable over the output (PEFT's layout)."""
    n_out = in_out_features(module, kind)[1]
    return (1, n_out, *([1] * (module.weight.dim() - 2))) if kind == "conv" else (n_out,)


class LoraLayer(nn.Module):
    """A supported layer plus a low-rank update; see the module docstring for the formulas."""

    def __init__(self, base: nn.Module, kind: str, r: int, alpha: float, scale: float,
                 dropout: float = 0.0, use_dora: bool = False) -> None:
        super().__init__()
        self.kind, self.r, self.alpha, self.scaling, self.use_dora = kind, r, alpha, scale, use_dora
        self.enabled = True
        object.__setattr__(self, "base", base)  # not a submodule: its weight/bias are ours by reference
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        w = base.weight
        # fp16/bf16 bases get float32 adapters (as PEFT's autocast_adapter_dtype): small updates survive rounding
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a_shape, b_shape = adapter_shapes(base, kind, r)
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        m_shape = magnitude_shape(base, kind)
        self.lora_magnitude = nn.Parameter(torch.ones(m_shape, dtype=dtype, device=w.device)) if use_dora else None
        # a seeded nn.Dropout: its masks are the fused path's masks (embeddings take ids: no dropout, as PEFT)
        self.dropout = fused.SeededDropout(dropout if kind != "embedding" else 0.0)
        self._w0_sq: tuple | None = None  # DoRA: (weight key, ||W0_i||²), recomputed only when the weight changes

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"{self.kind}, {tuple(self.weight.shape)}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}"

    # --- pieces ------------------------------------------------------------------------------------------

    def base_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The wrapped module's own computation, with our (shared) weight and the given bias."""
        b, w = self.base, self.weight
        if self.kind == "linear":
            return F.linear(x, w, bias)
        if self.kind == "linear_t":
            return F.linear(x, w.t(), bias)  # Conv1D stores (in, out)
        if self.kind == "embedding":
            return F.embedding(x, w, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return b._conv_forward(x, w, bias)

    def lora_forward(self, x: Tensor) -> Tensor:
        """s·B·A·drop(x), in the adapter's dtype; the scale is applied to the rank-r intermediate."""
        A, B = self.lora_A, self.lora_B
        if self.kind == "embedding":
            b = self.base
            h = F.embedding(x, A.t(), b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
            return (h * self.scaling) @ B.t()  # (..., r) @ (r, dim) -> (..., dim)
        x = self.dropout(x.to(A.dtype), source=x)
        if self.kind == "conv":
            conv = F.conv1d if A.dim() == 3 else F.conv2d
            h = conv(x, A, None, self.base.stride, self.base.padding)  # (N, r, *spatial)
            return conv(h * self.scaling, B)  # 1x1 conv: (N, out, *spatial)
        return F.linear(F.linear(x, A) * self.scaling, B)  # (..., in) -> (..., r) -> (..., out)

    def weight_norm(self) -> Tensor:
        """||W0 + s·B·A|| per output row, detached (DoRA §4.3)."""
        return ops.dora_norm(ops.as_matrix(self.weight, self.kind), self.lora_A, self.lora_B, self.scaling)

    def dora_factor(self) -> Tensor:
        """m / ||W0 + s·B·A||, shaped to broadcast over the layer's output."""
        m = self.lora_magnitude  # (out,), conv: (1, out, 1, ...)
        return m / self.weight_norm().to(m.dtype).view(m.shape)

    # --- forward -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base_forward(x, self.bias)
        if FUSED and self.training and self.kind in ("linear", "linear_t") \
                and not torch.is_autocast_enabled(x.device.type):
            return self.fused_forward(x)
        if not self.use_dora:
            out = self.base_forward(x, self.bias)
            return out + self.lora_forward(x).to(out.dtype)
        out = self.base_forward(x, None)
        out = (self.dora_factor() * (out + self.lora_forward(x))).to(out.dtype)
        if self.bias is not None:  # DoRA rescales the weight, never the bias
            out = out + (self.bias.view(1, -1, *([1] * (out.dim() - 2))) if self.kind == "conv" else self.bias)
        return out

    @torch.compiler.disable
    def fused_forward(self, x: Tensor) -> Tensor:
        """The same function as ``forward``'s reference path, as one autograd function (``fused.lora_linear``)."""
        w0_sq = None
        if self.use_dora:
            w = self.weight
            key = (w.data_ptr(), w._version, w.device, w.dtype)
            if self._w0_sq is None or self._w0_sq[0] != key:  # W0 is frozen: changes only by load, init or .to()
                self._w0_sq = (key, fused.row_sq_norms(ops.as_matrix(w, self.kind), self.lora_A.dtype))
            w0_sq = self._w0_sq[1]
        return fused.lora_linear(x, self.weight, self.bias, A=self.lora_A, B=self.lora_B, s=self.scaling,
                                 p=self.dropout.p if self.training else 0.0, transposed=self.kind == "linear_t",
                                 magnitude=self.lora_magnitude, w0_sq=w0_sq)

    # --- initialisation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_adapter(self, init) -> None:
        """Initialise A, B (and W0 for PiSSA/OLoRA, and m for DoRA) as PEFT does for ``init_lora_weights``."""
        if init in ("pissa", "olora"):
            W0 = ops.as_matrix(self.weight, self.kind)
            A, B, residual = ops.init_from_weight(W0, self.r, self.scaling, init)
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
            self.weight.copy_(ops.from_matrix(residual, self.kind, self.weight.shape))
        else:
            ops.init_lora(self.lora_A, self.lora_B, self.kind, init, self.r)
        if self.use_dora:
            self.lora_magnitude.copy_(self.weight_norm().view(self.lora_magnitude.shape))

    def merged_weight(self) -> Tensor:
        """The base weight with this adapter folded in (float32 math, base dtype)."""
        return ops.merged_weight(self.weight, self.kind, self.lora_A, self.lora_B, self.scaling,
                                 self.lora_magnitude.flatten() if self.use_dora else None)
