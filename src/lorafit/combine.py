"""Combine a model's adapters into a new one, with the methods of PEFT's ``add_weighted_adapter``.

    lorafit.combine(model, {"a": 0.7, "b": 0.3}, method="ties", name="ab", density=0.5)

Adapter i brings its weight w_i, its scale s_i and its factors A_i (r_i, in), B_i (out, r_i). The methods differ in
what they merge:

* the factors, entry by entry (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``):
  A' = merge(c_i·A_i), B' = merge(|c_i|·B_i) with c_i = sign(w_i s_i)·√|w_i s_i|. So the ranks must agree on each
  module, and B'·A' = Σ_ij |c_j| c_i B_j A_i has cross terms: ``linear`` is not Σ w_i s_i B_i A_i (PEFT calls it a
  rough approximation), except for one adapter.
* ``cat``: A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (rows), B' = [B_1, B_2, ...] (columns), so B'·A' = Σ w_i s_i B_i A_i
  exactly, at rank Σ r_i.
* the updates (``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``):
  ΔW = merge(s_i B_i A_i with weights w_i) (out, in), and its truncated SVD ΔW ≈ U_k S_k V_kᵀ gives B' = U_k S_k,
  A' = V_kᵀ, with k = svd_rank (default: the largest r_i). ``svd_clamp`` = q clamps the entries of both to ±(the
  q-quantile of their entries), as kohya-ss's ``svd_merge_lora``.

The merges of tensors t_i with weights v_i:

* task arithmetic (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089): Σ v_i t_i.
* magnitude_prune: each t_i keeps its int(density·numel) largest |entries|, then Σ v_i t_i.
* TIES (Yadav et al., 2023, https://arxiv.org/abs/2306.01708, §3): trim as magnitude_prune; elect a sign per entry
  (that of Σ t_i for ``majority_sign_method="total"``, of Σ sign(t_i) for "frequency"); average the v_i t_i whose
  t_i has that sign.
* DARE (Yu et al., 2024, https://arxiv.org/abs/2311.03099, eq. 2): keep each entry with probability density and
  divide the kept ones by density (so E[t̃_i] = t_i), then sum (``dare_linear``) or elect and average as TIES
  (``dare_ties``). The draws come from a local generator seeded by ``seed``: the global RNG is left alone.

The new adapter carries the weights and scales in its factors: r = lora_alpha = its rank, so s = 1 (ranks below it
are zero-padded, as PEFT's ``cat``). It targets every module any of the adapters targets; a module that lacks
adapter i merges the others, as PEFT (the same, in every method, as a zero t_i). It is added inactive, like any
later adapter (``lorafit.set_active``). As in PEFT, combining a single adapter is ``linear`` whatever the method.

Where lorafit differs from PEFT 0.21: an error where PEFT returns silently (a taken name) or builds something else
than it says (DoRA adapters, whose magnitudes it drops; RSLoRA adapters, whose flag PEFT up to 0.21 copies to the
new adapter, scaling it by √r instead of 1; PEFT 0.22 gives it s = 1, as lorafit does); ranks are compared module
by module; a module with min(out, in) below the SVD rank keeps all its singular values; an SVD of a Conv1d update
is of its (out, in·k) matrix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from .errors import AdapterError, ConfigError
from .layers import Adapter, LoraLayer
from .model import AttachState, adapter_layers, attach, check_known, check_new, state_of
from .ops import lora_product


@dataclass(frozen=True)
class Method:
    """A combination method: what it merges ("factors", "cat" or "delta"), how it prunes each tensor first (None,
    "magnitude" or "random") and whether it elects a sign per entry (TIES)."""

    merges: str
    prune: str | None = None
    elect: bool = False


METHODS = {
    "linear": Method("factors"),
    "ties": Method("factors", "magnitude", elect=True),
    "dare_linear": Method("factors", "random"),
    "dare_ties": Method("factors", "random", elect=True),
    "magnitude_prune": Method("factors", "magnitude"),
    "cat": Method("cat"),
    "svd": Method("delta"),
    "ties_svd": Method("delta", "magnitude", elect=True),
    "dare_linear_svd": Method("delta", "random"),
    "dare_ties_svd": Method("delta", "random", elect=True),
    "magnitude_prune_svd": Method("delta", "magnitude"),
}
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Options:
    """The checked knobs of one ``combine`` call."""

    method: Method
    density: float | None  # fraction of entries kept by pruning, in (0, 1]
    sign_method: str  # TIES's election: "total" or "frequency"
    svd_rank: int | None
    svd_clamp: float | None  # quantile in [0, 1]
    full_matrices: bool  # passed to torch.linalg.svd


class Part(NamedTuple):
    """One source adapter on one module."""

    name: str
    adapter: Adapter
    weight: float


Rng = Callable[[torch.device], torch.Generator]

# --- the merges (pure) ---------------------------------------------------------------------------------------


def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its int(density·numel) largest |entries| set to zero (TIES's trim)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def random_prune(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop and rescale: each entry kept with probability ``density`` and divided by it (E = t)."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def elected(T: Tensor, how: str) -> Tensor:
    """TIES's sign election on stacked tensors T (n, ...): True where t_i has the entry's majority sign."""
    votes = T.sum(0) if how == "total" else T.sign().sum(0)  # (...)
    return T.sign() == torch.where(votes >= 0, 1, -1)  # (n, ...); a zero entry never votes


def merge(tensors: list[Tensor], weights: Tensor, method: Method, *, density: float | None = None,
          sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Merge same-shaped tensors t_i with weights v_i (n,): prune each, then Σ v_i t_i or TIES's disjoint mean
    Σ_{i agrees} v_i t_i / #{i agrees} (module docstring)."""
    if method.prune == "magnitude":
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif method.prune == "random":
        tensors = [random_prune(t, density, generator) for t in tensors]
    T = torch.stack(tensors)  # (n, ...)
    v = weights.to(T).view(-1, *([1] * (T.dim() - 1)))  # (n, 1, ...)
    if not method.elect:
        return (T * v).sum(0)
    agree = elected(T, sign_method)  # from the unweighted tensors, as TIES (and PEFT)
    return (T * v * agree).sum(0) / agree.sum(0).clamp(min=1)


