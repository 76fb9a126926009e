"""`lorafit probe`: measure, before training, how much rank each module needs, and allocate ranks under a budget.

For every candidate module with weight W (out, in), a few batches of the frozen model give the full fine-tuning
gradient at W0

    G = Σ_batches dYᵀ·X            X (N, in): the module's inputs, dY (N, out): ∂loss/∂(module output)

whose singular values s_1 >= s_2 >= ... say how many directions the task pulls W in. LoRA's premise (Hu et al.
2021, §4.1 and §7) is that the update has a low "intrinsic rank"; the gradient's spectrum measures it per module.
Modules are compared by the loss decrease a step can buy, not by raw gradient size (a module with large
activations has large gradients for any target): with the module's Fisher information approximated as λ_m·I
(λ_m = tr F_m / (in·out), from gradients under labels sampled from the model, the Gauss-Newton curvature of
cross-entropy and KL), the natural-gradient step along the k-th singular direction lowers the loss by s_k²/(2λ_m)
(Amari 1998; the isotropic form of K-FAC, Martens & Grosse 2015, whose full Kronecker factors are too noisy to invert
from a few batches). Then

    effective rank  k_m = min{k : Σ_{i<=k} s_i² >= energy · Σ_i s_i²}                      (energy = 0.9)
    gain            g_{m,k} = s_{m,k}² / λ_m,   g_m = ||G_m||²_F / λ_m
    allocation      greedy over rank increments (m, k), best g_{m,k} / (in_m + out_m) first (gain per adapter
                    parameter), until the picked increments hold ``energy`` of Σ_m g_m or the next one no longer
                    fits the budget; a module that gets no increment is not adapted
    complexity      score = Σ_m g_m·k_m / Σ_m g_m: "simple" when <= 8 (the note's r = 4-8), else "complex"

The allocation favours modules with large, concentrated gains, as AdaLoRA's budget allocation does with its
sensitivity scores (Zhang et al. 2023, https://arxiv.org/abs/2303.10512); here it happens once, before training.
Modules that can express each other's update (the value and output projections of one attention block; projections
writing the same residual stream) share the gradient, so gradient spectra spread rank over all of them. With
``newton=STEPS`` the spectra are those of the joint Gauss-Newton step Δ* = −(H + δI)⁻¹·g of all candidates
(lorafit.gauss_newton), which undoes that coupling while the task's update is small enough for the quadratic model;
gains are then λ_m·σ_k(Δ*_m)² (tests/advise/test_probe.py: exact identification of planted modules and ranks).

Memory: exact G is out·in float32 values per module (SmolLM2-135M, all linear layers: 106M values, 0.4 GiB). With
``sketch=k`` each module keeps a randomised two-sided sketch instead, O((in + out)·k) values (Halko, Martinsson &
Tropp 2011, §5.5; Tropp et al. 2017, https://arxiv.org/abs/1609.00048, Alg. 7): Y = G·Ω (out, k) and
Z = Ψ·G (2k+1, in) with fixed Gaussian Ω, Ψ, both linear in G so batches simply add; then Q = orth(Y),
G ≈ Q·(Ψ·Q)⁺·Z, and the singular values of (Ψ·Q)⁺·Z (k, in) approximate the top k of G. The total energy is
estimated as (||Y||² + ||Z||²) / (3k+1), since E||G·Ω||² = k·||G||² and E||Ψ·G||² = (2k+1)·||G||².
Ranks near k are unreliable: choose k >= 2·(largest rank) + 8.

Device: the probe runs where the model is. Accumulators, sketches and the sampling generator live on the model's
device (a device generator seeded as on the CPU, where the numbers are the same as ever); nothing is read back per
batch or per module, only the spectra and scalars once at the end (and, with ``newton``, two numbers per
conjugate-gradient step). Sums of many terms (Fisher traces, sketches, energies, the solver's dot products) are
float64 where the device has it and float32 on Apple's MPS (``accumulation_dtype``); G itself is float32 everywhere.
What float32 accumulation does, measured on the CPU against float64 (the tiny and the planted Llama of the tests):
gradient spectra are unchanged, energies, curvatures and gains move by < 3e-7 relative; Newton spectra move by
6e-7 of s_1 after 10 conjugate-gradient steps and by 2e-3 of s_1 (gains 3e-3 relative) after 60, as the rounding of
the solver's dot products compounds; the ranks were the same every time. A sketch on MPS is another random draw
(float32 normals from its own generator), as good as the CPU's: its energy estimate differs within the sketch's own
randomness, which can move a rank at the --energy threshold.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..devices import accumulation_dtype
from ..errors import ConfigError
from ..files import write_figure
from ..layers import in_out_features
from ..lora_config import LoraConfig
from ..targets import select_targets
from .gauss_newton import newton_step, output_grads, recorded_calls
from .results import pyplot
from .suggest import LORA_ALPHA

SIMPLE_MAX = 8  # the design note's simple-task range is r = 4-8


# --- pure math -------------------------------------------------------------------------------------------

def effective_rank(s: Tensor, energy: float = 0.9, total: Optional[float] = None) -> int:
    """min{k : Σ_{i<=k} s_i² >= energy · total}, total = Σ s_i² unless given (a sketch sees only the top of the
    spectrum); 0 for a zero spectrum, len(s) when the top never reaches the share."""
    sq = s.double() ** 2  # (k,)
    total = float(sq.sum()) if total is None else total
    if total <= 0:
        return 0
    reached = (sq.cumsum(0) >= energy * total * (1 - 1e-12)).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(s)


def allocate_ranks(spectra: dict[str, Tensor], costs: dict[str, int], totals: dict[str, float],
                   energy: float = 0.9, budget: Optional[int] = None, max_rank: int = 64) -> dict[str, int]:
    """Greedy ranks: take rank increments (m, k) in order of s_{m,k}² / cost_m (energy per adapter parameter)
    until they hold ``energy`` of Σ_m totals[m], or the next one no longer fits ``budget`` parameters.

    Per module the gains s_k² do not increase with k, so greedy order is optimal for the fractional problem (a
    concave knapsack). A module whose next increment does not fit is closed; cheaper modules may still fill.
    """
    goal = energy * sum(totals.values())
    heap = [(-float(s[0]) ** 2 / costs[m], m, 0) for m, s in spectra.items() if len(s) and s[0] > 0]
    heapq.heapify(heap)
    ranks = {m: 0 for m in spectra}
    held, used = 0.0, 0
    while heap and held < goal:
        _, m, k = heapq.heappop(heap)
        if budget is not None and used + costs[m] > budget:
            continue  # closed: its later increments cost the same and buy less
        ranks[m], used, held = k + 1, used + costs[m], held + float(spectra[m][k]) ** 2
        if k + 1 < min(len(spectra[m]), max_rank) and spectra[m][k + 1] > 0:
            heapq.heappush(heap, (-float(spectra[m][k + 1]) ** 2 / costs[m], m, k + 1))
    return ranks


def complexity_score(ranks: dict[str, int], totals: dict[str, float]) -> float:
    """Σ_m e_m·k_m / Σ_m e_m: the effective rank of a typical unit of gradient energy."""
    weight = sum(totals.values())
    return sum(totals[m] * k for m, k in ranks.items()) / weight if weight > 0 else 0.0


def probed_config(ranks: dict[str, int], alpha: float = LORA_ALPHA, use_dora: bool = False) -> LoraConfig:
    """A LoraConfig adapting the modules with rank > 0, each at its own rank, all with the same ``alpha``.

    The most common rank becomes ``r``; the others go to ``rank_pattern`` keyed by the escaped full name (keys are
    regexes matched at a dot boundary). No ``alpha_pattern``: lorafit's alpha convention (lorafit.advise.suggest)
    is one alpha at every rank, scale alpha/r_m per module, because Adam's step of each module's update is then
    ~alpha·lr whatever its rank, and one learning rate suits them all (LoRA §4.1).
    """
    chosen = {m: r for m, r in ranks.items() if r > 0}
    if not chosen:
        raise ConfigError("the probe found no gradient signal in any candidate module (all gradients are zero); "
                          "check that the data has labelled tokens and the candidates affect the loss")
    values = list(chosen.values())
    common = max(sorted(set(values)), key=values.count)
    pattern = {re.escape(m): r for m, r in chosen.items() if r != common}
    return LoraConfig(r=common, lora_alpha=alpha, target_modules=list(chosen), rank_pattern=pattern, use_dora=use_dora)


# --- gradients -------------------------------------------------------------------------------------------

def device_generator(device: torch.device, seed: int) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded with ``seed`` (on the CPU, the numbers torch.Generator() gave); None on
    ``meta``, whose tensors hold no values to draw."""
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)


