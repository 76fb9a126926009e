"""Per-module weight gradients by hooks, and the Gauss-Newton step of full fine-tuning by conjugate gradients.

For the candidate weights W_m (out, in) of a model whose loss is a softmax cross-entropy (or KL) over N_b rows of
logits per batch, the loss near the frozen weights is, to second order in an update Δ = (Δ_m)_m,

    L(W0 + Δ) ≈ L(W0) + ⟨g, Δ⟩ + ½·ΔᵀHΔ,    H = Σ_b (1/N_b) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t

with J_t (V, Σ_m out_m·in_m) the Jacobian of the t-th row of logits with respect to all candidate weights jointly and
p_t its softmax: H is the Gauss-Newton matrix, equal to the Fisher information for softmax cross-entropy. The step

    Δ* = −(H + δ·I)⁻¹ g

is where full fine-tuning of the candidates heads. The gradient of one module, g_m = −Σ_m' H_mm'·Δ_m'* (near a
target reachable by Δ*), mixes in the updates of every module coupled to it (H_mm' ≠ 0: the value and output
projections of one block, all the writers and readers of one residual stream), so per-module gradient spectra
smear a low-rank update over its neighbours; Δ*_m does not. Δ* is solved matrix-free by conjugate gradients
(Hestenes & Stiefel 1952) on Gauss-Newton-vector products (Schraudolph 2002; Martens 2010, "Deep learning via
Hessian-free optimization"): one pass with forward-mode AD gives J·v for the current direction v while recording
the graph, and a reverse pass through that graph gives Jᵀ·u with u = (diag p − p pᵀ)·J·v / N_b.

Everything runs on the model's device; the solver reads two numbers back per conjugate-gradient step (the curvature
along the direction and the residual, in one transfer), which decide whether to go on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..devices import accumulation_dtype

Deltas = dict[str, Tensor]  # module name -> (out, in)


@contextmanager
def recorded_calls(model: nn.Module, names: list[str], added: Optional[Deltas] = None):
    """Record (name, input X, output Y) of every call of the named modules; Y is made a graph leaf when nothing
    upstream requires grad, so ``autograd.grad`` can return dY for it without any parameter gradient. With
    ``added``, module m returns W_m·x + added[m]·x (+ bias) instead."""
    calls: list = []
    handles = []
    for name in names:
        def hook(mod, inputs, out, name=name):
            x = inputs[0]  # (..., in)
            if added is not None:
                out = out + F.linear(x, added[name].to(x.dtype))  # (..., out)
            if not out.requires_grad:
                out.requires_grad_()
            calls.append((name, x.detach(), out))
            return out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield calls
    finally:
        calls.clear()
        for h in handles:
            h.remove()


def output_grads(loss: Tensor, calls: list) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, X (N, in), dY (N, out)) for every recorded call that the loss depends on; dYᵀ·X is the call's share
    of ∂loss/∂W."""
    grads = torch.autograd.grad(loss, [c[2] for c in calls], allow_unused=True)
    for (name, x, _), g in zip(calls, grads):
        if g is not None:
            yield name, _atleast32(x.reshape(-1, x.shape[-1])), _atleast32(g.reshape(-1, g.shape[-1]))


