"""LoRA on parameters rather than modules (``LoraConfig.target_parameters``): the fused expert weights of
mixture-of-experts models, and any 2D weight a module uses directly.

transformers 5 stores a MoE block's experts as 3D ``nn.Parameter``s of one ``experts`` module, e.g. Qwen3-MoE's
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I); gpt-oss stores them transposed, (E, in, out), with biases.
Each expert e is a linear map W_e (out, in), and its adapter is ΔW_e = s·B_e·A_e, as in PEFT's ``ParamWrapper``.

In memory the factors keep PEFT's layout, so files need no conversion: ``lora_A`` (r·E, in) holds A_e in rows
e·r … e·r + r - 1, and ``lora_B`` (out, r·E) holds B_e in columns k·E + e (rank-major). A 2D parameter is one expert.

The fast path (``experts_forward``) never forms W_e + ΔW_e. It sorts the (token, expert) pairs by expert, as
transformers' grouped_mm implementation does, and computes each projection as
``grouped_mm(x, W) + s·grouped_mm(grouped_mm(x, Aᵀ), Bᵀ)``: each expert's update on the tokens routed to it, with
no host read (offsets are counted on the device). PEFT instead materialises W + ΔW for every expert in every forward
and, in backward, the full (E, out, in) gradient of that sum. The fast path serves transformers' experts modules
(``use_experts_implementation``: ``has_gate``, ``is_transposed``, ``has_bias``, ``_apply_gate``) on devices with a
grouped_mm kernel (CPU, CUDA); any other parameter, and MPS, take the general path, W + ΔW through
``torch.func.functional_call`` (PEFT's arithmetic).

Dropout and DoRA are refused on parameters, as in PEFT, so that every adapter lorafit writes loads there too.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterError
from .layers import Adapter, LoraLayer
from .ops import init_lora

FAST_PARAMS = ("gate_up_proj", "up_proj", "down_proj")  # what transformers' experts implementations project with
GROUPED_MM_DEVICES = ("cpu", "cuda", "meta")  # where torch.nn.functional.grouped_mm runs; elsewhere (MPS): W + ΔW


def grouped_mm_runs(device: torch.device) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs on ``device``: torch 2.10+, a device type with a kernel, and
    on CUDA compute capability 8.0+ (as transformers checks); elsewhere the general path."""
    if not hasattr(F, "grouped_mm") or device.type not in GROUPED_MM_DEVICES:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
CONTRACT = ("has_gate", "has_bias", "is_transposed", "_apply_gate", "num_experts")


def param_dims(weight: Tensor, transposed: bool) -> tuple[int, int, int]:
    """(experts, in, out) of a targeted parameter, as PEFT reads them: a 2D weight is one (out, in) matrix; a 3D
    one is (E, out, in), or (E, in, out) where its module says ``is_transposed``."""
    if weight.dim() == 2:
        return 1, weight.shape[1], weight.shape[0]
    e, d1, d2 = weight.shape
    return (e, d1, d2) if transposed else (e, d2, d1)


def is_fast_module(module: nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation``) that the fast path can run."""
    return all(hasattr(module, a) for a in CONTRACT) and not getattr(module, "_is_expert_parallel", False)


def expert_weights(model: nn.Module) -> dict[str, Tensor]:
    """{full name: parameter} of every projection weight of a transformers experts module in the model."""
    out = {}
    for mname, module in model.named_modules():
        if is_fast_module(module):
            for leaf in FAST_PARAMS:
                p = getattr(module, leaf, None)
                if isinstance(p, nn.Parameter):
                    out[f"{mname}.{leaf}"] = p
    return out


def left_out_note(model: nn.Module, target_names) -> str | None:
    """One line naming the expert weights no target covers and their share of the model's parameters, and how to
    include them (``all-linear`` keeps PEFT's meaning: nn.Linear layers only); None when there are none."""
    weights = expert_weights(model)
    missing = [n for n in weights if n not in set(target_names)]
    if not missing:
        return None
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    share = sum(weights[n].numel() for n in missing) / max(total, 1)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in missing})
    return (f"note: {len(missing)} expert weights ({', '.join(leaves)}; {share:.0%} of the model's parameters) are "
            "not adapted: they are 3D parameters, not linear layers. Add them with --target-parameters experts "
            "(lora.target_parameters: experts)")