def to_host(tensors: list[Tensor], scalars: list[Tensor]) -> tuple[list[Tensor], list[float]]:
    """``tensors`` (each in its own dtype and shape) and the 0-d ``scalars`` (as floats) on the host, in one transfer
    from their common device: the probe's read of its results."""
    dtype = accumulation_dtype((tensors or scalars)[0].device)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors] + [v.reshape(1).to(dtype) for v in scalars]).cpu()
    *parts, values = flat.split([t.numel() for t in tensors] + [len(scalars)])
    return [q.to(t.dtype).view(t.shape) for q, t in zip(parts, tensors)], values.tolist()


class ExactGradient:
    """G = Σ dYᵀ·X, kept in full on ``device``: out·in float32 values."""

    def __init__(self, n_in: int, n_out: int, seed: int, *, device: Optional[torch.device] = None) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.G = torch.zeros(n_out, n_in, device=device)

    def add(self, x: Tensor, dy: Tensor) -> None:  # x (N, in), dy (N, out)
        self.G += dy.t() @ x  # (out, N) @ (N, in)

    def spectrum(self) -> tuple[Tensor, Tensor]:
        """(singular values, ||G||²_F as a 0-d tensor), both on G's device."""
        s = torch.linalg.svdvals(self.G)  # (min(out, in),); float32 is ample for ranking directions
        return s, (self.G.to(accumulation_dtype(self.G.device)) ** 2).sum()


