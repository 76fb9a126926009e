"""Target selection: PEFT's rules, the one deliberate difference, and errors that help."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lorafit
from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_mlp
from lorafit import ConfigError, LoraConfig
from lorafit.targets import select_targets


def names(model, **kw):
    return {t.name for t in select_targets(model, LoraConfig(**kw))}


def peft_names(model, **kw):
    p = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    from peft.tuners.lora import LoraLayer
    return {n.removeprefix("base_model.model.") for n, m in p.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("head", ["lm_head", "score", "classifier"])
def test_all_linear_skips_a_top_level_head_where_peft_adapts_it(head):
    model = tiny_mlp(head_name=head)
    ours, ref = names(model, target_modules="all-linear"), peft_names(model, target_modules="all-linear")
    assert ours == {"fc1", "fc2"}
    assert ref == ours | {head}  # the documented difference, and the only one


def test_all_linear_on_a_classifier_without_output_embeddings():
    model = tiny_bert()
    ours, ref = names(model, target_modules="all-linear"), peft_names(model, target_modules="all-linear")
    assert "classifier" not in ours and ref == ours | {"classifier"}


def test_all_linear_skips_output_embeddings_like_peft():
    for model in (tiny_llama(), tiny_gpt2()):
        assert names(model, target_modules="ALL-LINEAR") == peft_names(model, target_modules="all-linear")


def test_default_targets_follow_the_architecture():
    assert names(tiny_llama()) == peft_names(tiny_llama())
    with pytest.raises(ConfigError, match="no default targets"):
        names(tiny_mlp())


def test_unmatched_entry_lists_similar_names():
    with pytest.raises(ConfigError, match=r"'q_prj' matches no module.*q_proj"):
        names(tiny_llama(), target_modules=["q_prj", "v_proj"])


def test_unmatched_regex():
    with pytest.raises(ConfigError, match="regex 'q_proj' matches no module name"):
        names(tiny_llama(), target_modules="q_proj")  # fullmatch: needs '.*q_proj'


def test_unsupported_module_type_is_named():
    with pytest.raises(ConfigError, match=r"'model.layers.0.self_attn' is a .*LlamaAttention"):
        names(tiny_llama(), target_modules=["self_attn"])


def test_excluded_entry_is_reported():
    with pytest.raises(ConfigError, match="once exclude_modules"):
        names(tiny_llama(), target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])


def test_layers_to_transform_leaving_nothing():
    with pytest.raises(ConfigError, match="layers_to_transform"):
        names(tiny_llama(), target_modules=["q_proj"], layers_to_transform=[7])


def test_pattern_matching_nothing_warns():
    with pytest.warns(UserWarning, match="rank_pattern key 'nothing'"):
        names(tiny_llama(), target_modules=["q_proj"], rank_pattern={"nothing": 4})


def test_first_matching_pattern_wins():
    ts = select_targets(tiny_llama(), LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2, r".*": 6}))
    assert {t.r for t in ts} == {2}


def test_modules_to_save_must_exist():
    with pytest.raises(ConfigError, match="modules_to_save entry 'head'"):
        names(tiny_bert(), target_modules=["query"], modules_to_save=["head"])


def test_unsupported_conv_settings():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        names(model, target_modules=["0"])


def test_pissa_on_an_embedding_is_refused():
    with pytest.raises(ConfigError, match="linear layers only"):
        names(tiny_llama(), target_modules=["embed_tokens"], init_lora_weights="pissa")


def test_attach_twice_under_the_same_name_is_refused():
    model = lorafit.attach(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lorafit.attach(model, LoraConfig(target_modules=["v_proj"]))


def test_failed_attach_leaves_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        lorafit.attach(model, LoraConfig(target_modules=["q_proj", "nope"]))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, lorafit.LoraLayer) for m in model.modules())
