"""bfloat16 compute in the fused path (issue 15, part 1): a bfloat16 base computes the adapter's products in
bfloat16 with float32 master weights, and the fused path stays on under torch.autocast.

Reference: the same layer in float32 (base weights = the bfloat16 values, upcast), the reference composition.
Tolerance: bfloat16 has an 8-bit mantissa (eps 2^-8 = 3.9e-3); outputs agree to 2^-6 of their largest |value|
(a few ulps after the rank-r and base products each round), float32 gradients of a bfloat16 computation to 3e-2 of
their largest |value|, and 10-step loss curves to 1e-2 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafit
from helpers import close_to_scale, tiny_llama
from lorafit import fused, layers
from lorafit.layers import LoraLayer

OUT_RTOL, GRAD_RTOL, LOSS_RTOL = 2 ** -6, 3e-2, 1e-2


def make_layer(use_dora: bool, dropout: float, dtype: torch.dtype) -> LoraLayer:
    torch.manual_seed(0)
    base = nn.Linear(40, 24).requires_grad_(False)  # frozen, as after attach
    base.weight.data = base.weight.data.bfloat16().to(dtype)  # the same values in both dtypes
    base.bias.data = base.bias.data.bfloat16().to(dtype)
    layer = LoraLayer(base, "linear", 8, 16.0, 2.0, dropout, use_dora=use_dora)
    layer.reset_adapter(False)
    return layer.train()


def run(layer: LoraLayer, x: torch.Tensor, *, fused_path: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(layers, "FUSED", fused_path)
    torch.manual_seed(5)  # the same dropout masks in both paths
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n.rpartition(".")[2]: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach().float(), x.grad.float(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_fused_equals_fp32_reference_within_bf16_rounding(use_dora, dropout, monkeypatch):
    x = torch.randn(3, 7, 40).bfloat16()
    got = run(make_layer(use_dora, dropout, torch.bfloat16), x, fused_path=True, monkeypatch=monkeypatch)
    want = run(make_layer(use_dora, dropout, torch.float32), x.float(), fused_path=False, monkeypatch=monkeypatch)
    close_to_scale(got[0], want[0], rtol=OUT_RTOL, msg="output")
    close_to_scale(got[1], want[1], rtol=GRAD_RTOL, msg="x.grad")
    assert got[2].keys() == want[2].keys()
    for name, g in got[2].items():
        assert g.dtype == torch.float32  # master weights and their gradients stay float32
        close_to_scale(g, want[2][name], rtol=GRAD_RTOL, msg=name)


def test_bf16_products_really_run_in_bf16(monkeypatch):
    seen = []
    real = fused.LoraLinearFunction.apply
    monkeypatch.setattr(fused.LoraLinearFunction, "apply", lambda *a: seen.append(a[3].dtype) or real(*a))
    layer = make_layer(False, 0.0, torch.bfloat16)
    run(layer, torch.randn(2, 5, 40).bfloat16(), fused_path=True, monkeypatch=monkeypatch)
    monkeypatch.setattr(fused, "BF16_COMPUTE", False)
    run(layer, torch.randn(2, 5, 40).bfloat16(), fused_path=True, monkeypatch=monkeypatch)
    assert seen == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fused_path_stays_on_under_autocast(use_dora, monkeypatch):
    calls = []
    real = fused.LoraLinearFunction.apply
    monkeypatch.setattr(fused.LoraLinearFunction, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    x = torch.randn(3, 7, 40)
    layer = make_layer(use_dora, 0.1, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(layer, x, fused_path=True, monkeypatch=monkeypatch)
    assert calls == [torch.bfloat16]  # the fused function ran, on the autocast dtype
    want = run(make_layer(use_dora, 0.1, torch.float32), x, fused_path=False, monkeypatch=monkeypatch)
    close_to_scale(got[0], want[0], rtol=OUT_RTOL, msg="output")
    for name, g in got[2].items():
        close_to_scale(g, want[2][name], rtol=GRAD_RTOL, msg=name)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_ten_step_loss_curve_bf16_vs_fp32(use_dora, monkeypatch):
    base = tiny_llama()
    base = base.to(torch.bfloat16).float()  # both runs start from the bfloat16 values
    curves = {}
    for dtype, fused_path in ((torch.bfloat16, True), (torch.float32, False)):
        monkeypatch.setattr(layers, "FUSED", fused_path)
        model = copy.deepcopy(base).to(dtype)
        torch.manual_seed(0)
        lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora,
                                                 lora_dropout=0.05))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)
        losses = []
        for _ in range(10):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[dtype] = torch.tensor(losses)
    assert curves[torch.float32][-1] < curves[torch.float32][0] - 0.05  # it learns
    torch.testing.assert_close(curves[torch.bfloat16], curves[torch.float32], rtol=LOSS_RTOL, atol=0)


def test_dora_norm_over_a_bf16_base_keeps_float32_accuracy():
    """The bfloat16 W0·Aᵀ product of ``fused.factored_dora_norm`` (float32 factors) against the same norm from W0's
    values in float32: 1e-4 relative (2e-5 measured), far inside bfloat16's own 2⁻⁸."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(96, 64, generator=g).bfloat16()
    A, B = 0.05 * torch.randn(8, 64, generator=g), 0.05 * torch.randn(96, 8, generator=g)
    got = fused.factored_dora_norm(W0, A, B, 2.0, fused.row_sq_norms(W0))
    want = fused.factored_dora_norm(W0.float(), A, B, 2.0, fused.row_sq_norms(W0.float()))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