class SketchedGradient:
    """Y = G·Ω (out, k) and Z = Ψ·G (l, in), l = 2k+1: O((in+out)·k) floats (Tropp et al. 2017, Alg. 7), on
    ``device`` in its ``accumulation_dtype``."""

    def __init__(self, n_in: int, n_out: int, seed: int, k: int = 32, *,
                 device: Optional[torch.device] = None) -> None:
        device = torch.device(device or "cpu")
        g, acc = device_generator(device, seed), accumulation_dtype(device)
        self.n_in, self.n_out = n_in, n_out
        self.k, n_rows = min(k, n_in, n_out), min(2 * k + 1, n_out)
        self.Omega = torch.randn(n_in, self.k, generator=g, dtype=acc, device=device)  # (in, k)
        self.Psi = torch.randn(n_rows, n_out, generator=g, dtype=acc, device=device)  # (l, out)
        self.Y = torch.zeros(n_out, self.k, dtype=acc, device=device)
        self.Z = torch.zeros(n_rows, n_in, dtype=acc, device=device)

    def add(self, x: Tensor, dy: Tensor) -> None:  # x (N, in), dy (N, out)
        x, dy = x.to(self.Y.dtype), dy.to(self.Y.dtype)
        self.Y += dy.t() @ (x @ self.Omega)  # (out, N) @ (N, k) = G_batch·Ω
        self.Z += (dy @ self.Psi.t()).t() @ x  # (l, N) @ (N, in) = Ψ·G_batch

    def spectrum(self) -> tuple[Tensor, Tensor]:
        """(the top k singular values, the estimated ||G||²_F as a 0-d tensor), both on the sketch's device."""
        Q = torch.linalg.qr(self.Y).Q  # (out, k): a basis of G's range
        core = torch.linalg.lstsq(self.Psi @ Q, self.Z).solution  # (k, in): G ≈ Q·core
        # E||G·Ω||² = k·||G||² and E||Ψ·G||² = l·||G||²: pool both estimates of the total energy
        total = ((self.Y ** 2).sum() + (self.Z ** 2).sum()) / (self.k + self.Z.shape[0])
        return torch.linalg.svdvals(core).float(), total


