"""The LoRA layer: one module for Linear, transformers Conv1D, Embedding and Conv, holding one or more named adapters.

    LoRA (Hu et al., 2021, eq. 3):   h = W0·x + b + s·B·A·drop(x)
    DoRA (Liu et al., 2024, eq. 5):  h = (m / ||W0 + s·B·A||_row) ⊙ (W0·x + s·B·A·drop(x)) + b

The layer keeps the wrapped module's ``weight`` and ``bias`` Parameters by reference, so the base keys of the
model's state_dict do not change (``q_proj.weight`` stays ``q_proj.weight``). Each adapter is an ``Adapter`` in
``layer.adapters[name]`` holding ``lora_A`` (r, in), ``lora_B`` (out, r) and, for DoRA, ``lora_magnitude`` (out,),
so its parameters are named ``q_proj.adapters.<name>.lora_A`` in memory (on disk ``peft_format`` writes PEFT's
names). The original module is kept (unregistered) so that ``merge`` can put it back.

``layer.active`` names the adapters in effect. With one, two forward paths compute the same function: in training
mode, Linear and Conv1D layers take the fused path (``fused.lora_linear``: one autograd function, no saved dropout
copies, DoRA without the full matrix); the plain composition is the reference, used in eval mode, for embeddings and
convs, and everywhere when ``FUSED`` is False (``lorafit.layers.FUSED = False``, or
``LORAFIT_FUSED=0``). Both draw their dropout masks from ``fused.dropout_seed``. Several active adapters add up as in
PEFT, in order (``sum_forward``).
``layer.routing`` (set by ``lorafit.per_row``) replaces all of this with a per-row choice of adapter.

A bitsandbytes layer (``Linear4bit`` from ``BitsAndBytesConfig(load_in_4bit=True)``, see ``tensors.is_packed``) is a
"linear" layer whose weight only the module can read: (in, out) come from its ``in_features``/``out_features``, the
adapter is float32, W0·x + b is the module's own forward (bitsandbytes' autograd gives the input gradient), and
training takes the reference path. The wrapped module is kept in training mode, whatever the layer's mode: in eval
mode bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel (AVX512-BF16 CPUs), which computes in
bfloat16 and has no backward, so a training step after an evaluation would silently lose the input gradient. Held in
training mode it computes the same function in both modes, in its compute dtype. DoRA, PiSSA/OLoRA and merging need
W0's values and are refused (``model.attach``, ``model.merge``; ``lorafit.dequantize`` gives a float base first).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused, ops
from .errors import AdapterError, TrainingError
from .tensors import cpu_inference_layout, is_packed, weight_key

FUSED = os.environ.get("LORAFIT_FUSED", "1") != "0"  # the fused training path for Linear/Conv1D; False: reference


def layer_kind(module: nn.Module) -> str | None:
    """The ops kind of a supported module (or of the module a LoraLayer wraps), or None."""
    if isinstance(module, LoraLayer):
        return module.kind
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
    """(in, out) of the matrix view W0 (out, in) of a supported module (a bitsandbytes layer says it itself)."""
    if is_packed(module.weight):
        return module.in_features, module.out_features
    return tuple(reversed(ops.as_matrix(module.weight, kind).shape))  # type: ignore[return-value]


def adapter_shapes(module: nn.Module, kind: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of lora_A and lora_B for ``module`` at rank r, in PEFT's on-disk layout."""
    if kind == "param":  # experts.ParamLayer: E experts, each its own r rows of A and (rank-major) r columns of B
        e = module.n_experts
        return (r * e, module.in_features), (module.out_features, r * e)
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


