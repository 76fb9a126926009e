"""LoRA on mixture-of-experts weights (``LoraConfig.target_parameters``) against PEFT's ``ParamWrapper``, on tiny random
Qwen3-MoE, Mixtral and gpt-oss models built with transformers' own classes: logits and gradients both ways through
the files, merge, training, named adapters, the fast path without host reads, and the refused inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorafit
from helpers import counted_reads, tiny_llama, tiny_moe
from lorafit import experts
from lorafit.errors import AdapterError, ConfigError

peft = pytest.importorskip("peft")

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOL = dict(rtol=1e-4, atol=1e-6)  # float32 rounding of logits and gradients of magnitude ~1e-1..1e-3


def ids(seed: int = 0, shape=(2, 9)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def config(**kw):
    kw = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": EXPERT_WEIGHTS,
          "init_lora_weights": False, **kw}
    return lorafit.LoraConfig(**kw)


def loss_and_grads(model, batch):
    model.train()
    logits = model(batch).logits
    logits.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def peft_pairs(model, pm):
    """(lorafit gradient, PEFT gradient) of every factor, matched through PEFT's file keys."""
    from lorafit.peft_format import adapter_parameters

    mine = adapter_parameters(model)
    theirs = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            theirs[n.replace(".default", "")] = p
    return [(p.grad, theirs[key].grad) for key, p in mine.items()]


@pytest.mark.parametrize("family", FAMILIES)
def test_lorafit_adapter_in_peft_gives_the_same_logits_and_gradients(family, tmp_path):
    base = tiny_moe(family)
    ref = copy.deepcopy(base)
    model = lorafit.attach(base, config())
    logits, _ = loss_and_grads(model, ids())
    lorafit.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(f"model.layers.{i}.{w}" for i in range(2) for w in EXPERT_WEIGHTS)
    assert saved["target_modules"] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    pm = peft.PeftModel.from_pretrained(ref, tmp_path, is_trainable=True)
    want, _ = loss_and_grads(pm, ids())
    torch.testing.assert_close(logits, want, **TOL)
    with lorafit.disabled(model):
        assert (model(ids()).logits - logits).abs().max() > 1e-3  # the expert adapters do change the output
    pairs = peft_pairs(model, pm)
    assert len(pairs) == 12  # q_proj and the two expert weights, A and B, in two layers
    for got, exp in pairs:
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_into_lorafit_with_the_same_logits_and_gradients(family, tmp_path):
    base = tiny_moe(family)
    ref = copy.deepcopy(base)
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_WEIGHTS)
    pm = peft.get_peft_model(ref, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path)
    want, _ = loss_and_grads(pm, ids(1))
    model = lorafit.load(base, tmp_path)
    logits, _ = loss_and_grads(model, ids(1))
    torch.testing.assert_close(logits, want, **TOL)
    for got, exp in peft_pairs(model, pm):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fast_path_runs_with_no_host_read(family, monkeypatch):
    model = lorafit.attach(tiny_moe(family), config(target_modules=[]))
    calls = []
    fast = experts._fast
    monkeypatch.setattr(experts, "_fast", lambda *a, **k: calls.append(1) or fast(*a, **k))
    reads: list = []
    step = counted_reads(lambda: model(ids()).logits.pow(2).mean().backward(), reads)
    model.train()
    step()
    assert len(calls) == 2  # one per MoE layer
    assert not reads[0], f"host reads in the experts' forward/backward: {reads[0]}"


