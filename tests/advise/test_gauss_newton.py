"""lorafit.gauss_newton: Gauss-Newton products against finite differences and an explicit matrix, and the CG solve."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers import tiny_llama
from lorafit.advise.gauss_newton import gn_product, newton_step, output_grads, recorded_calls


def _self_distilled(model, n: int, seed: int = 0) -> list[dict]:
    """Batches whose target is the model's own distribution: the gradient is zero and the Hessian of the KL equals
    its Gauss-Newton matrix exactly."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        with torch.no_grad():
            batches.append({"input_ids": ids, "target": F.log_softmax(model(input_ids=ids).logits, -1)})
    return batches


def _kl(model, batch):
    logp = F.log_softmax(model(input_ids=batch["input_ids"]).logits, -1)  # (B, T, V)
    return F.kl_div(logp, batch["target"], log_target=True, reduction="batchmean") / batch["input_ids"].shape[1]


def _logits(model, batch):
    out = model(input_ids=batch["input_ids"]).logits
    return out.reshape(-1, out.shape[-1])  # (B·T, V)


def _weight_grads(model, batches, names) -> dict:
    grads = {n: 0.0 for n in names}
    with torch.enable_grad(), recorded_calls(model, names) as calls:
        for b in batches:
            calls.clear()
            for name, x, dy in output_grads(_kl(model, b), calls):
                grads[name] = grads[name] + dy.t() @ x  # (out, N) @ (N, in)
    return grads


def test_gn_product_is_the_hessian_vector_product_at_a_minimum():
    """At the model's own distribution, H·v = d/dε ∇L(W + εv) (central differences, float64; measured 2e-5)."""
    model = tiny_llama().double().eval()
    batches = _self_distilled(model, 2)
    names = ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(model.get_submodule(n).weight.shape, generator=g, dtype=torch.float64) for n in names}
    hv = gn_product(model, batches, v, _logits)
    eps = 1e-4

    def shifted(sign):
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).weight.add_(sign * eps * v[n])
        out = _weight_grads(model, batches, names)
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).weight.sub_(sign * eps * v[n])
        return out

    plus, minus = shifted(1), shifted(-1)
    for n in names:
        ref = (plus[n] - minus[n]) / (2 * eps)
        # central differences: O(eps²) truncation; the rotary tables are float32 even in a float64 model
        assert float((hv[n] - ref).norm() / ref.norm()) < 1e-3
    assert all(p.grad is None for p in model.parameters())


def test_newton_step_solves_the_explicit_system():
    """One softmax layer, logits = W·x: H = Σ_t x_t x_tᵀ ⊗ (diag p_t − p_t p_tᵀ) / N is small enough to build; CG
    with as many steps as unknowns must reproduce −(H + δI)⁻¹g."""
    torch.manual_seed(0)
    head = nn.Linear(5, 4, bias=False).double()
    model = nn.Sequential(head)
    x = torch.randn(32, 5, dtype=torch.float64)
    target = torch.softmax(torch.randn(32, 4, dtype=torch.float64), -1)
    batch = {"x": x}
    logits_fn = lambda m, b: m(b["x"])  # noqa: E731
    with torch.enable_grad():
        loss = F.cross_entropy(logits_fn(model, batch), target)
        (G,) = torch.autograd.grad(loss, [head.weight])  # (4, 5)
    p = torch.softmax(head(x), -1).detach()  # (N, V)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, V, V)
    # vec(W) row-major: index (o, i) -> o·5 + i; J_t = I_V ⊗ x_tᵀ, so H = Σ_t S_t ⊗ x_t x_tᵀ / N
    H = sum(torch.kron(S[t], torch.outer(x[t], x[t])) for t in range(32)) / 32
    damping = 1e-3
    ref = -torch.linalg.solve(H + damping * torch.eye(20, dtype=torch.float64), G.flatten()).view(4, 5)
    step, info = newton_step(model, [batch], {"0": G}, logits_fn, iters=40, damping=damping, tol=1e-10,
                             scale={"0": 0.7})
    torch.testing.assert_close(step["0"], ref, rtol=1e-6, atol=1e-9)  # float64, CG run to a 1e-10 residual
    assert info["residual"] < 1e-9 and info["iters"] <= 40
    A = H + damping * torch.eye(20, dtype=torch.float64)
    quad = float(G.flatten() @ ref.flatten() + 0.5 * ref.flatten() @ A @ ref.flatten())
    assert abs(info["decrease"] + quad) < 1e-9 * max(1.0, abs(quad))  # the quadratic model's decrease
