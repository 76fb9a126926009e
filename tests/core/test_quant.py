"""A quantized base (lorafit.quant): NF4 and int8 weights from torchao under a LoRA/DoRA adapter.

References: the quantized base itself (at initialisation the adapter adds exactly zero), the same model on the
dequantized float weights (``lorafit.dequantize``: what the adapter was trained against), and PEFT on that float base.
"""

from __future__ import annotations

import pytest
import torch

import lorafit
from helpers import copy_trainable, tiny_llama
from lorafit import quant
from lorafit.tensors import dense, is_quantized

pytest.importorskip("torchao")

FORMATS = ["nf4", "int8"]


def ids(seed=0, n=2, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, t), generator=g)


def cfg(use_dora=False, dropout=0.0, targets="all-linear"):
    return lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, lora_dropout=dropout)


def quantized(fmt, dtype=torch.float32, seed=0, tie=False):
    model = tiny_llama(seed, tie=tie).to(dtype)
    names = lorafit.quantize(model, fmt)
    return model, names


def dequantized(fmt, dtype=torch.float32, seed=0):
    """The float base a quantized run trains against: quantize, then dequantize (a fresh copy, not a deepcopy:
    torchao's NF4 clone requantizes with its default block sizes)."""
    model, _ = quantized(fmt, dtype, seed)
    lorafit.dequantize(model)
    return model


def train_steps(model, steps=3, seed=1):
    model.train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for i in range(steps):
        x = ids(seed=10 + i)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def logits(model, x=None):
    with torch.no_grad():
        return model(ids(99) if x is None else x).logits.float()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_replaces_all_linear_but_the_head(fmt):
    model, names = quantized(fmt)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == linears - {"lm_head"}
    assert all(is_quantized(model.get_submodule(n).weight) for n in names)
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.embed_tokens.weight)
    assert all(not model.get_submodule(n).weight.requires_grad for n in names)
    # the stored bytes: NF4 about 4.1 bits per weight, int8 8 bits plus a scale per row
    q = model.model.layers[0].mlp.up_proj.weight
    ratio = quant.weight_bytes(q) / (q.numel() * 4)
    assert ratio < (0.14 if fmt == "nf4" else 0.30)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapted_logits_equal_the_quantized_base_at_init(fmt, use_dora):
    model, _ = quantized(fmt, torch.bfloat16)
    base = logits(model)
    lorafit.attach(model, cfg(use_dora))
    torch.testing.assert_close(logits(model.eval()), base, rtol=0, atol=0)  # B = 0 (DoRA: m = ||W0||)
    assert lorafit.trainable_parameters(model)[0] > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_fused_training_over_quantized_weights_equals_the_dequantized_float_base(fmt, use_dora):
    """The fused path over NF4/int8 computes what it computes over the dequantized float weights: outputs and
    the adapter's gradients (NF4's F.linear dequantizes exactly; int8's kernel rounds its products otherwise)."""
    model, _ = quantized(fmt, torch.float32)
    ref = dequantized(fmt)
    config = lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora,
                                init_lora_weights=False)  # B != 0: a non-trivial adapter
    torch.manual_seed(3)
    lorafit.attach(model, config)
    torch.manual_seed(3)
    lorafit.attach(ref, config)
    x = ids(5)
    outs, grads = [], []
    for m in (model, ref):
        m.train()
        loss = m(x, labels=x).loss
        loss.backward()
        outs.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    tol = dict(rtol=1e-5, atol=1e-6) if fmt == "nf4" else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=n)