class ParamLayer(LoraLayer):
    """Named adapters over one parameter ``param_name`` of ``owner``: a child of the owner named
    ``lora_<param_name>``, reading the parameter from the owner (never registered twice, so the model's state_dict
    keys stay as they were). The owner's forward becomes ``experts_forward`` while it holds a ParamLayer."""

    kind = "param"

    def __init__(self, owner: nn.Module, param_name: str) -> None:
        nn.Module.__init__(self)
        self.enabled = True
        self.train(owner.training)
        object.__setattr__(self, "base", self)  # Adapter and adapter_shapes read .weight and the dims from here
        object.__setattr__(self, "owner", owner)
        self.register_parameter("bias", None)
        self.param_name = param_name
        weight = self.weight
        self.transposed = bool(getattr(owner, "is_transposed", False))
        self.n_experts, self.in_features, self.out_features = param_dims(weight, self.transposed)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.routing = None

    @property
    def weight(self) -> Tensor:
        """The owner's parameter as it is now (never a stale reference: FSDP2 and ``.to()`` may replace it)."""
        return getattr(self.owner, self.param_name)

    def extra_repr(self) -> str:
        return f"{self.param_name}, {tuple(self.weight.shape)}, active={list(self.active)}"

    def forward(self, *args, **kwargs):  # pragma: no cover - the owner's forward does the work
        raise AdapterError(f"a ParamLayer ({self.param_name}) is run by its module's forward, not called itself")

    def factors(self, ad: Adapter) -> tuple[Tensor, Tensor]:
        """(Aᵀ (E, in, r), Bᵀ (E, r, out)) of one adapter, per expert, in the adapter's dtype."""
        e = self.n_experts
        a_t = ad.lora_A.view(e, ad.r, self.in_features).transpose(1, 2)
        b_t = ad.lora_B.view(self.out_features, ad.r, e).permute(2, 1, 0)
        return a_t, b_t

    def delta(self, ad: Adapter, dtype: torch.dtype | None = None) -> Tensor:
        """s·ΔW in the parameter's own layout (and shape), float32 unless ``dtype``."""
        a_t, b_t = self.factors(ad)
        dtype = torch.float32 if dtype is None else dtype
        d = torch.bmm(a_t.to(dtype), b_t.to(dtype)) * ad.scaling  # (E, in, out)
        if self.weight.dim() == 2:
            return d[0].t()
        return d if self.transposed else d.transpose(1, 2)

    @torch.no_grad()
    def reset_adapter(self, init, name: str | None = None) -> None:
        ad = self.adapter if name is None else self.adapters[name]
        init_lora(ad.lora_A, ad.lora_B, "linear", init, ad.r)

    def merged_weight(self, name: str | None = None) -> Tensor:
        ad = self.adapter if name is None else self.adapters[name]
        return (self.weight.float() + self.delta(ad)).to(self.weight.dtype).contiguous()

    def weight_norm(self, ad=None):  # DoRA is refused on parameters (targets)
        raise AdapterError("DoRA is not supported on target_parameters")


def param_layers(owner: nn.Module) -> dict[str, ParamLayer]:
    """{parameter name: ParamLayer} of a module."""
    return {m.param_name: m for m in owner.children() if isinstance(m, ParamLayer)}


def layer_name(param_name: str) -> str:
    return "lora_" + param_name


def install(layer: ParamLayer) -> None:
    """Put a new ParamLayer into its owner (a child ``lora_<param>``) and take over the owner's forward."""
    owner = layer.owner
    if param_layers(owner).get(layer.param_name) is layer:
        return
    owner.add_module(layer_name(layer.param_name), layer)
    owner.forward = functools.partial(experts_forward, owner)  # an instance attribute: pickles, deep-copies


def uninstall(layer: ParamLayer) -> None:
    """Remove a ParamLayer from its owner; the last one gives the owner its own forward back."""
    owner = layer.owner
    delattr(owner, layer_name(layer.param_name))
    if not param_layers(owner) and "forward" in owner.__dict__:
        del owner.__dict__["forward"]


def _active(layer: ParamLayer) -> list[Adapter]:
    if not layer.enabled:
        return []
    return [layer.adapters[n] for n in layer.active]