def compile_boundaries() -> None:
    """Put ``LoraLayer.fused_forward`` and ``SeededDropout.forward`` behind ``torch.compiler.disable`` (torch.compile
    runs them eagerly, between graphs: an autograd function with seeded masks), once, when the first adapter is
    built. Not at import: ``torch.compiler.disable`` imports torch._dynamo, a large share of ``import lorafit``'s
    time (docs/performance.md), and commands that build no adapter (help, bad input, plan, inspect) need none of it.
    An adapter unpickled in a fresh process calls it too (``Adapter.__setstate__``)."""
    for cls, name in ((LoraLayer, "fused_forward"), (fused.SeededDropout, "forward")):
        fn = cls.__dict__[name]
        if not getattr(fn, "_lorafit_eager", False):
            fn = torch.compiler.disable(fn)
            fn._lorafit_eager = True
            setattr(cls, name, fn)


class Adapter(nn.Module):
    """One named low-rank update: ``lora_A`` (r, in), ``lora_B`` (out, r), DoRA's ``lora_magnitude`` (out,), its
    scale s and its (seeded) dropout."""

    def __init__(self, base: nn.Module, kind: str, r: int, alpha: float, scale: float, *,
                 dropout: float = 0.0, use_dora: bool = False) -> None:
        super().__init__()
        compile_boundaries()
        self.r, self.alpha, self.scaling, self.use_dora = r, alpha, scale, use_dora
        w = base.weight
        # fp16/bf16 bases get float32 adapters (as PEFT's autocast_adapter_dtype): small updates survive rounding;
        # so do bitsandbytes layers (their packed weight is uint8 or int8, whatever the compute dtype)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or is_packed(w) else w.dtype
        a_shape, b_shape = adapter_shapes(base, kind, r)
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        m_shape = magnitude_shape(base, kind)
        self.lora_magnitude = nn.Parameter(torch.ones(m_shape, dtype=dtype, device=w.device)) if use_dora else None
        # a seeded nn.Dropout: its masks are the fused path's masks (embeddings take ids: no dropout, as PEFT)
        self.dropout = fused.SeededDropout(dropout if kind != "embedding" else 0.0)
        self.w0_sq: tuple | None = None  # DoRA: (weight key, ||W0_i||²), recomputed only when the weight changes

    def __setstate__(self, state: dict) -> None:  # unpickled (torch.load of a whole model) or deep-copied
        compile_boundaries()
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}" + (", dora" if self.use_dora else "")