# --- one module's new factors ----------------------------------------------------------------------------------


def factor_update(parts: list[Part], opts: Options, rng: Rng) -> tuple[Tensor, Tensor]:
    """A' = merge(c_i·A_i), B' = merge(|c_i|·B_i), c_i = sign(w_i s_i)·√|w_i s_i|: (r, in), (out, r)."""
    ws = [p.weight * p.adapter.scaling for p in parts]
    c_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])  # the sign goes on one side only
    c_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
    kw = _merge_options(opts, rng, parts[0].adapter.lora_A.device)
    A = merge([p.adapter.lora_A for p in parts], c_a, opts.method, **kw)  # PEFT's order of draws: all A, then B
    B = merge([p.adapter.lora_B for p in parts], c_b, opts.method, **kw)
    return A, B


def cat_update(parts: list[Part]) -> tuple[Tensor, Tensor]:
    """A' = [w_i s_i A_i] stacked by rows (Σ r_i, in), B' = [B_i] side by side (out, Σ r_i)."""
    A = torch.cat([p.adapter.lora_A * p.weight * p.adapter.scaling for p in parts])
    B = torch.cat([p.adapter.lora_B for p in parts], dim=1)
    return A, B


def delta_update(parts: list[Part], opts: Options, rng: Rng, *, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` truncated SVD of ΔW = merge(s_i B_i A_i; w_i): A' = V_kᵀ, B' = U_k S_k, optionally
    clamped at the svd_clamp quantile of their entries; in the layouts of A_i and B_i (conv: (k, in, *kernel))."""
    ad0 = parts[0].adapter
    deltas = [lora_product(p.adapter.lora_A, p.adapter.lora_B) * p.adapter.scaling for p in parts]  # (out, in)
    D = merge(deltas, torch.tensor([p.weight for p in parts]), opts.method,
              **_merge_options(opts, rng, ad0.lora_A.device))
    U, S, Vh = torch.linalg.svd(D, full_matrices=opts.full_matrices)  # (out, out|m), (m,), (in|m, in)
    k = min(rank, S.numel())  # a small module keeps all m = min(out, in) singular values
    B, A = U[:, :k] * S[:k], Vh[:k]  # (out, k), (k, in)
    if opts.svd_clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), opts.svd_clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A.reshape(k, *ad0.lora_A.shape[1:]), B.reshape(B.shape[0], k, *ad0.lora_B.shape[2:])


def _merge_options(opts: Options, rng: Rng, device: torch.device) -> dict:
    generator = rng(device) if opts.method.prune == "random" else None
    return dict(density=opts.density, sign_method=opts.sign_method, generator=generator)


def update(parts: list[Part], opts: Options, rng: Rng, *, rank: int) -> tuple[Tensor, Tensor]:
    """One module's new (A', B'), of rank at most ``rank``."""
    if opts.method.merges == "factors":
        return factor_update(parts, opts, rng)
    if opts.method.merges == "cat":
        return cat_update(parts)
    return delta_update(parts, opts, rng, rank=rank)


# --- checks ---------------------------------------------------------------------------------------------------


def _check_weights(state: AttachState, weights) -> dict[str, float]:
    """``weights`` as floats, once each name is known, each weight finite and no adapter DoRA."""
    if not isinstance(weights, Mapping):
        raise ConfigError(f"combine: weights must map adapter names to numbers, e.g. {{'a': 0.7, 'b': 0.3}}; got "
                          f"{type(weights).__name__}")
    if not weights:
        raise ConfigError(f"combine: weights is empty; name the adapters to combine (adapters: "
                          f"{list(state.adapters)})")
    for n, w in weights.items():
        check_known(state, n)
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"combine: the weight of adapter {n!r} is {w!r}; weights must be finite numbers")
        if state.adapters[n].config.use_dora:
            raise AdapterError(f"combine: adapter {n!r} is a DoRA adapter; its magnitudes cannot be combined (PEFT "
                               "leaves them out), so only LoRA adapters can be")
    return {n: float(w) for n, w in weights.items()}


def _check_options(method, n: int, *, density, sign_method, svd_rank, svd_clamp, full_matrices, seed) -> Options:
    if method not in METHODS:
        raise ConfigError(f"combine: unknown method {method!r}; methods: {', '.join(METHODS)}")
    chosen = METHODS["linear" if n == 1 else method]  # as PEFT: one adapter is combined linearly
    if density is not None and (isinstance(density, bool) or not isinstance(density, numbers.Real)
                                or not 0 < density <= 1):
        raise ConfigError(f"combine: density={density!r} is the fraction of entries kept; it must be in (0, 1]")
    if density is None and chosen.prune:
        raise ConfigError(f"combine: method {method!r} prunes; give density, the fraction of entries kept, in "
                          "(0, 1], e.g. density=0.5")
    if sign_method not in SIGN_METHODS:
        raise ConfigError(f"combine: majority_sign_method={sign_method!r}; allowed: {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"combine: svd_rank={svd_rank!r} must be a positive integer (or None: the largest rank)")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, numbers.Real)
                                  or not 0 <= svd_clamp <= 1):
        raise ConfigError(f"combine: svd_clamp={svd_clamp!r} is a quantile; it must be in [0, 1] (or None)")
    if not isinstance(full_matrices, bool):
        raise ConfigError(f"combine: svd_full_matrices={full_matrices!r} must be True or False")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"combine: seed={seed!r} must be an integer (or None)")
    return Options(chosen, None if density is None else float(density), sign_method, svd_rank,
                   None if svd_clamp is None else float(svd_clamp), full_matrices)


def _new_rank(modules: list[tuple[str, LoraLayer, list[Part]]], weights: dict[str, float], opts: Options) -> int:
    """PEFT's rank of the new adapter: the common rank (factors), Σ r_i (cat), svd_rank or max r_i (delta); r_i is
    adapter i's largest rank over its modules."""
    if opts.method.merges == "factors":
        for lname, _, parts in modules:
            if len({p.adapter.r for p in parts}) > 1:
                ranks = ", ".join(f"{p.name!r} r={p.adapter.r}" for p in parts)
                raise AdapterError(f"combine: this method merges A and B entry by entry, so the adapters need the "
                                   f"same rank on each module; {lname} has {ranks}. Use method='cat' or 'svd'")
        return max(parts[0].adapter.r for _, _, parts in modules)
    ranks = {n: max(p.adapter.r for _, _, parts in modules for p in parts if p.name == n) for n in weights}
    if opts.method.merges == "cat":
        return sum(ranks.values())
    return opts.svd_rank or max(ranks.values())


def _generators(seed: int | None) -> Rng:
    """One local generator per device, seeded by ``seed`` (None: a fresh random seed)."""
    made: dict[torch.device, torch.Generator] = {}

    def get(device: torch.device) -> torch.Generator:
        if device not in made:
            g = made[device] = torch.Generator(device=device)
            g.seed() if seed is None else g.manual_seed(seed)
        return made[device]
    return get


# --- the public function ----------------------------------------------------------------------------------------


def combine(model: nn.Module, weights: Mapping[str, float], method: str = "linear", *, name: str,
            density: float | None = None, svd_rank: int | None = None, svd_clamp: float | None = None,
            svd_full_matrices: bool = True, majority_sign_method: str = "total", seed: int | None = None) -> nn.Module:
    """Add adapter ``name``, the combination of the adapters in ``weights`` (name -> weight, in order) by
    ``method``, and return the model; see the module docstring for the formulas. The new adapter is inactive.

    ``density``: the fraction of entries the pruning methods keep, in (0, 1]; ``majority_sign_method``: TIES's sign
    election; ``svd_rank``, ``svd_clamp``, ``svd_full_matrices``: the SVD methods' rank, clamp quantile and
    ``torch.linalg.svd`` mode; ``seed``: the DARE methods' draws. On any error the model is unchanged.
    """
    state = state_of(model)
    weights = _check_weights(state, weights)
    params = [n for n in weights if state.adapters[n].config.target_parameters]
    if params:
        raise AdapterError(f"lorafit.combine does not combine adapters on expert parameters (target_parameters), "
                           f"as PEFT's add_weighted_adapter does not; {params[0]!r} has them")
    opts = _check_options(method, len(weights), density=density, sign_method=majority_sign_method,
                          svd_rank=svd_rank, svd_clamp=svd_clamp, full_matrices=svd_full_matrices, seed=seed)
    modules = [(lname, layer, parts) for lname, layer in adapter_layers(model)
               if (parts := [Part(n, layer.adapters[n], w) for n, w in weights.items() if n in layer.adapters])]
    rank = _new_rank(modules, weights, opts)
    first = state.adapters[next(iter(weights))].config
    config = replace(first, r=rank, lora_alpha=rank, target_modules=[lname for lname, _, _ in modules],
                     exclude_modules=None, layers_to_transform=None, layers_pattern=None, rank_pattern={},
                     alpha_pattern={}, use_rslora=False, use_dora=False, init_lora_weights=True)
    check_new(model, [(name, config)])
    rng = _generators(seed)
    with torch.no_grad():
        new = [update(parts, opts, rng, rank=rank) for _, _, parts in modules]  # all before the model changes
    attach(model, config, name=name, init=False)
    with torch.no_grad():
        for (_, layer, _), (A, B) in zip(modules, new):
            ad = layer.adapters[name]
            ad.lora_A[:A.shape[0]].copy_(A)  # rows past A's rank stay zero
            ad.lora_B[:, :B.shape[1]].copy_(B)
    return model