def test_bfloat16_base_is_close_to_peft(tmp_path):
    base = tiny_moe("qwen3_moe").to(torch.bfloat16)
    ref = copy.deepcopy(base)
    model = lorafit.attach(base, config(target_modules=[]))
    assert model.model.layers[0].mlp.experts.lora_gate_up_proj.lora_A.dtype == torch.float32
    lorafit.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(ref, tmp_path)
    model.eval()
    with torch.no_grad():
        # PEFT adds ΔW to W in bfloat16; lorafit adds s·B·A·x in float32: bf16 rounding of logits ~0.5
        torch.testing.assert_close(model(ids()).logits.float(), pm(ids()).logits.float(), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_the_logits_and_restores_the_experts_module(family):
    model = lorafit.attach(tiny_moe(family), config()).eval()
    with torch.no_grad():
        want = model(ids()).logits
        lorafit.merge(model)
        got = model(ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    block = model.model.layers[0].mlp.experts
    assert not experts.param_layers(block) and "forward" not in block.__dict__
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_only_the_adapters_and_lowers_the_loss(family):
    torch.manual_seed(0)
    model = lorafit.attach(tiny_moe(family), config(init_lora_weights=True, lora_alpha=8, r=4))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "adapters" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids(3, (4, 12))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    b = model.model.layers[0].mlp.experts.lora_gate_up_proj.adapters["default"].lora_B
    assert b.abs().sum() > 0  # B started at zero and moved


def test_named_adapters_switch_disable_and_delete():
    model = lorafit.attach(tiny_moe("qwen3_moe"), config()).eval()
    lorafit.attach(model, config(r=3, lora_alpha=3), name="other")
    with torch.no_grad():
        first = model(ids()).logits
        lorafit.set_active(model, "other")
        second = model(ids()).logits
        with lorafit.disabled(model):
            plain = model(ids()).logits
        assert (first - second).abs().max() > 1e-3 and (second - plain).abs().max() > 1e-3
        lorafit.delete(model, "other")
        lorafit.set_active(model, "default")
        torch.testing.assert_close(model(ids()).logits, first, rtol=0, atol=0)
        lorafit.delete(model, "default")
        torch.testing.assert_close(model(ids()).logits, plain, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.model.layers[0].mlp.experts.__dict__


def test_two_active_adapters_add_up_as_in_peft():
    model = lorafit.attach(tiny_moe("mixtral"), config(target_modules=[])).eval()
    lorafit.attach(model, config(target_modules=[], r=3), name="b")
    with torch.no_grad():
        lorafit.set_active(model, ["default", "b"])
        both = model(ids()).logits
        merged = copy.deepcopy(model)
        lorafit.merge(merged, ["default", "b"])
        torch.testing.assert_close(merged(ids()).logits, both, rtol=1e-4, atol=1e-5)


def test_rank_and_alpha_patterns_reach_expert_weights(tmp_path):
    cfg = config(rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 2})
    model = lorafit.attach(tiny_moe("qwen3_moe"), cfg)
    down = model.model.layers[1].mlp.experts.lora_down_proj.adapter
    assert (down.r, down.alpha, tuple(down.lora_A.shape)) == (4, 2, (16, 16))
    lorafit.save(model, tmp_path)
    again = lorafit.load(tiny_moe("qwen3_moe"), tmp_path)
    assert again.model.layers[1].mlp.experts.lora_down_proj.adapter.r == 4


def test_experts_shorthand_and_all_linear_keep_peft_meanings():
    model = lorafit.attach(tiny_moe("gpt_oss"), config(target_modules="all-linear", target_parameters="experts"))
    names = [t.name for t in model.lorafit_state.targets if t.kind == "param"]
    assert names == [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    # all-linear is PEFT's: nn.Linear layers only (the router of gpt-oss is one), never the expert stacks
    linear = {t.name.rsplit(".", 1)[-1] for t in model.lorafit_state.targets if t.kind != "param"}
    assert linear == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("kw, match", [
    (dict(target_parameters=["mlp.experts.gate_proj"]), "matches no parameter.*gate_up_proj"),
    (dict(target_parameters=["input_layernorm.weight"]), "1D parameter"),
    (dict(target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]), "already adapts"),
    (dict(lora_dropout=0.1), "no dropout"),
    (dict(use_dora=True), "DoRA is not supported"),
    (dict(init_lora_weights="pissa"), "weight-based init"),
], ids=["no match", "1D", "module already adapted", "dropout", "dora", "pissa"])
def test_bad_expert_targets_are_refused_and_the_model_is_unchanged(kw, match):
    model = tiny_moe("qwen3_moe")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=match):
        lorafit.attach(model, config(**kw))
    assert [n for n, _ in model.named_modules()] == before and not lorafit.adapters(model)


def test_module_and_parameter_adapters_of_one_module_are_refused_in_either_order():
    model = lorafit.attach(tiny_moe("qwen3_moe"), config(target_modules=["q_proj"], target_parameters=None))
    with pytest.raises(ConfigError, match="already adapts"):
        lorafit.attach(model, config(target_modules=[], target_parameters=["self_attn.q_proj.weight"]), name="b")
    other = lorafit.attach(tiny_moe("qwen3_moe"), config(target_modules=[], target_parameters=["o_proj.weight"]))
    with pytest.raises(ConfigError, match="has its parameter 'weight' adapted by another adapter"):
        lorafit.attach(other, config(target_modules=["o_proj"], target_parameters=None), name="b")
    assert lorafit.adapters(model) == ["default"] and lorafit.adapters(other) == ["default"]


def test_an_empty_parameter_list_means_none_as_in_peft_and_the_model_itself_is_refused():
    assert lorafit.LoraConfig(target_modules=["q"], target_parameters=[]).target_parameters is None
    with pytest.raises(ConfigError, match="a parameter of the model itself"):
        lorafit.attach(Inner(), lorafit.LoraConfig(target_modules=[], target_parameters=["w"]))


def test_an_expert_adapter_on_a_model_without_experts_is_refused(tmp_path):
    model = lorafit.attach(tiny_moe("qwen3_moe"), config())
    lorafit.save(model, tmp_path)
    dense = tiny_llama()
    with pytest.raises(AdapterError, match="does not fit this model.*target_parameters"):
        lorafit.load(dense, tmp_path)
    assert not lorafit.adapters(dense)


def test_per_row_and_combine_refuse_expert_adapters():
    model = lorafit.attach(tiny_moe("qwen3_moe"), config()).eval()
    with pytest.raises(AdapterError, match="per_row does not route"):
        with lorafit.per_row(model, ["default", None]):
            pass
    # rows of an adapter without expert weights see the base experts, whatever else is active
    lorafit.attach(model, config(target_parameters=None), name="attn")
    with torch.no_grad():
        lorafit.set_active(model, "attn")
        want = model(ids()).logits
        lorafit.set_active(model, "default")
        with lorafit.per_row(model, ["attn", "attn"]):
            got = model(ids()).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert model(ids()).logits.sub(want).abs().max() > 1e-4  # default's experts are back after the context
    with pytest.raises(AdapterError, match="combine does not combine"):
        lorafit.combine(model, {"default": 1.0}, name="c")


class Inner(torch.nn.Module):
    """A module that uses its 2D and 3D parameters directly (no nn.Linear): the general path's case."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 5) / 3)
        self.stack = torch.nn.Parameter(torch.randn(2, 4, 6) / 3)  # (E, out, in)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.w)  # (..., 6)
        return torch.einsum("eoi,bi->beo", self.stack, h).sum(1)


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.inner(x))


def test_parameters_of_other_modules_take_the_general_path_equal_to_peft(tmp_path):
    torch.manual_seed(0)
    base = Outer()
    ref = copy.deepcopy(base)
    model = lorafit.attach(base, lorafit.LoraConfig(r=2, target_modules=[], target_parameters=["w", "stack"],
                                                    init_lora_weights=False))
    x = torch.randn(7, 5)
    out = model(x)
    out.pow(2).sum().backward()
    lorafit.save(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(ref, tmp_path, is_trainable=True)
    want = pm(x)
    want.pow(2).sum().backward()
    torch.testing.assert_close(out, want, **TOL)
    with lorafit.disabled(model):
        assert (model(x) - out).abs().max() > 1e-3
    for got, exp in peft_pairs(model, pm):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-7)
    merged = lorafit.merge(model)
    torch.testing.assert_close(merged(x), out, rtol=1e-4, atol=1e-6)


def test_the_fast_path_runs_on_the_meta_device(monkeypatch):
    """Every tensor the fast path makes follows the model (a CPU tensor would fail the op it meets on ``meta``) and
    nothing is read back (a meta tensor cannot be read). Meta's grouped_mm takes bfloat16 only, as CUDA's fast
    kernel: the whole model, adapter included, is cast to it here."""
    model = lorafit.attach(tiny_moe("qwen3_moe"), config(target_modules=[]))
    model = model.to(torch.bfloat16).to("meta").train()
    calls = []
    fast = experts._fast
    monkeypatch.setattr(experts, "_fast", lambda *a, **k: calls.append(1) or fast(*a, **k))
    model(torch.zeros(2, 9, dtype=torch.long, device="meta")).logits.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(calls) == 2 and len(grads) == 8 and all(g.device.type == "meta" for g in grads)


def test_inspect_reads_expert_weights_per_expert(tmp_path):
    from lorafit.advise.adapter_summary import adapter_modules

    model = lorafit.attach(tiny_moe("gpt_oss"), config(rank_pattern={"down_proj": 3}))
    lorafit.save(model, tmp_path)
    _, rows = adapter_modules(tmp_path)
    rows = {r["name"]: r for r in rows}
    for i in range(2):
        block = model.model.layers[i].mlp.experts
        for leaf in ("gate_up_proj", "down_proj"):
            layer = experts.param_layers(block)[leaf]
            row = rows[f"model.layers.{i}.mlp.experts.{leaf}"]
            e, n_in, n_out = layer.n_experts, layer.in_features, layer.out_features
            assert (row["r"], row["shape"], row["kind"]) == (layer.adapter.r, (e, n_out, n_in), "experts")
            assert row["delta_norm"] == pytest.approx(layer.delta(layer.adapter).norm().item(), rel=1e-5)


def test_a_device_without_grouped_mm_takes_the_general_path(monkeypatch):
    """MPS has no grouped_mm kernel: there the experts take W + ΔW (PEFT's arithmetic), the same function."""
    model = lorafit.attach(tiny_moe("qwen3_moe"), config()).eval()
    with torch.no_grad():
        fast = model(ids()).logits
        monkeypatch.setattr(experts, "GROUPED_MM_DEVICES", ("cuda",))  # the CPU plays a device without the kernel
        monkeypatch.setattr(experts, "_fast", lambda *a, **k: pytest.fail("the fast path ran"))
        torch.testing.assert_close(model(ids()).logits, fast, **TOL)
