"""A base quantized by bitsandbytes: a tiny Llama loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True)``
(NF4 ``Linear4bit`` layers, float32 compute) under a LoRA adapter.

References: the bitsandbytes model itself (at initialisation the adapter adds exactly zero), PEFT on the same
bitsandbytes model and on its dequantized float base (``lorafit.dequantize``), and lorafit on that float base.
"""

from __future__ import annotations

import pytest
import torch

import lorafit
from helpers import close_to_scale, copy_trainable
from lorafit.layers import LoraLayer, layer_kind
from lorafit.model import adapter_parameter_names
from lorafit.tensors import cpu_inference_layout, is_packed

bnb = pytest.importorskip("bitsandbytes")



def load_4bit(path):
    """The checkpoint in NF4 Linear4bit layers (all linear layers but lm_head, which transformers keeps in float)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu").eval()


def float_base(path):
    """The float base a run over the 4-bit model trains against: its dequantized values in nn.Linear layers."""
    model = load_4bit(path)
    assert lorafit.dequantize(model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    return model


def ids(seed=0, n=2, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n, t), generator=g)


def cfg(dropout=0.0, **kw):
    return lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, **kw)


def logits(model, x=None):
    with torch.no_grad():
        return model(ids(99) if x is None else x).logits.float()


def train_steps(model, steps=3):
    model.train()
    torch.manual_seed(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses, first_grads = [], None
    for i in range(steps):
        x = ids(seed=10 + i)
        loss = model(x, labels=x).loss
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses, first_grads


def trained(path, dropout=0.0, steps=3):
    model = lorafit.attach(load_4bit(path), cfg(dropout))
    model, losses, grads = train_steps(model, steps)
    return model, losses, grads


def test_attach_over_linear4bit_sizes_the_adapter_from_the_module_and_adds_zero_at_init(model_dir):
    model = load_4bit(model_dir)
    q = model.model.layers[0].self_attn.k_proj
    assert isinstance(q, bnb.nn.Linear4bit) and is_packed(q.weight) and q.weight.shape == (64 * 32 // 2, 1)
    base = logits(model)  # eval mode, no grad: on AVX512-BF16 CPUs bitsandbytes repacks the weights here
    lorafit.attach(model, cfg())
    layer = model.model.layers[0].self_attn.k_proj
    assert isinstance(layer, LoraLayer) and layer_kind(layer) == "linear"
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (32, 4)  # k_proj: 64 -> 2 kv heads x 16
    assert layer.lora_A.dtype == torch.float32 and "(32, 64)" in repr(layer)
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)  # B = 0: the bitsandbytes model, exactly


def test_training_lowers_the_loss_and_trains_only_the_adapter(model_dir):
    model = lorafit.attach(load_4bit(model_dir), cfg(dropout=0.05))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = adapter_parameter_names(model)
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    model, losses, grads = train_steps(model, steps=6)
    assert losses[-1] < losses[0], losses
    assert set(grads) == set(trainable)
    # layer 0's B gets a gradient only through layer 1's Linear4bit backward (bitsandbytes' input gradient)
    assert grads["model.layers.0.self_attn.q_proj.adapters.default.lora_B"].abs().max() > 0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert not any(cpu_inference_layout(p) for p in model.parameters())  # eval never repacked a wrapped layer


def test_adapter_trained_over_4bit_loads_in_peft_and_on_the_dequantized_base(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, losses, _ = trained(model_dir)
    assert all(torch.isfinite(torch.tensor(losses)))
    lorafit.save(model, tmp_path / "ad")
    ours = logits(model)

    # lorafit's adapter loads onto another 4-bit copy of the base and gives the trained model back exactly
    again = lorafit.load(load_4bit(model_dir), tmp_path / "ad")
    torch.testing.assert_close(logits(again), ours, rtol=0, atol=0)

    # PEFT on the same 4-bit model. Its base layers are PEFT's submodules and follow its mode; in train mode
    # (dropout 0: nn.Identity) bitsandbytes computes in float32 as lorafit's held layers do in every mode.
    theirs = peft.PeftModel.from_pretrained(load_4bit(model_dir), tmp_path / "ad").train()
    close_to_scale(ours, logits(theirs), rtol=1e-5, msg="lorafit vs PEFT, 4-bit base")  # measured ~1e-7

    # on the dequantized float base: lorafit and PEFT agree, and the 4-bit run computed that function
    on_float = logits(lorafit.load(float_base(model_dir), tmp_path / "ad"))
    peft_float = logits(peft.PeftModel.from_pretrained(float_base(model_dir), tmp_path / "ad").eval())
    torch.testing.assert_close(on_float, peft_float, rtol=0, atol=1e-4)
    close_to_scale(ours, peft_float, rtol=1e-5, msg="4-bit run vs PEFT on the dequantized base")


def test_merge_is_refused_until_dequantize_then_equals_the_float_merged_reference(model_dir):
    model, _, _ = trained(model_dir)
    before = logits(model)
    with pytest.raises(lorafit.AdapterError, match=r"Params4bit.*lorafit\.dequantize\(model\) first"):
        lorafit.merge(model)
    assert lorafit.adapters(model) == ["default"]
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # the refusal changed nothing

    assert lorafit.dequantize(model) == 14
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer.base, torch.nn.Linear) and not is_packed(layer.weight)
    assert layer.weight is layer.base.weight and not layer.weight.requires_grad
    close_to_scale(logits(model), before, rtol=1e-5, msg="dequantized base + adapter vs 4-bit + adapter")
    ref = copy_trainable(lorafit.attach(float_base(model_dir), cfg()), model)
    lorafit.merge(model)
    lorafit.merge(ref)
    assert not lorafit.adapters(model)
    assert not any(isinstance(m, (LoraLayer, bnb.nn.Linear4bit)) for m in model.modules())
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    close_to_scale(logits(model), before, rtol=1e-5, msg="merged vs 4-bit + adapter")


def test_dequantize_a_bare_4bit_model_gives_its_function_in_float(model_dir):
    model = load_4bit(model_dir)
    want = logits(model.train())  # train mode: float32 compute, no CPU inference repacking
    assert lorafit.dequantize(model) == 14
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    w = model.model.layers[1].self_attn.o_proj.weight
    assert type(w) is torch.nn.Parameter and w.dtype == torch.float32 and w.shape == (64, 64)
    close_to_scale(logits(model.eval()), want, rtol=1e-5, msg="dequantized vs 4-bit")


def test_dora_and_weight_based_inits_are_refused_over_4bit_layers(model_dir):
    """DoRA needs ||W0 + s·B·A|| per row, and PiSSA/OLoRA rewrite W0: neither can read a packed weight without
    bitsandbytes, which the core never imports. Refused at attach, naming the way out."""
    model = load_4bit(model_dir)
    with pytest.raises(lorafit.ConfigError, match=r"use_dora=True.*Params4bit.*lorafit\.dequantize"):
        lorafit.attach(model, cfg(use_dora=True))
    for init in ("pissa", "olora"):
        with pytest.raises(lorafit.ConfigError, match=rf"init_lora_weights='{init}' rewrites the base.*bitsandbytes"):
            lorafit.attach(model, cfg(init_lora_weights=init))
    assert not lorafit.adapters(model) and not any(isinstance(m, LoraLayer) for m in model.modules())
    lorafit.dequantize(model)
    lorafit.attach(model, cfg(use_dora=True))  # on the float base DoRA is an ordinary adapter
    assert model.model.layers[0].self_attn.q_proj.lora_magnitude.shape == (64,)


def test_training_over_a_layer_repacked_for_cpu_inference_is_refused(model_dir):
    model = load_4bit(model_dir)
    logits(model)  # eval mode before attach: bitsandbytes repacks (AVX512-BF16 CPUs only)
    if not any(cpu_inference_layout(p) for p in model.parameters()):
        pytest.skip("bitsandbytes does not repack on this CPU (no AVX512-BF16)")
    lorafit.attach(model, cfg())
    model.train()
    x = ids(3)
    with pytest.raises(lorafit.TrainingError, match="repacked.*no backward"):
        model(x, labels=x)
    with torch.no_grad():  # inference over it still works
        assert torch.isfinite(model(x).logits).all()
