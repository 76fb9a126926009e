"""attach / disabled / merge / training on the model, checked against plain-PyTorch references."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lorafit
from helpers import CASES, MODELS, close, close_to_scale, example_input, perturb_trainable, run, tiny_llama
from lorafit import LoraConfig


@pytest.mark.parametrize("case", ["all_linear_llama", "dora_llama", "dora_gpt2_bias", "embedding_dora", "conv_dora",
                                  "patterns", "bias_all", "modules_to_save", "rslora"])
def test_merge_equals_unmerged_fp32(case):
    kind, kw = CASES[case]
    base = MODELS[kind]()
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw, init_lora_weights=False))
    perturb_trainable(model)
    model.eval()
    x = example_input(kind)
    unmerged = run(model, x)
    merged = lorafit.merge(model)
    assert not any(isinstance(m, lorafit.LoraLayer) for m in merged.modules())
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    assert merged.state_dict().keys() == base.state_dict().keys()
    # float32: the merged weights round W0 + s·B·A (|s·B·A| up to a few times |W0|) once, then 2 blocks; relative
    # to the largest |output| (~0.4): measured up to 7e-6 ("patterns", s = 4), so ~250 ulps
    close_to_scale(run(merged, x), unmerged, rtol=3e-5)


def test_merge_matches_peft_merge_and_unload():
    kind, kw = CASES["dora_gpt2_bias"]
    base = MODELS[kind]()
    ours = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw, init_lora_weights=False))
    perturb_trainable(ours)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    peft.set_peft_model_state_dict(ref, lorafit.peft_format.adapter_state_dict(ours))
    a, b = lorafit.merge(ours).state_dict(), ref.merge_and_unload().state_dict()
    assert a.keys() == b.keys()
    # float32 merged weights (DoRA: a norm and a division) from two implementations: ulps of each weight, plus a
    # few ulps of the weights' typical size (~0.02-0.1) for entries that cancel to near 0
    close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_half_precision_keeps_dtype_and_stays_within_rounding(dtype):
    base = tiny_llama().to(dtype)
    model = lorafit.attach(base, LoraConfig(target_modules="all-linear", use_dora=True, init_lora_weights=False))
    perturb_trainable(model)
    assert model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32  # fp32 adapters on half bases
    x = example_input("llama")
    unmerged = run(model, x).float()
    merged = run(lorafit.merge(model), x).float()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    eps = torch.finfo(dtype).eps
    # each merged weight is rounded once to the base dtype: the logits move by a few ulps (16 eps) of the largest
    close_to_scale(merged, unmerged, rtol=16 * eps)


def test_disabled_runs_the_base_model_and_restores():
    kind, kw = CASES["modules_to_save"]
    base = MODELS[kind]()
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw, init_lora_weights=False))
    perturb_trainable(model)
    x = example_input(kind)
    adapted = run(model, x)
    with lorafit.disabled(model):
        assert torch.equal(run(model, x), run(base, x))
    assert torch.equal(run(model, x), adapted)


def test_trainable_parameters_match_peft():
    for case in ("all_linear_llama", "dora_gpt2_bias", "bias_all", "embedding", "conv", "modules_to_save"):
        kind, kw = CASES[case]
        ours = lorafit.attach(MODELS[kind](), LoraConfig(**kw))
        ref = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**kw))
        n_train, n_total = lorafit.trainable_parameters(ours)
        assert n_train == sum(p.numel() for p in ref.parameters() if p.requires_grad), case
        n_lora = sum(p.numel() for n, p in ours.named_parameters() if ".lora_" in n)
        assert n_total == sum(p.numel() for p in MODELS[kind]().parameters()) + n_lora, case


def test_init_gives_the_base_output():
    base = tiny_llama()
    x = example_input("llama")
    for init in (True, "gaussian", "pissa", "olora"):
        for dora in (False, True):
            model = lorafit.attach(copy.deepcopy(base), LoraConfig(target_modules="all-linear", use_dora=dora,
                                                                   init_lora_weights=init))
            # PiSSA/OLoRA rewrite W0 as W0 - B·A (+ B·A in the adapter): float32 rounding of the largest |logit|
            close_to_scale(run(model, x), run(base, x), rtol=1e-5, msg=f"{init} {dora}")


def test_pissa_puts_the_principal_part_in_the_adapter():
    base = tiny_llama()
    w0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = lorafit.attach(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = model.model.layers[0].self_attn.q_proj
    s = torch.linalg.svdvals(w0)
    residual_s = torch.linalg.svdvals(layer.weight.detach())
    # the top 4 directions moved into B·A; float32 SVDs of a 32x32 matrix: ~80 ulps of each singular value (~0.1-0.2)
    close(residual_s[:4], s[4:8], rtol=1e-5, atol=0.0)


def test_training_changes_only_the_adapter_and_lowers_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # the target: the same network with a planted rank-2 change in its first two layers
        teacher[0].weight += 0.5 * torch.randn(32, 2) @ torch.randn(2, 8)
        teacher[2].weight += 0.3 * torch.randn(32, 2) @ torch.randn(2, 32)
    x = torch.randn(256, 8)
    y = teacher(x).detach()
    lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, lora_dropout=0.1))
    model.train()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # base weights bit-identical
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.adapters.default.lora_{w}" for i in ("0", "2") for w in ("A", "B", "magnitude")}


def test_merge_unties_tied_embeddings():
    from helpers import tiny_gpt2
    model = lorafit.attach(tiny_gpt2(), LoraConfig(target_modules=["wte"], init_lora_weights=False))
    perturb_trainable(model)
    x = example_input("gpt2")
    before = run(model, x)
    with pytest.warns(UserWarning, match="tied"):
        lorafit.merge(model)
    assert model.transformer.wte.weight is not model.lm_head.weight and not model.config.tie_word_embeddings
    close_to_scale(run(model, x), before, rtol=1e-5)  # float32: the merged wte rounds once; of the largest |logit|


def test_merge_restores_requires_grad():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    lorafit.merge(lorafit.attach(model, LoraConfig(target_modules=["q_proj"])))
    assert not model.lm_head.weight.requires_grad and model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_dropout_only_touches_the_lora_branch():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(copy.deepcopy(lin))
    lorafit.attach(model, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    model.train()
    x = torch.randn(4, 16)
    assert torch.equal(model(x), lin(x))  # B = 0: dropout on the LoRA input cannot leak into the base path


def test_misuse_raises_lorafit_errors_not_bare_value_errors():
    """What the CLI maps to 'lorafit: error: ...' and exit 2 (AdapterError, ConfigError; both ValueErrors, so older
    ``except ValueError`` still catches them)."""
    from lorafit import AdapterError, ConfigError
    from lorafit.ops import init_from_weight

    with pytest.raises(AdapterError, match="no lorafit adapter: call lorafit.attach"):
        lorafit.merge(tiny_llama())  # model.state_of
    model = lorafit.attach(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]), name="a")
    lorafit.attach(model, LoraConfig(r=2, target_modules=["0"]), name="b")
    lorafit.set_active(model, ["a", "b"])
    with pytest.raises(AdapterError, match=r"2 adapters are active on this layer \(\['a', 'b'\]\)"):
        model[0].lora_A  # layers.LoraLayer.adapter: one active adapter needed
    with pytest.raises(ConfigError, match="unknown weight-based init 'svd'"):
        init_from_weight(torch.randn(8, 8), 2, 1.0, "svd")
