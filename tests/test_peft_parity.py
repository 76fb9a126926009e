"""lorafit against PEFT on the same weights: adapted module sets, logits, and adapters crossing both ways.

Tolerance: max abs diff <= 1e-5 on float32 logits in eval mode.
"""

from __future__ import annotations

import copy

import peft
import pytest

import lorafit
from lorafit.io import adapter_state_dict

from conftest import MODELS, example_input, perturb_trainable, run

TOL = 1e-5

CASES = {
    "list": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.(q|k|down)_proj")),
    "all_linear_llama": ("llama", dict(target_modules="all-linear")),
    "all_linear_gpt2": ("gpt2", dict(target_modules="all-linear")),
    "exclude": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    "exclude_regex": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*\.1\..*")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    "layers_to_transform_nopattern": ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=0)),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                               rank_pattern={"q_proj": 2, r"layers\.1\.mlp\..*": 6},
                               alpha_pattern={"v_proj": 3.0, "down_proj": 16})),
    "bias_all": ("gpt2", dict(target_modules=["c_attn"], bias="all")),
    "bias_lora_only": ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
    "rslora": ("llama", dict(r=16, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "dora_llama": ("llama", dict(target_modules="all-linear", use_dora=True)),
    "dora_gpt2_bias": ("gpt2", dict(target_modules=["c_attn", "c_fc"], use_dora=True)),
    "dora_bert": ("bert", dict(target_modules=["query", "dense"], use_dora=True, use_rslora=True)),
    "embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": ("gpt2", dict(target_modules=["wte", "c_proj"], use_dora=True)),
    "conv": ("cnn", dict(target_modules=["conv1", "conv2", "conv1d", "fc"])),
    "conv_dora": ("cnn", dict(target_modules=["conv1", "conv2", "conv1d"], use_dora=True)),
    "mlp_all_linear": ("mlp", dict(target_modules="all-linear", exclude_modules=["out"])),
    "modules_to_save": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "modules_to_save_llama": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
}


def peft_names(model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def build_pair(kind, kw):
    base = MODELS[kind]()
    ours = lorafit.attach(copy.deepcopy(base), lorafit.LoraConfig(**kw, init_lora_weights=False))
    perturb_trainable(ours)
    ours.eval()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)).eval()
    return base, ours, ref


@pytest.mark.parametrize("case", list(CASES))
def test_same_modules_and_logits(case):
    kind, kw = CASES[case]
    base, ours, ref = build_pair(kind, kw)
    assert {n for n, _ in lorafit.adapter_layers(ours)} == peft_names(ref)
    result = peft.set_peft_model_state_dict(ref, adapter_state_dict(ours))
    assert not result.unexpected_keys
    x = example_input(kind)
    want, got = run(ref, x), run(ours, x)
    assert (got - run(base, x)).abs().max() > 1e-4  # the adapter really changes the output
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_adapter_loads_in_peft(case, tmp_path):
    kind, kw = CASES[case]
    base, ours, _ = build_pair(kind, kw)
    lorafit.save(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    x = example_input(kind)
    assert (run(ref, x) - run(ours, x)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorafit(case, tmp_path):
    kind, kw = CASES[case]
    base = MODELS[kind]()
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, init_lora_weights=False))
    perturb_trainable(ref)
    ref.eval()
    ref.save_pretrained(tmp_path / "p")
    ours = lorafit.load(copy.deepcopy(base), tmp_path / "p").eval()
    x = example_input(kind)
    assert (run(ref, x) - run(ours, x)).abs().max().item() <= TOL
