"""Mixed-adapter batches: row i of a batch goes through adapter ``names[i]`` (or the base model for None).

    h_i = W0·x_i + b + s_j·B_j·A_j·x_i          j = names[i]   (LoRA)
    h_i = f_j ⊙ (W0·x_i + s_j·B_j·A_j·x_i) + b  f_j = m_j / ||W0 + s_j·B_j·A_j||_row   (DoRA, Liu et al., 2024)

PEFT (``adapter_names=``) loops over the unique adapters inside every layer, gathering each one's rows of x and
scattering its output back. Here each layer keeps its adapters stacked, rank zero-padded to the largest and the
scale folded into B (built once and cached until a weight changes), and the base output is computed once for the
whole batch. Two schedules, chosen per call from the number of tokens per row T:

* long rows (prefill): gather each row's factors, A_i (r, in) and B_i (out, r), and add B_i·(A_i·x_i) into the base
  output with two batched matmuls (``bmm``, ``baddbmm_``): the LoRA flops of a single adapter, no copy of x;
* short rows (decode, T·(n-1) < 16): one matmul against the A of every adapter the batch uses, stacked (u·r, in), a
  mask keeping each row's own r columns, one matmul against the stacked B into the base output: three ops per
  layer whatever the number of adapters.

Embeddings gather A's columns by (adapter, token id); convolutions fall back to a loop over the adapters in the
batch. Inference only: training mode is refused.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import AdapterError
from .experts import ParamLayer
from .layers import LoraLayer
from .model import adapter_layers, check_known, disabled, state_of
from .tensors import weight_key

DECODE_WORK = 16  # use the stacked-all schedule when T·(n-1) is below this
SUBSETS_KEPT = 16  # per layer: the decode schedule's concatenated factors and row masks kept across contexts


def _stacks(layer: LoraLayer) -> dict:
    """The layer's adapters stacked (cached on the layer until a factor changes): slot j = adapter j, slot n = zero.

    A: (n+1, r, in) (embeddings: (n+1, num_emb, r)); B: (n+1, out, r) with s_j folded in; f: (n+1, out) DoRA
    factors (1 for LoRA and the zero slot) or None.
    """
    names = list(layer.adapters)
    params = [p for n in names for p in layer.adapters[n].parameters()] + [layer.weight]
    key = (tuple(names), tuple(weight_key(p) for p in params))
    cached = getattr(layer, "_mixed_stacks", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ads = [layer.adapters[n] for n in names]
    r = max(ad.r for ad in ads)
    A0, dtype, device = ads[0].lora_A, ads[0].lora_A.dtype, ads[0].lora_A.device
    n_in = A0.reshape(A0.shape[0], -1).shape[1]
    n_out = ads[0].lora_B.shape[0]
    with torch.no_grad():
        A = torch.zeros(len(ads) + 1, r, n_in, dtype=dtype, device=device)  # (n+1, r, in)
        B = torch.zeros(len(ads) + 1, n_out, r, dtype=dtype, device=device)  # (n+1, out, r)
        f = None
        for j, ad in enumerate(ads):
            A[j, :ad.r] = ad.lora_A.reshape(ad.r, -1)
            B[j, :, :ad.r] = ad.lora_B.reshape(n_out, ad.r) * ad.scaling
        if any(ad.use_dora for ad in ads):
            f = torch.ones(len(ads) + 1, n_out, dtype=dtype, device=device)
            for j, ad in enumerate(ads):
                if ad.use_dora:
                    f[j] = layer.dora_factor(ad).detach().flatten()
        stacks = {"names": names, "r": r, "A": A, "B": B, "f": f}
        if layer.kind == "embedding":
            stacks["A_emb"] = A.transpose(1, 2).contiguous()  # (n+1, num_emb, r): rows looked up by token id
    object.__setattr__(layer, "_mixed_stacks", (key, stacks))
    return stacks


def _concatenated(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """u stacked adapters side by side: A (u, r, in) -> (u·r, in), B (u, out, r) -> (out, u·r)."""
    return A.reshape(-1, A.shape[-1]), B.permute(1, 0, 2).reshape(B.shape[1], -1)


class Routing:
    """One per_row context's row -> adapter assignment, called by every LoraLayer as ``routing(layer, x)``."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.expand_ok = False  # set while model.generate runs: beams / sampled sequences repeat each row
        self._slots: dict = {}  # (layer's adapter names, rows) -> (rows,) slot index per row
        self._stacked: dict = {}  # id(layer) -> (its stacks, slots, the decode schedule's tensors)
        self._layers: dict = {}  # id(layer) -> [layer, its stacks, {rows: slots}]: read once per context
        self._host: dict = {}  # id(slot tensor) -> its slots as a list (the slot tensors live in _slots)
        self._base_only: dict = {}  # id(slot tensor) -> no row uses any of the layer's adapters

    def layer_state(self, layer: LoraLayer, rows: int, device: torch.device) -> tuple[dict, Tensor]:
        """The layer's stacks and the batch's slots, looked up once per context (the factors are read when a context
        first runs a layer: changing them inside a context takes effect in the next one)."""
        entry = self._layers.get(id(layer))
        if entry is None or entry[0] is not layer:
            entry = self._layers[id(layer)] = [layer, _stacks(layer), {}]
        slots = entry[2].get(rows)
        if slots is None:
            slots = entry[2][rows] = self.slots(entry[1]["names"], rows, device)
        return entry[1], slots

    def slots(self, layer_names: list[str], rows: int, device: torch.device) -> Tensor:
        key = (tuple(layer_names), rows, device)
        if key not in self._slots:
            n = len(self.names)
            if rows != n and not (self.expand_ok and rows % n == 0):
                raise AdapterError(f"lorafit.per_row was given {n} names but the batch has {rows} rows; pass one "
                                   "name (or None) per row")
            index = {a: j for j, a in enumerate(layer_names)}
            host = [index.get(a, len(layer_names)) for a in self.names for _ in range(rows // n)]  # generate
            slot = self._slots[key] = torch.tensor(host, device=device)  # repeats each row k times in place
            self._host[id(slot)] = host  # the same slots on the host: nothing is read back from the device
            self._base_only[id(slot)] = all(j == len(layer_names) for j in host)
        return self._slots[key]

    def host_slots(self, slot: Tensor) -> list[int]:
        """The host's copy of a slot tensor made by ``slots``."""
        return self._host[id(slot)]

    def stacked(self, layer: LoraLayer, st: dict, slot: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The decode schedule's (A_cat (u·r, in), B_cat (out, u·r), keep (rows, 1, u·r)) over the u adapters this
        batch uses, built on the first short-row call (prefill never builds them); keep is 1 on each
        row's own r columns, none for the base. Kept for the context (holding ``st``, so an entry is valid while its
        stacks are the layer's)."""
        entry = self._stacked.get(id(layer))
        if entry is not None and entry[0] is st and entry[1] is slot:
            return entry[2]
        n, r = len(st["names"]), st["r"]
        host = self.host_slots(slot)
        used = tuple(sorted(set(host) - {n}))
        # kept with the layer's stacks across contexts (a server decodes the same rows step after step), a few
        # subsets and row assignments per layer
        cats, keeps = st.setdefault("cats", {}), st.setdefault("keeps", {})
        if used not in cats:
            if len(cats) >= SUBSETS_KEPT:
                cats.clear()
            if len(used) == n:
                cats[used] = _concatenated(st["A"][:n], st["B"][:n])
            else:
                idx = torch.tensor(used, dtype=torch.long, device=slot.device)
                cats[used] = _concatenated(st["A"][idx], st["B"][idx])
        A_cat, B_cat = cats[used]
        key = (tuple(host), dtype, slot.device)
        if key not in keeps:
            if len(keeps) >= SUBSETS_KEPT:
                keeps.clear()
            pos = {j: i for i, j in enumerate(used)}
            local = torch.tensor([pos.get(j, len(used)) for j in host], device=slot.device)
            keeps[key] = F.one_hot(local, len(used) + 1)[:, :len(used)].to(dtype).repeat_interleave(r, dim=1) \
                .unsqueeze(1)
        keep = keeps[key]
        self._stacked[id(layer)] = (st, slot, (A_cat, B_cat, keep))
        return A_cat, B_cat, keep

    def __call__(self, layer: LoraLayer, x: Tensor) -> Tensor:
        if layer.training:
            raise AdapterError("lorafit.per_row is for inference; the model is in training mode (call model.eval())")
        rows = x.shape[0]
        st, slot = self.layer_state(layer, rows, x.device)
        if self._base_only[id(slot)]:  # the batch's adapters leave this layer alone
            return layer.base_forward(x, layer.bias)
        if layer.kind == "conv":
            return _conv_rows(layer, x, st, slot, self.host_slots(slot))
        f = st["f"]
        out = layer.base_forward(x, layer.bias if f is None else None)  # (rows, ..., out): the base, once
        shape, o3 = out.shape, out.reshape(rows, -1, out.shape[-1])  # (rows, T, out)
        if layer.kind == "embedding":
            h = st["A_emb"][slot.view(-1, *([1] * (x.dim() - 1))), x]  # (rows, ..., r): A[:, id] per row's adapter
            delta = torch.bmm(h.reshape(rows, -1, st["r"]), st["B"][slot].transpose(1, 2))  # @ (rows, r, out)
        else:
            xa = x.reshape(rows, -1, x.shape[-1])  # (rows, T, in)
            xa = xa if xa.dtype == st["A"].dtype else xa.to(st["A"].dtype)
            in_place = f is None and out.dtype == xa.dtype and out.is_contiguous()
            if xa.shape[1] * (len(st["names"]) - 1) < DECODE_WORK:
                A_cat, B_cat, keep = self.stacked(layer, st, slot, xa.dtype)
                h = (xa @ A_cat.t()).mul_(keep)  # (rows, T, u·r): every used adapter's A·x, each row's own kept
                if in_place:
                    o3.view(-1, o3.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B_cat.t())  # += (N, u·r) @ (u·r, out)
                    return out
                delta = h @ B_cat.t()  # (rows, T, u·r) @ (u·r, out) -> (rows, T, out)
            else:
                B_rows = st["B"][slot].transpose(1, 2)  # (rows, r, out)
                h = torch.bmm(xa, st["A"][slot].transpose(1, 2))  # (rows, T, in) @ (rows, in, r) -> (rows, T, r)
                if in_place:
                    o3.baddbmm_(h, B_rows)  # += (rows, T, r) @ (rows, r, out), into the base output
                    return out
                delta = torch.bmm(h, B_rows)
        if f is None:
            return (o3 + delta.to(o3.dtype)).view(shape)
        o3 = (f[slot].unsqueeze(1) * (o3.to(delta.dtype) + delta)).to(out.dtype)
        if layer.bias is not None:  # DoRA rescales the weight, never the bias
            o3 = o3 + layer.bias
        return o3.view(shape)


def _conv_rows(layer: LoraLayer, x: Tensor, st: dict, slot: Tensor, host: list[int]) -> Tensor:
    """Convolutions: the base once, then each adapter in the batch on its own rows (found from the host's slots)."""
    out = layer.base_forward(x, layer.bias)
    for j in sorted(set(host)):
        if j == len(st["names"]):
            continue
        rows = torch.tensor([i for i, k in enumerate(host) if k == j], device=slot.device)
        ad = layer.adapters[st["names"][j]]
        sub = out[rows]
        if ad.use_dora:
            bias = 0 if layer.bias is None else layer._bias_view(sub)
            sub = layer.dora_factor(ad) * (layer.base_forward(x[rows], None) + layer.lora_forward(x[rows], ad)) + bias
        else:
            sub = sub + layer.lora_forward(x[rows], ad).to(out.dtype)
        out = out.index_copy(0, rows, sub.to(out.dtype))
    return out


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]):
    """Inside the context, row i of every batch uses adapter ``names[i]`` (None: the base model), in eval and
    inference mode and under ``model.generate`` (whose beams and sampled sequences repeat a row: the names are
    repeated with them, as PEFT does). Each row's output is what that adapter alone gives."""
    state = state_of(model)
    names = list(names) if not isinstance(names, str) else [names]
    if not names:
        raise AdapterError("lorafit.per_row needs one adapter name (or None) per row; got an empty list")
    for n in names:
        if n is not None:
            check_known(state, n)
    if model.training:
        raise AdapterError("lorafit.per_row is for inference; the model is in training mode (call model.eval())")
    layers = [layer for _, layer in adapter_layers(model) if not isinstance(layer, ParamLayer)]
    if any(layer.routing is not None for layer in layers):
        raise AdapterError("lorafit.per_row contexts do not nest")
    if all(n is None for n in names):  # every row on the base model: no routing to do
        with disabled(model):
            yield model
        return
    # no named adapter has expert weights (below): inside the context every row sees the base experts
    experts = [layer for _, layer in adapter_layers(model) if isinstance(layer, ParamLayer)]
    params = [n for n in names if n is not None and state.adapters[n].config.target_parameters]
    if params:
        raise AdapterError(f"lorafit.per_row does not route adapters on expert parameters (target_parameters) yet; "
                           f"{params[0]!r} has them. Run its rows as a batch of their own (lorafit.set_active)")
    routing = Routing(names)
    generate = model.__dict__.get("generate")
    if callable(getattr(model, "generate", None)):
        original = model.generate

        @functools.wraps(original)
        def expanding_generate(*args, **kwargs):
            routing.expand_ok = True
            try:
                return original(*args, **kwargs)
            finally:
                routing.expand_ok = False
        model.generate = expanding_generate
    enabled = [layer.enabled for layer in experts]
    try:
        for layer in layers:
            layer.routing = routing
        for layer in experts:
            layer.enabled = False
        yield model
    finally:
        for layer in layers:
            layer.routing = None
        for layer, flag in zip(experts, enabled):
            layer.enabled = flag
        if generate is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = generate

