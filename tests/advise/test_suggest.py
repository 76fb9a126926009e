"""lorafit.suggest: module roles by structure, each rule of thumb, and the budget checks, on Llama, GPT-2 and BERT."""

from __future__ import annotations

import argparse

import pytest
from torch import nn

from helpers import tiny_bert, tiny_gpt2, tiny_llama
from lorafit import ConfigError, LoraConfig
from lorafit.advise.plan import adapter_parameters, estimate_memory
from lorafit.advise.suggest import (
    LORA_ALPHA,
    attention_roles,
    learning_rate,
    model_width,
    parse_bytes,
    parse_count,
    suggest,
    target_spec,
)
from lorafit.hf import meta_model
from lorafit.targets import select_targets

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
MiB = 2**20
WARMUP = {"warmup_ratio": 0.1, "schedule": "cosine"}


def selected(model, cfg: LoraConfig) -> set[str]:
    return {t.name for t in select_targets(model, cfg)}


def adapter_count(model, cfg: LoraConfig) -> int:
    return sum(adapter_parameters(model, select_targets(model, cfg), cfg.use_dora).values())


def total_memory(model, cfg: LoraConfig, batch=8, length=256, gc=False) -> int:
    return estimate_memory(model, adapter_count(model, cfg), batch_size=batch, max_length=length,
                           gradient_checkpointing=gc, runtime=0).total


# --- roles -----------------------------------------------------------------------------------------------