class LoraLayer(nn.Module):
    """A supported layer plus named low-rank updates; see the module docstring for the formulas.

    ``LoraLayer(base, kind, r, alpha, scale, dropout, use_dora)`` wraps ``base`` with one adapter named "default";
    ``LoraLayer(base, kind)`` wraps it with none (``add`` them).
    """

    def __init__(self, base: nn.Module, kind: str, r: int | None = None, alpha: float = 8.0, scale: float = 1.0,
                 dropout: float = 0.0, use_dora: bool = False, *, name: str = "default") -> None:
        super().__init__()
        self.kind = kind
        self.enabled = True
        self.train(base.training)
        object.__setattr__(self, "base", base)  # not a submodule: its weight/bias are ours by reference
        if is_packed(base.weight):  # bitsandbytes: never its CPU inference repacking (module docstring)
            base.train(True)
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()  # the adapters in effect here, in order
        self.routing = None  # lorafit.per_row's plan while its context is open: forward(layer, x) -> Tensor
        if r is not None:
            self.add(name, r, alpha, scale, dropout=dropout, use_dora=use_dora)

    def add(self, name: str, r: int, alpha: float, scale: float, *, dropout: float = 0.0,
            use_dora: bool = False, activate: bool = True) -> Adapter:
        """Allocate a (zero) adapter ``name``; it joins ``active`` unless ``activate`` is False."""
        adapter = Adapter(self.base, self.kind, r, alpha, scale, dropout=dropout, use_dora=use_dora)
        adapter.train(self.training)  # in the layer's mode (its dropout is off in eval)
        self.adapters[name] = adapter
        if activate:
            self.active = (*self.active, name)
        return adapter

    def extra_repr(self) -> str:
        shape = tuple(reversed(in_out_features(self.base, self.kind))) if is_packed(self.weight) else \
            tuple(self.weight.shape)
        return f"{self.kind}, {shape}, active={list(self.active)}"

    # --- the one active adapter (what training and single-adapter code use) --------------------------------------

    @property
    def adapter(self) -> Adapter:
        """The active adapter, when exactly one is active here."""
        if len(self.active) != 1:
            raise AdapterError(f"{len(self.active)} adapters are active on this layer ({list(self.active)}); "
                               "this needs exactly one (lorafit.set_active)")
        return self.adapters[self.active[0]]

    lora_A = property(lambda self: self.adapter.lora_A)
    lora_B = property(lambda self: self.adapter.lora_B)
    lora_magnitude = property(lambda self: self.adapter.lora_magnitude)
    r = property(lambda self: self.adapter.r)
    alpha = property(lambda self: self.adapter.alpha)
    scaling = property(lambda self: self.adapter.scaling)
    use_dora = property(lambda self: self.adapter.use_dora)
    dropout = property(lambda self: self.adapter.dropout)

    # --- pieces ------------------------------------------------------------------------------------------

    def base_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The wrapped module's own computation, with our (shared) weight and the given bias."""
        b, w = self.base, self.weight
        if is_packed(w):
            return self._packed_forward(x, bias)
        if self.kind == "linear":
            return F.linear(x, w, bias)
        if self.kind == "linear_t":
            return F.linear(x, w.t(), bias)  # Conv1D stores (in, out)
        if self.kind == "embedding":
            return F.embedding(x, w, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return b._conv_forward(x, w, bias)

    def _packed_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """A bitsandbytes layer: its own forward (bias included), which alone can read its packed weight."""
        if self.training and torch.is_grad_enabled() and cpu_inference_layout(self.weight):
            raise TrainingError(
                f"bitsandbytes has repacked this layer's {type(self.weight).__name__} weight for its CPU inference "
                "kernel (the model ran in eval mode before lorafit.attach), which has no backward: training would "
                "lose the input gradient. Load the model again and attach before running it in eval mode")
        out = self.base(x)
        return out if bias is self.bias or self.bias is None else out - self.bias.to(out.dtype)

    def lora_forward(self, x: Tensor, ad: Adapter | None = None) -> Tensor:
        """s·B·A·drop(x), in the adapter's dtype; the scale is applied to the rank-r intermediate."""
        ad = self.adapter if ad is None else ad
        A, B = ad.lora_A, ad.lora_B
        if self.kind == "embedding":
            b = self.base
            h = F.embedding(x, A.t(), b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
            return (h * ad.scaling) @ B.t()  # (..., r) @ (r, dim) -> (..., dim)
        x = ad.dropout(x.to(A.dtype), source=x)
        if self.kind == "conv":
            conv = F.conv1d if A.dim() == 3 else F.conv2d
            h = conv(x, A, None, self.base.stride, self.base.padding)  # (N, r, *spatial)
            return conv(h * ad.scaling, B)  # 1x1 conv: (N, out, *spatial)
        return F.linear(F.linear(x, A) * ad.scaling, B)  # (..., in) -> (..., r) -> (..., out)

    def weight_norm(self, ad: Adapter | None = None) -> Tensor:
        """||W0 + s·B·A|| per output row, detached (DoRA §4.3)."""
        ad = self.adapter if ad is None else ad
        return ops.dora_norm(ops.as_matrix(self.weight, self.kind), ad.lora_A, ad.lora_B, ad.scaling)

    def dora_factor(self, ad: Adapter | None = None) -> Tensor:
        """m / ||W0 + s·B·A||, shaped to broadcast over the layer's output."""
        ad = self.adapter if ad is None else ad
        m = ad.lora_magnitude  # (out,), conv: (1, out, 1, ...)
        return m / self.weight_norm(ad).to(m.dtype).view(m.shape)

    def _bias_view(self, out: Tensor) -> Tensor:
        return self.bias.view(1, -1, *([1] * (out.dim() - 2))) if self.kind == "conv" else self.bias

    # --- forward -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base_forward(x, self.bias)
        if self.routing is not None:
            return self.routing(self, x)
        if not self.active:
            return self.base_forward(x, self.bias)
        if len(self.active) > 1:
            return self.sum_forward(x, [self.adapters[n] for n in self.active])
        ad = self.adapters[self.active[0]]
        if FUSED and self.training and self.kind in ("linear", "linear_t") and not is_packed(self.weight):
            return self.fused_forward(x, ad)
        if not ad.use_dora:
            out = self.base_forward(x, self.bias)
            return out + self.lora_forward(x, ad).to(out.dtype)
        out = self.base_forward(x, None)
        out = (self.dora_factor(ad) * (out + self.lora_forward(x, ad))).to(out.dtype)
        if self.bias is not None:  # DoRA rescales the weight, never the bias
            out = out + self._bias_view(out)
        return out

    def sum_forward(self, x: Tensor, adapters: list[Adapter]) -> Tensor:
        """Several adapters at once, in order, as PEFT adds them: a LoRA adapter adds s·B·A·x; a DoRA adapter adds
        (f - 1)·y + f·s·B·A·x, with f = m/||W0 + s·B·A|| and y the output so far without the bias."""
        out = self.base_forward(x, self.bias)
        for ad in adapters:
            delta = self.lora_forward(x, ad)
            if ad.use_dora:
                f = self.dora_factor(ad)
                y = out if self.bias is None else out - self._bias_view(out)
                delta = (f - 1) * y.to(delta.dtype) + f * delta
            out = out + delta.to(out.dtype)
        return out

    def fused_forward(self, x: Tensor, ad: Adapter | None = None) -> Tensor:
        """The same function as ``forward``'s reference path, as one autograd function (``fused.lora_linear``); not
        traced by torch.compile (``compile_boundaries``)."""
        ad = self.adapter if ad is None else ad
        w0_sq = None
        if ad.use_dora:
            w = self.weight
            key = weight_key(w)
            if ad.w0_sq is None or ad.w0_sq[0] != key:  # W0 is frozen: changes only by load, init or .to()
                ad.w0_sq = (key, fused.row_sq_norms(ops.as_matrix(w, self.kind), ad.lora_A.dtype))
            w0_sq = ad.w0_sq[1]
        return fused.lora_linear(x, self.weight, self.bias, A=ad.lora_A, B=ad.lora_B, s=ad.scaling,
                                 p=ad.dropout.p if self.training else 0.0, transposed=self.kind == "linear_t",
                                 magnitude=ad.lora_magnitude, w0_sq=w0_sq)

    # --- initialisation and merging ---------------------------------------------------------------------------

    @torch.no_grad()
    def reset_adapter(self, init, name: str | None = None) -> None:
        """Initialise A, B (and W0 for PiSSA/OLoRA, and m for DoRA) as PEFT does for ``init_lora_weights``."""
        ad = self.adapter if name is None else self.adapters[name]
        if init in ("pissa", "olora"):
            W0 = ops.as_matrix(self.weight, self.kind)
            A, B, residual = ops.init_from_weight(W0, ad.r, ad.scaling, init)
            ad.lora_A.copy_(A)
            ad.lora_B.copy_(B)
            self.weight.copy_(ops.from_matrix(residual, self.kind, self.weight.shape))
        else:
            ops.init_lora(ad.lora_A, ad.lora_B, self.kind, init, ad.r)
        if ad.use_dora:
            ad.lora_magnitude.copy_(self.weight_norm(ad).view(ad.lora_magnitude.shape))

    def merged_weight(self, name: str | None = None) -> Tensor:
        """The base weight with one adapter folded in (float32 math, base dtype)."""
        ad = self.adapter if name is None else self.adapters[name]
        return ops.merged_weight(self.weight, self.kind, ad.lora_A, ad.lora_B, ad.scaling,
                                 ad.lora_magnitude.flatten() if ad.use_dora else None)