@pytest.mark.parametrize("use_dora", [False, True])
def test_nf4_is_dequantized_once_per_layer_in_forward(use_dora, monkeypatch):
    """DoRA's norm and the base product share one dequantized copy of each NF4 weight (F.linear over NF4 is that
    copy times x, so the output is the same); backward dequantizes each layer once more for the input gradient
    (not layer 0's q/k/v: the embeddings are frozen, so their input needs no gradient). From the second step on: the
    first also computes DoRA's ||W0||² once."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    model, names = quantized("nf4")
    lorafit.attach(model, cfg(use_dora))
    model.train()
    x = ids(5)
    model(x, labels=x).loss.backward()
    calls = []
    real = NF4Tensor.get_original_weight
    monkeypatch.setattr(NF4Tensor, "get_original_weight", lambda self: calls.append(1) or real(self))
    loss = model(x, labels=x).loss
    assert len(calls) == len(names)  # one per quantized layer, LoRA and DoRA alike
    loss.backward()
    assert len(calls) == 2 * len(names) - 3


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_trained_adapter_is_peft_format_and_loads_in_peft_on_the_dequantized_base(fmt, use_dora, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = quantized(fmt, torch.float32)
    lorafit.attach(model, cfg(use_dora, dropout=0.1))
    model, losses = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    lorafit.save(model, tmp_path / "ad")
    ours_on_float = lorafit.load(dequantized(fmt), tmp_path / "ad")
    theirs = peft.PeftModel.from_pretrained(dequantized(fmt), tmp_path / "ad").eval()
    expected = logits(theirs)
    # lorafit on the same dequantized weights: within 1e-4 of PEFT
    torch.testing.assert_close(logits(ours_on_float), expected, rtol=0, atol=1e-4)
    # and the quantized model computes the same function (int8: its kernel's rounding)
    tol = dict(rtol=0, atol=1e-4) if fmt == "nf4" else dict(rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(logits(model), expected, **tol)
    # loading onto another quantized copy of the base gives the trained model back exactly
    again, _ = quantized(fmt, torch.float32)
    lorafit.load(again, tmp_path / "ad")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_of_a_quantized_run_equals_the_dequantized_merged_reference(fmt, use_dora):
    model, _ = quantized(fmt, torch.float32)
    lorafit.attach(model, cfg(use_dora))
    model, _ = train_steps(model)
    ref = copy_trainable(lorafit.attach(dequantized(fmt), cfg(use_dora)), model)  # the float base trained against
    lorafit.merge(ref)
    lorafit.merge(model)
    assert not any(is_quantized(p) for p in model.parameters())
    assert not lorafit.adapters(model)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    # the merged weight is the dequantized W0 plus s·B·A, computed in float32
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_bf16_qlora_recipe_trains_in_bf16_and_keeps_float32_adapters():
    model, _ = quantized("nf4", torch.bfloat16)
    lorafit.attach(model, cfg(dropout=0.05))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    _, losses = train_steps(model, steps=6)
    assert losses[-1] < losses[0]


def test_per_row_adapters_over_a_quantized_base(tmp_path):
    model, _ = quantized("nf4", torch.float32)
    lorafit.attach(model, cfg(), name="a")
    lorafit.attach(model, cfg(use_dora=True), name="b")
    for n in ("a", "b"):
        lorafit.set_active(model, n)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else None
    x = ids(7, n=2)
    singles = []
    for n in ("a", "b"):
        lorafit.set_active(model, n)
        singles.append(logits(model, x))
    with lorafit.per_row(model, ["a", "b"]):
        mixed = logits(model, x)
    torch.testing.assert_close(mixed[0], singles[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], singles[1][1], rtol=1e-5, atol=1e-5)


def test_dequantize_gives_float_weights_of_the_quantized_values():
    model, names = quantized("nf4", torch.float32)
    w = model.get_submodule(names[0]).weight
    values = dense(w).clone()
    assert lorafit.dequantize(model) == len(names)
    plain = model.get_submodule(names[0]).weight
    assert type(plain) is torch.nn.Parameter and not plain.requires_grad
    torch.testing.assert_close(plain, values, rtol=0, atol=0)
    original = tiny_llama(0).get_submodule(names[0]).weight
    err = (plain - original).abs().max() / original.abs().max()
    assert 0 < err < 0.15  # 4-bit NormalFloat: a visible, bounded rounding


# --- what is skipped and what is refused ----------------------------------------------------------------------

def test_unknown_format_lists_the_formats():
    model = tiny_llama()
    with pytest.raises(lorafit.ConfigError, match="unknown quantization format 'fp4'.*nf4, int8"):
        lorafit.quantize(model, "fp4")


def test_quantize_refuses_a_model_with_an_adapter():
    model = lorafit.attach(tiny_llama(), cfg())
    with pytest.raises(lorafit.ConfigError, match="already has an adapter"):
        lorafit.quantize(model, "nf4")


def test_missing_torchao_is_one_install_hint(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    model = tiny_llama()
    with pytest.raises(lorafit.ConfigError, match=r"needs torchao.*pip install 'lorafit\[quant\]'"):
        lorafit.quantize(model, "nf4")
    assert not any(is_quantized(p) for p in model.parameters())


def test_embeddings_and_tied_heads_are_skipped_and_named():
    model = tiny_llama(tie=True)
    chosen = lorafit.quantize(model, "int8", modules=["embed_tokens", "q_proj", "lm_head"])
    assert chosen == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    reasons = dict(quant.skipped(model, ["embed_tokens", "q_proj", "lm_head"]))
    assert "only nn.Linear" in reasons["model.embed_tokens"]
    assert "tied" in reasons["lm_head"]
    assert "already quantized" in reasons["model.layers.0.self_attn.q_proj"]


def test_nothing_to_quantize_is_an_error_with_the_reasons():
    with pytest.raises(lorafit.ConfigError, match="selects no linear layer.*embed_tokens: a Embedding"):
        lorafit.quantize(tiny_llama(), "nf4", modules=["embed_tokens"])


def test_weight_based_init_is_refused_over_a_quantized_base():
    model, _ = quantized("nf4")
    config = lorafit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa")
    with pytest.raises(lorafit.ConfigError, match="rewrites the base weight.*quantized"):
        lorafit.attach(model, config)
    assert not lorafit.adapters(model)


def test_autocast_keeps_a_quantized_weight_quantized_and_trains():
    """Training over NF4 under torch.autocast(bfloat16) runs, the weight stays quantized and the adapter gets its
    gradients (the fused path casts x and the bias, never the quantized weight)."""
    model, _ = quantized("nf4", torch.bfloat16)
    lorafit.attach(model, cfg(dropout=0.1)).train()
    x = ids(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    layer = model.model.layers[0].self_attn.q_proj
    assert is_quantized(layer.weight) and torch.isfinite(loss)
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
