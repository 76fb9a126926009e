"""suggest on a mixture-of-experts model: 'all linear layers' includes the expert weights at r/k per expert, the
config attaches, and q,v-only advice says what it leaves out."""

from __future__ import annotations

import lorafit
from helpers import tiny_moe
from lorafit.advise.suggest import suggest


def test_quality_advice_adapts_the_experts_at_r_over_k_per_expert():
    model = tiny_moe("qwen3_moe")  # 4 experts, top 2
    s = suggest(model, "simple", goal="quality")
    cfg = s.config
    assert cfg.target_parameters == "experts" and cfg.r == 8 and not cfg.use_dora
    assert list(cfg.rank_pattern.values()) == [4]
    text = "\n".join(s.reasons)
    assert "k=2 of the 4 experts" in text and "r=4 per expert" in text
    attached = lorafit.attach(model, cfg)
    experts = [t for t in attached.lorafit_state.targets if t.kind == "param"]
    assert len(experts) == 4 and {t.r for t in experts} == {4}
    assert s.trainable == sum(p.numel() for p in attached.parameters() if p.requires_grad)


def test_complex_tasks_and_budgets_and_efficiency_on_experts():
    model = tiny_moe("mixtral")
    cfg = suggest(model, "complex", goal="quality").config
    assert (cfg.r, cfg.target_parameters, list(cfg.rank_pattern.values()), cfg.use_dora) == (32, "experts", [16], False)
    lorafit.attach(tiny_moe("mixtral"), cfg)
    tight = suggest(model, "complex", goal="quality", param_budget="2k")  # the budget leaves q, v (with DoRA)
    assert tight.config.target_parameters is None and tight.config.use_dora
    assert any("not adapted" in line and "parameter budget" in line for line in tight.reasons)
    s = suggest(model, "simple", goal="efficiency")
    assert s.config.target_parameters is None
    assert any("expert weights" in line and "not adapted" in line for line in s.reasons)


def test_a_dense_model_gets_no_expert_advice():
    from helpers import tiny_llama

    s = suggest(tiny_llama(), "simple", goal="quality")
    assert s.config.target_parameters is None and not any("expert" in line for line in s.reasons)


def test_tune_space_switches_the_experts_on_and_off():
    optuna = __import__("pytest").importorskip("optuna")
    from lorafit.advise.space import Space, parse_space, sample, trial_label, trial_lora

    model = tiny_moe("qwen3_moe")
    on = trial_lora(model, {"r": 8, "targets": "qv", "alpha": 16, "rslora": False, "dora": True, "experts": True})
    assert on.target_parameters == "experts" and not on.use_dora and list(on.rank_pattern.values()) == [4]
    assert "experts" in trial_label({"r": 8, "targets": "qv", "alpha": 16, "experts": True, "lr": 1e-3})
    off = trial_lora(model, {"r": 8, "targets": "qv", "alpha": 16, "rslora": False, "dora": True})
    assert off.target_parameters is None and off.use_dora
    assert parse_space({"experts": [True]}).experts == (True,)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        point = sample(study.ask(), Space(lr=(1e-4, 1e-2)))
        seen.add(bool(point.get("experts")))
        assert not (point.get("experts") and point["dora"])
    assert seen == {False, True}
    assert "experts" not in sample(study.ask(), Space(lr=(1e-4, 1e-2), experts=(False,)))