def experts_forward(owner: nn.Module, *args, **kwargs) -> Tensor:
    """The owner's forward with its parameters' active adapters: the fast path for transformers' experts modules
    with one active adapter per parameter, else W + ΔW through functional_call (PEFT's arithmetic)."""
    layers = param_layers(owner)
    used = {n: _active(layer) for n, layer in layers.items()}
    used = {n: ads for n, ads in used.items() if ads}
    if not used or getattr(owner, "_lorafit_inside", False):
        return type(owner).forward(owner, *args, **kwargs)
    if is_fast_module(owner) and set(used) <= set(FAST_PARAMS) and all(len(a) == 1 for a in used.values()) \
            and len(args) >= 1 and len(args) - 1 + len(kwargs) == 2 and grouped_mm_runs(args[0].device):
        routing = list(args[1:]) + list(kwargs.values())  # (top_k_index, top_k_weights), by any name
        return _fast(owner, layers, used, args[0], routing[0], routing[1])
    params = {n: getattr(owner, n) + sum(layers[n].delta(ad).to(getattr(owner, n).dtype) for ad in ads)
              for n, ads in used.items()}
    owner._lorafit_inside = True
    try:
        return torch.func.functional_call(owner, params, args, kwargs, strict=False)
    finally:
        owner._lorafit_inside = False


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """(S, K) rows grouped by ``offsets`` times (E, K, N) per-group matrices -> (S, N), through torch's
    ``grouped_mm``. Its CPU kernel wants strides in multiples of 16 bytes: unaligned K or N (a small rank, a tiny
    test model) are zero-padded, which changes no value."""
    k, n = w.shape[-2:]
    mult = max(1, 16 // x.element_size())
    pad_k, pad_n = -k % mult, -n % mult
    if pad_k:
        x, w = F.pad(x, (0, pad_k)), F.pad(w, (0, 0, 0, pad_k))
    if pad_n:
        w = F.pad(w, (0, pad_n))
    if w.stride(-1) != 1 and w.stride(-2) != 1:
        w = w.contiguous()
    out = F.grouped_mm(x.contiguous(), w, offs=offsets)
    return out[:, :n] if pad_n else out


def grouped_outer(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Per group g of rows: a_gᵀ·b_g, stacked (E, a's columns, b's columns); an empty group gives zeros (the
    gradient of the per-group matrices of ``grouped_mm``)."""
    m, n = a.shape[1], b.shape[1]
    mult = max(1, 16 // a.element_size())
    a = F.pad(a, (0, -m % mult)) if m % mult else a
    b = F.pad(b, (0, -n % mult)) if n % mult else b
    out = F.grouped_mm(a.t(), b.contiguous(), offs=offsets)
    return out[:, :m, :n]


class GroupedLowRank(torch.autograd.Function):
    """u = B_e·(A_e·x) on each row's own expert e, rows grouped by ``offsets``, as one autograd function. The rows
    are ``source[rows]`` (the tokens, each repeated once per expert it is routed to) or ``source`` itself; backward
    keeps only the source, in its own dtype (not the top-k times larger gathered rows, nor a float32 copy of a
    bfloat16 base's), and the rank-r intermediate, and computes the factors' gradients as per-group outer
    products. ``b_t`` carries the scale."""

    @staticmethod
    def forward(ctx, source: Tensor, rows: Tensor | None, a_t: Tensor, b_t: Tensor, offsets: Tensor) -> Tensor:
        x = source if rows is None else source[rows]
        h = grouped_mm(x.to(a_t.dtype), a_t, offsets)  # (S, r)
        ctx.save_for_backward(source, rows, a_t, b_t, offsets, h)
        return grouped_mm(h, b_t, offsets)  # (S, out)

    @staticmethod
    def backward(ctx, du: Tensor):
        source, rows, a_t, b_t, offsets, h = ctx.saved_tensors
        du = du.to(b_t.dtype)
        dh = grouped_mm(du, b_t.transpose(-2, -1), offsets)
        db = grouped_outer(h, du, offsets) if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[2]:
            x = source if rows is None else source[rows]
            da = grouped_outer(x.to(a_t.dtype), dh, offsets)
        else:
            da = None
        dsource = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm(dh, a_t.transpose(-2, -1), offsets).to(source.dtype)
            dsource = dx if rows is None else torch.zeros_like(source).index_add_(0, rows, dx)
        return dsource, None, da, db, None


def _project(x: Tensor, weight: Tensor, transposed: bool, offsets: Tensor, layer: ParamLayer | None,
             ads: list[Adapter] | None, source: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One grouped projection of the sorted rows x, plus the adapter's s·B_e·A_e·x on each expert's own rows;
    ``source``: (tokens, row index) when x is tokens[index] (what the adapter's backward keeps instead of x)."""
    w = weight if transposed else weight.transpose(-2, -1)  # (E, in, out)
    out = grouped_mm(x.to(w.dtype), w, offsets)
    if ads:
        ad = ads[0]
        a_t, b_t = layer.factors(ad)
        # s folded into the copy of Bᵀ that grouped_mm needs anyway; the frozen base's product is not saved for
        # backward, so the update is added in place (no second (S, out) tensor)
        src, rows = source if source is not None else (x, None)
        u = GroupedLowRank.apply(src, rows, a_t, (b_t * ad.scaling).contiguous(), offsets)
        out = out.add_(u.to(out.dtype))
    return out


def _fast(owner: nn.Module, layers: dict, used: dict, hidden: Tensor, top_k_index: Tensor,
          top_k_weights: Tensor) -> Tensor:
    """transformers' grouped experts computation (sort by expert, grouped matmuls, gate, weighted sum over the
    top-k), with each targeted projection's low-rank update added on its expert's rows."""
    n_tokens, k = top_k_index.shape
    n_exp = owner.num_experts
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    token_of_row = perm // k
    x = hidden[token_of_row]
    counts = torch.zeros(n_exp, dtype=torch.int32, device=hidden.device)
    counts.index_add_(0, sorted_ids, torch.ones_like(sorted_ids, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    up = "gate_up_proj" if owner.has_gate else "up_proj"
    out = _project(x, getattr(owner, up), owner.is_transposed, offsets, layers.get(up), used.get(up),
                   (hidden, token_of_row))
    if owner.has_bias:
        out = out + getattr(owner, up + "_bias")[sorted_ids]
    out = owner._apply_gate(out) if owner.has_gate else owner.act_fn(out)
    out = _project(out, owner.down_proj, owner.is_transposed, offsets, layers.get("down_proj"),
                   used.get("down_proj"))
    if owner.has_bias:
        out = out + owner.down_proj_bias[sorted_ids]
    if getattr(owner, "has_post_expert_norm", False):
        out = owner.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy_(0, perm, out)
    return unsorted.view(n_tokens, k, -1).sum(dim=1).to(hidden.dtype)