def sampled_label_loss(logits: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Σ_t -log p(y_t) with y_t drawn from the model's own softmax: its per-token gradients are samples whose
    second moment is the Fisher information (= the Gauss-Newton curvature of cross-entropy and KL losses)."""
    logits = logits.float()  # (N, V)
    probs = torch.softmax(logits.detach(), -1)
    y = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def accumulate_gradients(model: nn.Module, batches: Iterable[dict], names: list[str],
                         loss_fn: Callable[[nn.Module, dict], Tensor], *, sketch: Optional[int] = None, seed: int = 0,
                         logits_fn: Optional[Callable[[nn.Module, dict], Tensor]] = None) -> tuple[dict, dict]:
    """({name: ExactGradient | SketchedGradient}, {name: λ}): G = Σ dYᵀ·X per module over ``batches``, and
    λ = tr(F_m) / (in·out), the mean eigenvalue of the module's Fisher information, from per-token gradients
    dy_t·x_tᵀ under labels sampled from the model (||dy_t x_tᵀ||² = ||dy_t||²·||x_t||²); 1.0 when ``logits_fn``
    (model, batch) -> (N, V) logits is None. The model is left unchanged: no requires_grad flag or .grad is touched.
    All of it stays on the device of the first candidate's weight, λ as 0-d tensors: nothing is read back.
    """
    device = model.get_submodule(names[0]).weight.device
    acc = accumulation_dtype(device)
    accs, fisher, tokens = {}, {n: torch.zeros((), dtype=acc, device=device) for n in names}, 0
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        n_in, n_out = in_out_features(module, "linear_t" if type(module).__name__ == "Conv1D" else "linear")
        accs[name] = (SketchedGradient(n_in, n_out, seed + i, sketch, device=device) if sketch
                      else ExactGradient(n_in, n_out, 0, device=device))
    gen = device_generator(device, seed)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic model
    try:
        with torch.enable_grad(), recorded_calls(model, names) as calls:
            for batch in batches:
                calls.clear()
                for name, x, dy in output_grads(loss_fn(model, batch), calls):
                    accs[name].add(x, dy)  # G += dYᵀ·X
                if logits_fn is None:
                    continue
                calls.clear()
                logits = logits_fn(model, batch)  # (N, V)
                tokens += logits.shape[0]
                for name, x, dy in output_grads(sampled_label_loss(logits, gen), calls):
                    fisher[name] += ((dy.to(acc) ** 2).sum(1) * (x.to(acc) ** 2).sum(1)).sum()
    finally:
        model.train(was_training)
    lam = {n: fisher[n] / (max(tokens, 1) * a.n_in * a.n_out) if logits_fn is not None else fisher[n] + 1.0
           for n, a in accs.items()}
    return accs, lam


def gradient_spectra(model: nn.Module, batches: Iterable[dict], names: list[str],
                     loss_fn: Callable[[nn.Module, dict], Tensor], *, sketch: Optional[int] = None, seed: int = 0,
                     logits_fn: Optional[Callable[[nn.Module, dict], Tensor]] = None) -> dict[str, dict]:
    """name -> {"s": singular values of G, "energy": ||G||²_F, "fisher": λ} for each module in ``names`` (see
    ``accumulate_gradients``)."""
    accs, lam = accumulate_gradients(model, batches, names, loss_fn, sketch=sketch, seed=seed, logits_fn=logits_fn)
    spectra = [accs[n].spectrum() for n in names]
    s, values = to_host([s for s, _ in spectra], [e for _, e in spectra] + [lam[n] for n in names])
    return {n: {"s": s[i], "energy": values[i], "fisher": values[len(names) + i]} for i, n in enumerate(names)}


def newton_spectra(model: nn.Module, batches: list, names: list[str], loss_fn: Callable[[nn.Module, dict], Tensor],
                   logits_fn: Callable[[nn.Module, dict], Tensor], *, iters: int = 20, seed: int = 0,
                   damping: float = 1e-3) -> tuple[dict[str, dict], dict]:
    """name -> {"s": singular values of Δ*_m, "energy": ||Δ*_m||²_F, "fisher": λ}, where Δ* ≈ −(H + δI)⁻¹·g is the
    Gauss-Newton step of full fine-tuning over all candidates jointly (lorafit.gauss_newton), preconditioned by λ_m
    per module, δ = damping·tr(H)/dim; and the solver's report. ``loss_fn`` must be the mean cross-entropy (or
    KL) over the rows of ``logits_fn``."""
    accs, lam = accumulate_gradients(model, batches, names, loss_fn, seed=seed, logits_fn=logits_fn)
    sizes = {n: a.n_in * a.n_out for n, a in accs.items()}
    # H sums the per-batch mean curvature over the batches, λ is the mean over tokens: H_mm ≈ n_batches·λ_m·I
    diag = {n: len(batches) * lam[n] for n in names}
    mean_diag = sum(diag[n] * sizes[n] for n in names) / sum(sizes.values())  # tr(H) / dim, sampled
    step, info = newton_step(model, batches, {n: accs[n].G for n in names}, logits_fn, iters=iters,
                             damping=damping * mean_diag, scale=diag)
    energies = [(step[n].to(accumulation_dtype(step[n].device)) ** 2).sum() for n in names]
    s, values = to_host([torch.linalg.svdvals(step[n]) for n in names], energies + [lam[n] for n in names])
    return {n: {"s": s[i], "energy": values[i], "fisher": values[len(names) + i]} for i, n in enumerate(names)}, info


# --- the probe -------------------------------------------------------------------------------------------

@dataclass
class ModuleProbe:
    name: str
    shape: tuple[int, int]  # (out, in)
    spectrum: Tensor  # singular values of G (of the Newton step Δ* with newton > 0), descending
    energy: float  # ||G||²_F (||Δ*||²_F)
    fisher: float  # λ, the mean Fisher eigenvalue (1.0 without curvature)
    effective_rank: int
    rank: int  # allocated; 0 = not adapted
    gain: float  # ||G||²/λ (λ·||Δ*||²): twice the loss decrease predicted for this module's step


@dataclass
class ProbeResult:
    modules: list[ModuleProbe]
    config: LoraConfig
    score: float
    complexity: str
    energy: float
    budget: Optional[int]
    trainable: int  # adapter parameters of ``config``
    notes: list[str] = field(default_factory=list)
    measure: str = "gradient"  # what the spectra are of: "gradient" or "newton"

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}


def probe(model: nn.Module, batches: Iterable[dict], candidates: Union[str, list[str]] = "all-linear", *,
          energy: float = 0.9, budget: Optional[int] = None, sketch: Optional[int] = None, max_rank: int = 64,
          loss_fn: Optional[Callable[[nn.Module, dict], Tensor]] = None,
          logits_fn: Union[Callable[[nn.Module, dict], Tensor], None, str] = "default", use_dora: bool = False,
          seed: int = 0, newton: int = 0) -> ProbeResult:
    """Measure each candidate's gradient spectrum over ``batches`` and allocate ranks (see the module docstring).

    Args:
        model: the model, frozen; only the candidates' gradients are accumulated.
        batches: the batches to accumulate over (read once, or once per CG step with ``newton``).
        candidates: target_modules of the modules to consider (default all linear layers but the output layer).
        energy: share of the predicted gain the allocated ranks must cover.
        budget: most adapter parameters.
        sketch: keep a randomised rank-K sketch of each gradient instead of the full matrix.
        max_rank: highest rank given to one module.
        loss_fn: ``loss_fn(model, batch)``; default lorafit.hf.causal_lm_loss.
        logits_fn: ``logits_fn(model, batch)`` -> (N, V), the logits the loss is computed from, for the Fisher
            curvature (default: the labelled positions of a causal LM; None: no curvature, raw gradient energy).
        use_dora: size the probed config as DoRA (adds a magnitude per output row).
        seed: seed of the sketches and sampled labels.
        newton: conjugate-gradient steps towards the joint Gauss-Newton step Δ* of all candidates, whose
            per-module spectra replace the gradient's (0: gradient spectra; needs exact gradients and ``logits_fn``).
    """
    _check_options(newton=newton, sketch=sketch, logits_fn=logits_fn, energy=energy, budget=budget)
    if loss_fn is None:
        from ..hf import causal_lm_loss as loss_fn
    if logits_fn == "default":
        from ..hf import labelled_logits
        logits_fn = lambda model, batch: labelled_logits(model, batch)[0]  # noqa: E731
    targets = [t for t in select_targets(model, LoraConfig(target_modules=candidates))
               if t.kind in ("linear", "linear_t")]
    if not targets:
        raise ConfigError(f"no linear candidate modules in {candidates!r}; the probe measures nn.Linear / Conv1D")
    names = [t.name for t in targets]
    notes = []
    if newton:
        spectra, info = newton_spectra(model, list(batches), names, loss_fn, logits_fn, iters=newton, seed=seed)
        notes.append(f"Newton step: {info['iters']} conjugate-gradient steps, relative residual "
                     f"{info['residual']:.3f}, predicted loss decrease {info['decrease']:.4g}")
    else:
        spectra = gradient_spectra(model, batches, names, loss_fn, sketch=sketch, seed=seed, logits_fn=logits_fn)
    shapes = {t.name: tuple(reversed(in_out_features(model.get_submodule(t.name), t.kind))) for t in targets}
    return _allocate(spectra, shapes, notes, energy=energy, budget=budget, sketch=sketch, max_rank=max_rank,
                     curvature=logits_fn is not None, use_dora=use_dora, newton=bool(newton))


def _check_options(*, newton: int, sketch: Optional[int], logits_fn, energy: float, budget: Optional[int]) -> None:
    if newton and (sketch or logits_fn is None):
        raise ConfigError("the Newton step needs exact gradients and the model's logits: drop --sketch / "
                          "--no-curvature, or set --newton 0")
    if newton < 0:
        raise ConfigError(f"newton={newton!r} is invalid: expected conjugate-gradient steps >= 0 (0: off)")
    if not 0 < energy <= 1:
        raise ConfigError(f"energy={energy!r} is invalid: expected a share in (0, 1], e.g. 0.9")
    if budget is not None and budget <= 0:
        raise ConfigError(f"budget={budget!r} is invalid: expected a positive number of parameters")


def _allocate(spectra: dict, shapes: dict, notes: list[str], *, energy: float, budget: Optional[int],
              sketch: Optional[int], max_rank: int, curvature: bool, use_dora: bool, newton: bool) -> ProbeResult:
    """Ranks from the spectra: the gains under isotropic curvature, allocated greedily per parameter."""
    names = list(shapes)  # model order
    lam = {m: max(spectra[m]["fisher"], 1e-30) for m in names}
    s = {m: spectra[m]["s"] for m in names}
    # gains under isotropic curvature λ: a gradient direction s_k buys s_k²/(2λ) by a natural-gradient step, a
    # Newton-step direction σ_k buys λ·σ_k²/2
    w = {m: lam[m] ** 0.5 if newton else lam[m] ** -0.5 for m in names}
    gain_s = {m: s[m] * w[m] for m in names}
    gains = {m: spectra[m]["energy"] * w[m] ** 2 for m in names}
    costs = {m: shapes[m][0] + shapes[m][1] for m in names}
    ranks = allocate_ranks(gain_s, costs, gains, energy, budget, max_rank)
    eff = {m: min(effective_rank(s[m], energy, spectra[m]["energy"]), max_rank) for m in names}
    score = complexity_score(eff, gains)
    cfg = probed_config(ranks, use_dora=use_dora)
    modules = [ModuleProbe(m, shapes[m], s[m], spectra[m]["energy"], lam[m] if curvature else 1.0, eff[m], ranks[m],
                           gains[m]) for m in names]
    trainable = sum(ranks[m] * costs[m] + (shapes[m][0] if use_dora and ranks[m] else 0) for m in names)
    if sketch and any(eff[m] >= min(sketch, *shapes[m]) for m in names):
        notes.append(f"some effective ranks reach the sketch size {sketch}: they are lower bounds; raise --sketch")
    held = sum(float((gain_s[m][:ranks[m]].double() ** 2).sum()) for m in names) / max(sum(gains.values()), 1e-300)
    notes.append(f"the {sum(r > 0 for r in ranks.values())} adapted modules hold {100 * held:.1f}% of the predicted "
                 f"gain (target {100 * energy:.0f}%" + (f", budget {budget:,} parameters" if budget else "") + ")")
    return ProbeResult(modules, cfg, score, "simple" if score <= SIMPLE_MAX else "complex", energy, budget,
                       trainable, notes, "newton" if newton else "gradient")


# --- reporting -------------------------------------------------------------------------------------------

def probe_table(result: ProbeResult, top: Optional[int] = None) -> str:
    """One line per module (largest predicted gain first): shape, gain share, effective rank, allocated rank."""
    total = sum(m.gain for m in result.modules) or 1.0
    rows = sorted(result.modules, key=lambda m: -m.gain)
    shown = rows if top is None else rows[:top]
    width = max(len(m.name) for m in rows)
    lines = [f"  {'module (largest gain first)':<{width}} {'out x in':>11} {'gain %':>8} "
             f"{'eff. rank':>9} {'rank':>5} {'params':>9}"]
    for m in shown:
        lines.append(f"  {m.name:<{width}} {f'{m.shape[0]}x{m.shape[1]}':>11} {100 * m.gain / total:>8.2f} "
                     f"{m.effective_rank:>9} {m.rank:>5} {m.rank * sum(m.shape):>9,}")
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more modules (rank > 0: "
                     f"{sum(m.rank > 0 for m in rows[len(shown):])})")
    lines += ["", f"  complexity score {result.score:.1f} (gain-weighted effective rank at {100 * result.energy:.0f}% "
              f"energy) -> {result.complexity} task (simple <= {SIMPLE_MAX})",
              f"  adapter parameters {result.trainable:,}" + (f" of budget {result.budget:,}" if result.budget else "")]
    lines += [f"  {n}" for n in result.notes]
    return "\n".join(lines)


def probe_summary(result: ProbeResult) -> dict:
    """Every number of a probe as plain JSON-able data (probe.json)."""
    return {"complexity": result.complexity, "score": result.score, "energy": result.energy, "budget": result.budget,
            "trainable": result.trainable, "notes": result.notes, "measure": result.measure,
            "modules": [{"name": m.name, "shape": list(m.shape), "spectral_energy": m.energy, "fisher": m.fisher,
                         "gain": m.gain, "effective_rank": m.effective_rank, "rank": m.rank,
                         "spectrum": [float(x) for x in m.spectrum[:64]]} for m in result.modules]}


def plot_spectra(result: ProbeResult, path: Union[str, Path], top: int = 12) -> Path:
    """Normalised singular values s_k/s_1 of the ``top`` modules with the largest gradients, allocated rank marked."""
    plt = pyplot()
    rows = sorted(result.modules, key=lambda m: -m.gain)[:top]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in rows:
        s = m.spectrum[: max(64, m.rank + 8)].double()
        cum = (s ** 2).cumsum(0) / max(m.energy, 1e-300)
        line, = ax1.semilogy(range(1, len(s) + 1), (s / s[0]).clamp_min(1e-8), lw=1.2,
                             label=f"{m.name} (r={m.rank})")
        ax2.plot(range(1, len(s) + 1), cum, lw=1.2, color=line.get_color())
        if m.rank:
            ax1.plot(m.rank, float(s[m.rank - 1] / s[0]), "o", color=line.get_color())
    ax2.axhline(result.energy, color="k", ls="--", lw=0.8, label=f"energy share {result.energy:g}")
    kind = "Newton-step" if result.measure == "newton" else "gradient"
    ax1.set(xlabel="k", ylabel="s_k / s_1", title=f"{kind} spectra (dot: allocated rank)")
    ax2.set(xlabel="k", ylabel="Σ_{i<=k} s_i² / ||G||²", title="cumulative energy", ylim=(0, 1.02))
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax1.legend(fontsize=6, loc="lower left")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"lorafit probe: complexity score {result.score:.1f} ({result.complexity})")
    fig.tight_layout()
    try:
        write_figure(Path(path), fig)
    finally:
        plt.close(fig)
    return Path(path)