def _atleast32(t: Tensor) -> Tensor:
    """float32 for half precisions, float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def gn_product(model: nn.Module, batches: list, v: Deltas, logits_fn: Callable[[nn.Module, dict], Tensor]) -> Deltas:
    """H·v for the Gauss-Newton matrix H of the mean softmax cross-entropy over the rows of ``logits_fn`` (see the
    module docstring), v and the result keyed by module name, each (out, in)."""
    names = list(v)
    hv = {n: torch.zeros_like(v[n]) for n in names}
    zero = {n: torch.zeros_like(v[n]) for n in names}
    for batch in batches:
        # J·v by forward-mode AD: Δ = 0 with tangent v. SDPA's fused kernels have no forward-AD formula; its math
        # backend is composed of ops that do.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
            duals = {n: fwAD.make_dual(zero[n], v[n]) for n in names}
            with recorded_calls(model, names, duals):
                primal, tangent = fwAD.unpack_dual(logits_fn(model, batch))  # (N, V) logits, J·v
            p = torch.softmax(_atleast32(primal), -1)  # (N, V)
            jv = _atleast32(tangent)
            u = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / p.shape[0]  # (diag p − p pᵀ)·J·v / N
        # Jᵀ·u by a reverse pass: the gradient of ⟨logits, u⟩
        with torch.enable_grad(), recorded_calls(model, names) as calls:
            for name, x, dy in output_grads((_atleast32(logits_fn(model, batch)) * u).sum(), calls):
                hv[name] += dy.t() @ x  # (out, N) @ (N, in)
    return hv


def _dot(a: Deltas, b: Deltas) -> Tensor:
    """Σ_m ⟨a_m, b_m⟩, a 0-d tensor on their device in ``accumulation_dtype``, summed module by module."""
    total = None
    for n in a:
        acc = accumulation_dtype(a[n].device)
        d = torch.linalg.vecdot(a[n].to(acc).flatten(), b[n].to(acc).flatten())
        total = d if total is None else total + d
    return total


def newton_step(model: nn.Module, batches: Iterable[dict], grads: Deltas,
                logits_fn: Callable[[nn.Module, dict], Tensor], *, iters: int = 20,
                damping: Union[float, Tensor] = 0.0, tol: float = 1e-3,
                scale: Optional[dict[str, Union[float, Tensor]]] = None) -> tuple[Deltas, dict]:
    """Δ* ≈ −(H + damping·I)⁻¹·g by at most ``iters`` conjugate-gradient steps from Δ = 0 (stops early when
    ||r|| <= tol·||g||). ``grads``: g per module, (out, in), the gradient of the same loss summed over ``batches``.
    ``scale``: a per-module estimate of H's diagonal (e.g. the mean Fisher eigenvalue), used as the preconditioner
    M = diag(scale_m·I) (preconditioned CG: modules whose curvature differs by orders of magnitude converge alike).
    ``damping`` and ``scale`` may be 0-d tensors on the device. Returns (Δ*, {"iters": steps taken, "residual":
    ||r||/||g||, "decrease": −(gᵀΔ* + ½Δ*ᵀHΔ*)}), the last being the loss decrease the quadratic model predicts.
    The model is left unchanged. Host reads: ||g||² once, two numbers per step, the decrease once."""
    batches = list(batches)
    x = {n: torch.zeros_like(g) for n, g in grads.items()}
    r = {n: -g for n, g in grads.items()}  # residual −g − (H + δI)·x at x = 0
    inv = {n: 1.0 / (scale[n] + damping) if scale else 1.0 for n in grads}

    def precond(t: Deltas) -> Deltas:
        return {n: inv[n] * t[n] for n in t}

    z = precond(r)
    p = {n: t.clone() for n, t in z.items()}
    rz = _dot(r, z)
    rr = g0 = float(_dot(r, r))
    steps = 0
    was_training = model.training
    model.eval()
    try:
        while steps < iters and rr > tol ** 2 * g0 > 0:
            hp = gn_product(model, batches, p, logits_fn)
            for n in hp:
                hp[n] += damping * p[n]
            php = _dot(p, hp)
            a = torch.where(php > 0, rz / php, 0.0)  # no curvature left along p (H is PSD): no step, and stop
            for n in x:
                x[n] += a * p[n]
                r[n] -= a * hp[n]
            z = precond(r)
            rz, rz_old = _dot(r, z), rz
            for n in p:
                p[n] = z[n] + (rz / rz_old) * p[n]
            php, rr = torch.stack([php, _dot(r, r)]).tolist()  # the step's one read
            if not php > 0:
                break
            steps += 1
    finally:
        model.train(was_training)
    # (H + δI)·x = −g − r, so the quadratic model gᵀx + ½xᵀ(H + δI)x = ½(gᵀx − rᵀx)
    decrease = 0.5 * float(_dot(r, x) - _dot(grads, x))
    return x, {"iters": steps, "residual": (rr / g0) ** 0.5 if g0 > 0 else 0.0, "decrease": decrease}