def test_roles_found_by_name_on_three_architectures():
    llama, gpt2, bert = tiny_llama(), tiny_gpt2(), tiny_bert()
    r = attention_roles(llama)
    assert r.query == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert r.value == [f"model.layers.{i}.self_attn.v_proj" for i in (0, 1)]
    assert len(r.attention) == 8 and len(r.mlp) == 6 and "lm_head" not in r.mlp
    r = attention_roles(gpt2)
    assert r.fused_qkv == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)] and not r.query
    assert set(r.mlp) == {f"transformer.h.{i}.mlp.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")}
    r = attention_roles(bert)
    assert r.qv == [f"bert.encoder.layer.{i}.attention.self.{n}" for n in ("query", "value") for i in (0, 1)]
    # BERT's attention output dense is attention; intermediate/output dense (the FFN) and the pooler are not
    assert "bert.encoder.layer.0.attention.output.dense" in r.attention
    assert {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"} <= set(r.mlp)
    assert "classifier" not in r.mlp + r.attention


@pytest.mark.parametrize("kind", MODELS)
def test_target_sets_select_exactly_their_roles(kind):
    model = MODELS[kind]()
    roles = attention_roles(model)
    assert target_spec(model, "qv") == QV[kind]
    for which, names in (("qv", roles.qv), ("attention", roles.attention), ("mlp", roles.mlp)):
        assert selected(model, LoraConfig(target_modules=target_spec(model, which))) == set(names)


class Attention(nn.Module):  # unknown names: the structural fallback (q, k, v, o in registration order)
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Attention()
        self.ff1, self.ff2 = nn.Linear(16, 32), nn.Linear(32, 16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10)


def test_structural_fallback_for_unknown_names():
    roles = attention_roles(Net())
    assert roles.query == ["blocks.0.mix.a", "blocks.1.mix.a"] and roles.value == ["blocks.0.mix.c", "blocks.1.mix.c"]
    assert set(roles.mlp) == {f"blocks.{i}.ff{j}" for i in (0, 1) for j in (1, 2)}
    s = suggest(Net(), "simple", goal="efficiency", runtime=0)
    assert selected(Net(), s.config) == set(roles.qv)


# --- the rules of thumb ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MODELS)
def test_simple_task_low_rank_one_alpha(kind):
    model = MODELS[kind]()
    s = suggest(model, "simple", goal="quality", runtime=0)
    assert (s.config.r, s.config.lora_alpha, s.config.target_modules) == (8, 16, "all-linear")
    assert s.fits and not s.config.use_dora
    e = suggest(model, "simple", goal="efficiency", runtime=0)
    assert (e.config.r, e.config.lora_alpha, e.config.target_modules) == (4, 16, QV[kind])
    assert any(line.startswith("r=4: a simple task") for line in e.reasons)
    assert any(line.startswith("lora_alpha=16: the same alpha at every rank (scaling alpha/r = 4)")
               for line in e.reasons)


@pytest.mark.parametrize("kind", MODELS)
def test_complex_task_high_rank(kind):
    model = MODELS[kind]()
    q = suggest(model, "complex", goal="quality", runtime=0)
    assert (q.config.r, q.config.lora_alpha, q.config.target_modules) == (32, 16, "all-linear")
    e = suggest(model, "complex", goal="efficiency", runtime=0)
    assert (e.config.r, e.config.target_modules) == (16, QV[kind])
    assert 16 <= q.config.r <= 64 and 16 <= e.config.r <= 64
    assert any("complex task needs capacity" in line for line in q.reasons)


@pytest.mark.parametrize("kind", MODELS)
def test_complex_task_under_parameter_budget_uses_dora(kind):
    model = MODELS[kind]()
    budget = adapter_count(model, LoraConfig(r=8, target_modules=QV[kind], use_dora=True))
    s = suggest(model, "complex", param_budget=budget, runtime=0)
    assert s.config.r < 16 and s.config.use_dora and s.fits
    assert s.trainable == adapter_count(model, s.config) <= budget
    assert any(line.startswith("use_dora=true") for line in s.reasons)


@pytest.mark.parametrize("kind", MODELS)
def test_memory_constrained_targets_q_and_v_only(kind):
    model = MODELS[kind]()
    qv_mem = total_memory(model, LoraConfig(r=8, target_modules=QV[kind]))
    all_mem = total_memory(model, LoraConfig(r=8, target_modules="all-linear"))
    assert qv_mem < all_mem
    s = suggest(model, "simple", memory_budget=qv_mem, runtime=0)  # all-linear misses by its adapter alone
    assert s.config.target_modules == QV[kind] and s.config.r == 8 and s.fits
    assert s.estimate.total == qv_mem <= parse_bytes(qv_mem)
    assert any("memory-constrained" in line for line in s.reasons)
    assert s.train == {"lr": s.lr, **WARMUP, "batch_size": 8, "max_length": 256}


@pytest.mark.parametrize("kind", MODELS)
def test_best_quality_all_linear_moderate_rank_when_it_fits(kind):
    model = MODELS[kind]()
    all_mem = total_memory(model, LoraConfig(r=8, target_modules="all-linear"))
    s = suggest(model, "simple", memory_budget=all_mem, goal="quality", runtime=0)
    assert s.config.target_modules == "all-linear" and s.config.r == 8 and s.fits
    assert any("every linear layer at moderate rank" in line for line in s.reasons)
    assert s.reasons[-1].startswith("fits: peak training memory")


def test_memory_budget_turns_on_checkpointing_then_smaller_batches():
    model = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    gc_mem = total_memory(model, cfg, gc=True)
    s = suggest(model, "simple", memory_budget=gc_mem, runtime=0)
    assert s.fits and s.train == {"lr": s.lr, **WARMUP, "batch_size": 8, "max_length": 256,
                                  "gradient_checkpointing": True}
    assert s.config.target_modules == ["q_proj", "v_proj"] and s.config.r == 4
    small = total_memory(model, cfg, batch=2, gc=True)
    s = suggest(model, "simple", memory_budget=small, runtime=0)
    assert s.fits and s.train["batch_size"] == 2 and s.train["grad_accum"] == 4
    assert any("effective batch of 8" in line for line in s.reasons)


@pytest.mark.parametrize("kind", MODELS)
def test_nothing_fits_says_so(kind):
    s = suggest(MODELS[kind](), "simple", memory_budget="1MB", runtime=0)
    assert not s.fits
    assert s.reasons[-1].startswith("NOTHING FITS") and "1 MiB" in s.reasons[-1]
    assert s.train["batch_size"] == 1 and s.train["gradient_checkpointing"]
    tiny = suggest(MODELS[kind](), "simple", param_budget=10, runtime=0)
    assert not tiny.fits and tiny.config.r == 1 and "> budget 10" in tiny.reasons[-1]


def test_learning_rate_rule_follows_width_and_the_alpha_convention():
    """lr(d) = 1.5·3.6e-4·(1024/d)^0.77 at alpha 16: QLoRA's 2e-4 (d=4096, 5120) and 1e-4 (6656, 8192) within 1.4x;
    alpha·lr (Adam's step of B·A) is what stays fixed when alpha or RSLoRA change the scale."""
    class Wide(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.config = type("Cfg", (), {"hidden_size": d})()

    for d, qlora in ((4096, 2e-4), (5120, 2e-4), (6656, 1e-4), (8192, 1e-4)):
        assert qlora / 1.4 <= learning_rate(Wide(d)) <= qlora * 1.4, d
    assert learning_rate(Wide(576)) == 8.4e-4  # SmolLM2-135M
    base = learning_rate(Wide(4096))  # rounded to 2 significant digits
    assert learning_rate(Wide(4096), alpha=32) == pytest.approx(base / 2, rel=0.05)
    assert learning_rate(Wide(4096), r=16, use_rslora=True) == pytest.approx(base / 4, rel=0.05)
    assert learning_rate(Wide(4096), r=1) == learning_rate(Wide(4096), r=64)  # rank-free at fixed alpha
    assert model_width(tiny_gpt2()) == 32 and model_width(Net()) == 16 and LORA_ALPHA == 16
    s = suggest(tiny_llama(), "complex", runtime=0)
    assert s.lr == learning_rate(tiny_llama()) and s.to_yaml_dict()["lr"] == s.lr
    assert any(line.startswith(f"lr={s.lr:g}: about the pretraining learning rate") and "Brown et al. 2020" in line
               for line in s.reasons)


def test_a_simple_task_under_a_parameter_budget_keeps_all_linear_layers_down_to_rank_1():
    """The measured exception to the rule's floor (EVIDENCE): all-linear r=1 beat q,v r=8 with fewer parameters."""
    model = tiny_llama()
    n1 = adapter_count(model, LoraConfig(r=1, target_modules="all-linear"))
    s = suggest(model, "simple", param_budget=n1, runtime=0)
    assert s.config.target_modules == "all-linear" and s.config.r == 1 and s.fits and s.trainable == n1
    assert any(line.startswith("r=1:") and "below 4 for the parameter budget" in line and "q,v r=8" in line
               for line in s.reasons)
    s = suggest(model, "simple", param_budget=n1 - 1, runtime=0)  # below all-linear r=1: q, v
    assert s.config.target_modules == ["q_proj", "v_proj"] and s.fits
    assert any(line.startswith("evidence: ") and "saves memory at a small cost" in line for line in s.reasons)
    s = suggest(model, "simple", runtime=0)
    assert any(line.startswith("evidence: ") and "all-linear r=1 tied r=8 on three tasks" in line for line in s.reasons)


def test_warm_up_and_schedule_come_with_the_learning_rate():
    """suggest gives linear warm-up over 10% of the steps, then cosine, with its reason; train turns the share into
    steps (rounded up; a non-zero warmup_steps wins, as in transformers)."""
    from lorafit.train import TrainConfig
    from lorafit.train.loop import lr_lambda

    s = suggest(tiny_llama(), "simple", runtime=0)
    assert {k: s.to_yaml_dict()[k] for k in WARMUP} == WARMUP == {"warmup_ratio": 0.1, "schedule": "cosine"}
    assert any(line.startswith("warmup_ratio=0.1, schedule=cosine") and "Ma & Yarats 2021" in line
               for line in s.reasons)
    cfg = TrainConfig.from_dict({"lr": s.lr, **WARMUP})
    assert cfg.warmup(40) == 4 and cfg.warmup(8) == 1 and cfg.warmup(0) == 0
    f = lr_lambda(cfg, 40)
    assert [round(f(k), 4) for k in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 4 warm-up steps, then the peak
    assert f(39) < 0.01  # cosine to ~0 at the end
    cfg = TrainConfig.from_dict({"warmup_ratio": 0.1, "warmup_steps": 2})
    assert cfg.warmup(40) == 2  # warmup_steps wins over warmup_ratio
    assert [lr_lambda(cfg, 40)(k) for k in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-12)
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainConfig.from_dict({"warmup_ratio": 1.0})


def test_unknown_complexity_is_assumed_simple_and_said():
    s = suggest(tiny_llama(), None, runtime=0)
    assert s.config.r == 8 and s.reasons[0].startswith("complexity: not given, assumed simple")


def test_meta_model_gives_the_same_suggestion(tmp_path):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    meta = meta_model(tmp_path)
    assert next(meta.parameters()).device.type == "meta"
    a = suggest(model, "complex", memory_budget="2GB", runtime=0)
    b = suggest(meta, "complex", memory_budget="2GB", runtime=0)
    assert a.config == b.config and a.estimate.total == b.estimate.total


def test_sizes_and_bad_input():
    assert parse_bytes("8GB") == 8 * 2**30 == parse_bytes("8 GiB") and parse_bytes("512MB") == 512 * MiB
    assert parse_bytes(1000) == 1000 and parse_bytes(None) is None and parse_bytes("1.5G") == int(1.5 * 2**30)
    assert parse_count("2M") == 2_000_000 and parse_count("500k") == 500_000 and parse_count(1234) == 1234
    for bad in ("eight GB", "8XB", ""):
        with pytest.raises(ConfigError, match="memory budget"):
            parse_bytes(bad)
    for bad in ("lots", "-5", "0"):
        with pytest.raises(ConfigError, match="parameter budget"):
            parse_count(bad)
    with pytest.raises(ConfigError, match="complexity"):
        suggest(tiny_llama(), "medium")
    with pytest.raises(ConfigError, match="goal"):
        suggest(tiny_llama(), goal="speed")


# --- CLI -------------------------------------------------------------------------------------------------

def parser():
    from lorafit.cli.advise import add_parsers as add_guidance_parsers

    p = argparse.ArgumentParser()
    add_guidance_parsers(p.add_subparsers(dest="command"))
    return p


def test_cli_suggest_writes_a_train_config(tmp_path, capsys):
    import yaml

    from lorafit.cli.common import read_yaml
    from lorafit.train import TrainConfig

    model_dir = tmp_path / "m"
    tiny_llama().config.save_pretrained(model_dir)
    out = tmp_path / "cfg.yaml"
    args = parser().parse_args(["suggest", "--model", str(model_dir), "--complexity", "complex", "--goal",
                                "efficiency", "--memory-budget", "4GB", "--output", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "r=16" in text and "target_modules=q_proj, v_proj" in text and "fits:" in text
    cfg = TrainConfig.from_dict(read_yaml(str(out)))  # exactly what `lorafit train --config` does
    assert cfg.lora.r == 16 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.model == str(model_dir)
    assert yaml.safe_load(out.read_text())["lora"]["lora_alpha"] == 16
    assert cfg.lr == learning_rate(tiny_llama()) and "lr=" in text
    assert cfg.warmup_ratio == 0.1 and cfg.schedule == "cosine" and "warmup_ratio=0.1" in text
    args = parser().parse_args(["suggest", "--model", str(model_dir), "--memory-budget", "10MB"])
    assert args.func(args) == 1  # nothing fits
    assert "NOTHING FITS" in capsys.readouterr().out


def test_cli_suggest_bad_model_folder(tmp_path):
    from lorafit import DataError

    args = parser().parse_args(["suggest", "--model", str(tmp_path)])
    with pytest.raises(DataError, match="no config.json"):
        args.func(args)


def test_both_budgets_give_q_and_v_the_rank_the_parameter_budget_allows_them():
    """The parameter budget lowers all-linear to r=1; the memory budget then moves to q, v, which afford more."""
    model = tiny_llama()
    n1 = adapter_count(model, LoraConfig(r=1, target_modules="all-linear"))
    qv4 = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    assert adapter_count(model, qv4) <= n1
    mem = total_memory(model, qv4)
    assert mem < total_memory(model, LoraConfig(r=1, target_modules="all-linear"))
    s = suggest(model, "simple", param_budget=n1, memory_budget=mem, runtime=0)
    assert s.config.target_modules == ["q_proj", "v_proj"] and s.config.r == 4 and s.fits
    assert s.trainable <= n1
