"""lorafit against PEFT on the same weights: adapted module sets, logits, and adapters crossing both ways.

Tolerance: float32 logits in eval mode agree to RTOL of their largest |value| (both libraries compute the same
sums in another order), under every SIMD kernel set (ATEN_CPU_CAPABILITY=default, avx2, avx512).
"""

from __future__ import annotations

import copy

import peft
import pytest

import lorafit
from helpers import CASES, MODELS, close_to_scale, example_input, perturb_trainable, run
from lorafit.peft_format import adapter_state_dict

RTOL = 1e-5  # float32 logits (eps 1.2e-7): ~80 ulps of the largest logit, for matmuls over 32-128 terms


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
    close_to_scale(got, want, rtol=RTOL)  # relative to the largest |logit|


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_adapter_loads_in_peft(case, tmp_path):
    kind, kw = CASES[case]
    base, ours, _ = build_pair(kind, kw)
    lorafit.save(ours, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    x = example_input(kind)
    close_to_scale(run(ours, x), run(ref, x), rtol=RTOL)  # relative to PEFT's largest |logit|


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
    close_to_scale(run(ours, x), run(ref, x), rtol=RTOL)  # relative to PEFT's largest |logit|
