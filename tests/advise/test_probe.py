"""lorafit.probe: the pure pieces, exact and sketched gradients, planted-rank teachers, the CLI.

Two planted-rank teachers:

* ``Branches``: independent linear maps on separate input/output slices, so no module can express another's update.
  Here the probe must (and does) find everything: planted modules first, their ranks within 1.5x, zero elsewhere.
* a tiny random Llama with low-rank updates planted in some attention and MLP projections, small enough that the
  teacher is in the probe's local regime (KL ≈ 0.003 nats/token). A gradient probe cannot tell modules apart that
  can express each other's update (the value and output projections of one attention block compose linearly;
  o_proj/down_proj of one layer and the next layer's projections all read and write the same residual stream):
  they share the gradient, and the fast test asserts only what holds for it (every planted module is adapted).
  The Newton probe (``newton=``: the joint Gauss-Newton step of all candidates) undoes that coupling and must
  identify exactly the planted modules and their ranks. The slow test checks what matters in practice: a student
  trained with the probed rank_pattern matches the best uniform-grid point with no more parameters.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorafit
from helpers import close, tiny_gpt2, tiny_llama
from lorafit import ConfigError, LoraConfig
from lorafit.advise.probe import (
    allocate_ranks,
    complexity_score,
    effective_rank,
    gradient_spectra,
    probe,
    probe_table,
    probed_config,
)
from lorafit.targets import select_targets

# --- pure pieces -----------------------------------------------------------------------------------------


def test_effective_rank():
    assert effective_rank(torch.ones(4)) == 4  # a flat rank-4 spectrum: 90% needs all 4 (3.6 -> 4)
    assert effective_rank(torch.tensor([3.0, 4.0, 0.0])) == 2
    assert effective_rank(torch.tensor([10.0, 1.0, 1.0])) == 1  # 100/102 >= 0.9
    assert effective_rank(torch.tensor([1.0, 1.0]), energy=0.5) == 1
    assert effective_rank(torch.zeros(5)) == 0
    assert effective_rank(torch.ones(3), total=10.0) == 3  # a sketch's top never reaches 90% of the total


def test_allocate_ranks_greedy_per_parameter():
    spectra = {"a": torch.tensor([4.0, 2.0, 1.0]), "b": torch.tensor([3.0, 3.0, 0.0])}
    costs = {"a": 10, "b": 5}
    totals = {m: float((s ** 2).sum()) for m, s in spectra.items()}
    # gains per parameter: b1 9/5=1.8, b2 1.8, a1 16/10=1.6, a2 0.4, a3 0.1
    assert allocate_ranks(spectra, costs, totals, energy=0.4) == {"a": 0, "b": 2}  # 18 of 39 >= 15.6: stop
    assert allocate_ranks(spectra, costs, totals, energy=0.6) == {"a": 1, "b": 2}
    assert allocate_ranks(spectra, costs, totals, energy=1.0) == {"a": 3, "b": 2}  # zero gains are never bought
    assert allocate_ranks(spectra, costs, totals, energy=1.0, budget=14) == {"a": 0, "b": 2}
    assert allocate_ranks(spectra, costs, totals, energy=1.0, max_rank=1) == {"a": 1, "b": 1}
    assert allocate_ranks({"z": torch.zeros(3)}, {"z": 4}, {"z": 0.0}) == {"z": 0}


def test_probed_config_keeps_one_alpha_and_resolves_per_module():
    model = tiny_llama()
    ranks = {"model.layers.0.self_attn.q_proj": 3, "model.layers.0.mlp.up_proj": 8, "model.layers.1.mlp.up_proj": 8,
             "model.layers.1.self_attn.v_proj": 0}
    cfg = probed_config(ranks)
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.rank_pattern == {r"model\.layers\.0\.self_attn\.q_proj": 3}
    assert not cfg.alpha_pattern  # the convention: one alpha at every rank (lorafit.advise.suggest.LORA_ALPHA)
    targets = select_targets(model, cfg)
    assert {t.name: t.r for t in targets} == {m: r for m, r in ranks.items() if r}
    assert all(t.alpha == 16 and t.scaling == 16 / t.r for t in targets)
    with pytest.raises(ConfigError, match="no gradient signal"):
        probed_config({"x": 0})
    assert complexity_score({"a": 4, "b": 12}, {"a": 3.0, "b": 1.0}) == 6.0


# --- gradients -------------------------------------------------------------------------------------------

def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_exact_gradient_is_the_weight_gradient_and_the_model_is_untouched(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (3, 12), generator=g)} for _ in range(2)]
    names = [t.name for t in select_targets(model, LoraConfig(target_modules="all-linear"))]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = gradient_spectra(model, batches, names, lm_loss)
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for b in batches:  # reference: autograd's weight gradients, summed over the batches
        lm_loss(model, b).backward()
    for n in names:
        w = model.get_submodule(n).weight.grad.double()
        G = w.t() if make is tiny_gpt2 else w  # Conv1D stores (in, out)
        s = torch.linalg.svdvals(G)
        # float32 gradients summed in another order, then an SVD: relative to each singular value, plus 1e-5 of the
        # largest for the small ones (which carry the error of the large terms)
        close(out[n]["s"].double(), s, rtol=1e-4, atol=1e-5 * float(s[0]))
        assert out[n]["energy"] == pytest.approx(float((G ** 2).sum()), rel=1e-4)  # the same sums, squared: relative
        assert out[n]["fisher"] == 1.0  # no logits_fn: no curvature


class Branches(nn.Module):
    """Independent linear maps y_m = W_m·x_m on separate slices of the input and the output."""

    def __init__(self, sizes: dict[str, tuple[int, int]]):
        super().__init__()
        self.sizes = sizes
        self.maps = nn.ModuleDict({m: nn.Linear(i, o, bias=False) for m, (i, o) in sizes.items()})

    def forward(self, x):  # (N, Σ in) -> (N, Σ out)
        parts = x.split([i for i, _ in self.sizes.values()], dim=-1)
        return torch.cat([self.maps[m](p) for m, p in zip(self.sizes, parts)], dim=-1)


def plant(model: nn.Module, ranks: dict[str, int], scale, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with W += scale·U·Vᵀ (U, V orthonormal: a flat rank-r spectrum) on the named modules."""
    teacher = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, r in ranks.items():
            W = teacher.get_submodule(name).weight  # (out, in)
            U = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g)).Q
            V = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g)).Q
            W += (scale[name] if isinstance(scale, dict) else scale) * U @ V.T
    return teacher


def mse(model, batch):
    return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum(-1).mean()


def branch_setup(noise: float = 0.05):
    torch.manual_seed(0)
    sizes = {"a": (48, 48), "b": (48, 64), "c": (64, 48), "d": (48, 48), "e": (32, 64)}
    student = Branches(sizes)
    planted = {"maps.a": 4, "maps.c": 12}
    teacher = plant(student, planted, 1.0)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(8):
        x = torch.randn(256, 240, generator=g)
        with torch.no_grad():
            y = teacher(x) + noise * torch.randn(256, 272, generator=g)  # label noise: untouched gradients != 0
        batches.append({"x": x, "y": y})
    return student, planted, batches


def test_planted_ranks_in_independent_modules_are_found():
    student, planted, batches = branch_setup()
    res = probe(student, batches, loss_fn=mse, logits_fn=None)
    by_gain = sorted(res.modules, key=lambda m: -m.gain)
    assert {m.name for m in by_gain[:2]} == set(planted)  # planted modules rank first
    for m in res.modules:
        if m.name in planted:
            assert planted[m.name] / 1.5 <= m.effective_rank <= planted[m.name] * 1.5
            assert planted[m.name] / 1.5 <= m.rank <= planted[m.name] * 1.5
        else:
            assert m.rank == 0  # untouched: their noise gradients are far below the planted energy
    assert set(res.config.target_modules) == set(planted)
    assert 4 < res.score < 12 and res.complexity == "complex"  # energy-weighted: the rank-12 plant holds 3/4
    # a budget caps the adapter; what it buys is still planted directions only
    capped = probe(student, batches, loss_fn=mse, logits_fn=None, budget=4 * (48 + 48))
    assert 3 * 96 <= capped.trainable <= 4 * 96
    assert {m for m, r in capped.ranks.items() if r} <= set(planted) and "budget 384" in capped.notes[-1]


def test_sketch_matches_the_exact_spectrum_on_planted_ranks():
    student, planted, batches = branch_setup(noise=0.0)
    exact = probe(student, batches, loss_fn=mse, logits_fn=None)
    sketch = probe(student, batches, loss_fn=mse, logits_fn=None, sketch=24)
    for e, s in zip(exact.modules, sketch.modules):
        if e.name in planted:
            r = planted[e.name]
            # noise-free gradients have exactly the planted rank, inside the 24-dim sketch: only float32 rounding of
            # the sketched products is left, ~80 ulps of each singular value (~1-9)
            close(s.spectrum[:r], e.spectrum[:r], rtol=1e-5, atol=0.0)
            assert s.energy == pytest.approx(e.energy, rel=0.35)  # the total is a randomised estimate
            assert s.effective_rank == e.effective_rank
        else:
            assert e.energy == 0 and s.energy == 0
    assert sketch.ranks == exact.ranks


# --- the planted Llama teacher ---------------------------------------------------------------------------

PLANTED = {"model.layers.0.self_attn.v_proj": 4, "model.layers.1.self_attn.o_proj": 4,
           "model.layers.0.mlp.up_proj": 12, "model.layers.1.mlp.down_proj": 12}


def kl_to_teacher(model, batch):
    """KL(teacher || student) per token."""
    logp = F.log_softmax(model(input_ids=batch["input_ids"]).logits.float(), -1)  # (B, T, V)
    return F.kl_div(logp, batch["target"], log_target=True, reduction="batchmean") / batch["input_ids"].shape[1]


def all_logits(model, batch):
    out = model(input_ids=batch["input_ids"]).logits
    return out.reshape(-1, out.shape[-1])  # (B·T, V)


def teacher_batches(teacher, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 128, (16, 32), generator=g)
        with torch.no_grad():
            batches.append({"input_ids": ids, "target": F.log_softmax(teacher(input_ids=ids).logits.float(), -1)})
    return batches


def planted_llama(per_direction_kl: float = 0.01):
    """(student, teacher): a random Llama (init std 0.1, so attention and MLP both matter) and a copy with PLANTED.
    Each plant's scale gives it KL ≈ per_direction_kl·rank alone, so every planted direction weighs the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.1)
    student = LlamaForCausalLM(cfg).eval()
    scales = {}
    for name, r in PLANTED.items():  # small perturbations: KL grows as scale²
        probe_teacher = plant(student, {name: r}, 0.1)
        with torch.no_grad():
            kl = sum(float(kl_to_teacher(student, b)) for b in teacher_batches(probe_teacher, 2, 0)) / 2
        scales[name] = 0.1 * math.sqrt(per_direction_kl * r / kl)
    return student, plant(student, PLANTED, scales)


NEWTON_STEPS = 60


@pytest.fixture(scope="module")
def planted():
    """The planted teacher in the local regime (KL to the student ≈ 0.003 nats/token), probed two ways: by gradient
    spectra (one pass) and by the joint Gauss-Newton step (NEWTON_STEPS conjugate-gradient steps)."""
    student, teacher = planted_llama(per_direction_kl=1e-4)
    train = teacher_batches(teacher, 64, seed=0)
    # the probes read train[:16] as 4 batches of 64 sequences: the same tokens in a quarter of the calls (the Newton
    # probe took 41 s over 16 batches of 16, 19 s over these, 2026-12-06)
    probed = [{k: torch.cat([b[k] for b in train[i:i + 4]]) for k in train[0]} for i in range(0, 16, 4)]
    grad = probe(student, probed, loss_fn=kl_to_teacher, logits_fn=all_logits)
    newton = probe(student, probed, loss_fn=kl_to_teacher, logits_fn=all_logits, newton=NEWTON_STEPS)
    return student, teacher, train, grad, newton


def test_planted_llama_gradient_probe_adapts_every_planted_module(planted):
    """The cheap probe: coupled modules share the gradient, so it over-allocates, but never misses a plant."""
    _, _, _, res, _ = planted
    by_gain = sorted(res.modules, key=lambda m: -m.gain)
    assert by_gain[0].name in PLANTED and res.measure == "gradient"
    assert all(res.ranks[m] > 0 for m in PLANTED)
    assert "model.layers.0.mlp.up_proj" in probe_table(res)


def test_planted_llama_newton_probe_identifies_exactly_the_planted_modules(planted):
    """The acceptance check: planted modules first, their ranks within 1.5x, untouched modules near zero."""
    _, _, _, _, res = planted
    by_gain = sorted(res.modules, key=lambda m: -m.gain)
    assert {m.name for m in by_gain[:len(PLANTED)]} == set(PLANTED)
    for m in res.modules:
        if m.name in PLANTED:
            assert PLANTED[m.name] / 1.5 <= m.effective_rank <= PLANTED[m.name] * 1.5, m
            assert PLANTED[m.name] / 1.5 <= m.rank <= PLANTED[m.name] * 1.5, m
        else:
            assert m.rank <= 1, m
    assert res.measure == "newton" and "conjugate-gradient" in res.notes[0]
    assert set(res.config.target_modules) == set(PLANTED)


def test_newton_probe_needs_exact_gradients_and_logits():
    student, planted_, batches = branch_setup()
    with pytest.raises(ConfigError, match="Newton step needs"):
        probe(student, batches, loss_fn=mse, logits_fn=None, newton=5)
    with pytest.raises(ConfigError, match="Newton step needs"):
        probe(tiny_llama(), [], sketch=8, newton=5)


def train_student(student, cfg: LoraConfig, train, evals, steps: int = 300, lr: float = 1e-2) -> tuple[int, float]:
    """(trainable parameters, eval KL) of a LoRA student trained to the teacher's distributions."""
    model = copy.deepcopy(student)
    torch.manual_seed(0)
    lorafit.attach(model, cfg)
    n, _ = lorafit.trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        kl_to_teacher(model, train[step % len(train)]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return n, sum(float(kl_to_teacher(model, b)) for b in evals) / len(evals)


@pytest.mark.slow
def test_student_with_probed_ranks_matches_the_best_uniform_grid_point(planted):
    student, teacher, train, _, res = planted
    evals = teacher_batches(teacher, 8, seed=99)
    grid = {}
    for tname, targets in (("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("all-linear", "all-linear")):
        for r in (2, 4, 8, 16, 32):
            grid[f"{tname} r={r}"] = train_student(student, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
                                                   train, evals)
    n_probed, loss_probed = train_student(student, res.config, train, evals)
    best = min(grid, key=lambda k: grid[k][1])
    print({"grid": grid, "probed": (n_probed, loss_probed), "best": best})
    assert loss_probed <= 1.05 * grid[best][1]
    assert n_probed <= grid[best][0]


# --- CLI -------------------------------------------------------------------------------------------------

def test_cli_probe_writes_a_trainable_config(tmp_path, capsys):
    import json

    from helpers import make_data, make_model_dir
    from lorafit.cli.advise import add_parsers as add_guidance_parsers
    from lorafit.cli.common import read_yaml
    from lorafit.hf import load_model
    from lorafit.train import TrainConfig

    model_dir, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl")
    p = argparse.ArgumentParser()
    add_guidance_parsers(p.add_subparsers(dest="command"))
    out = tmp_path / "probe"
    args = p.parse_args(["probe", "--model", str(model_dir), "--data", str(data), "--batch-size", "4",
                         "--max-length", "48", "--budget", "3k", "--output", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "complexity score" in text and "adapter parameters" in text
    assert {f.name for f in out.iterdir()} == {"probe.yaml", "probe.json", "spectra.png"}
    cfg = TrainConfig.from_dict(read_yaml(str(out / "probe.yaml")))
    assert cfg.model == str(model_dir) and cfg.data == str(data)
    report = json.loads((out / "probe.json").read_text())
    assert report["trainable"] <= 3000 and report["complexity"] in ("simple", "complex")
    model, _ = load_model(model_dir, "float32")
    ranks = {t.name: t.r for t in select_targets(model, cfg.lora)}
    assert ranks == {m["name"]: m["rank"] for m in report["modules"] if m["rank"]}
    lorafit.attach(model, cfg.lora)
    n, _ = lorafit.trainable_parameters(model)
    assert n == report["trainable"]


def test_cli_probe_newton_on_a_causal_lm(tmp_path, capsys):
    """--newton runs the Gauss-Newton step through the CLI's default loss (labelled positions of a causal LM)."""
    import json

    from helpers import make_data, make_model_dir
    from lorafit.cli.advise import add_parsers as add_guidance_parsers

    model_dir, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl")
    p = argparse.ArgumentParser()
    add_guidance_parsers(p.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        p.parse_args(["probe", "--newton", "-1"])
    assert "expected an integer >= 0" in capsys.readouterr().err
    out = tmp_path / "probe"
    args = p.parse_args(["probe", "--model", str(model_dir), "--data", str(data), "--batch-size", "4",
                         "--max-length", "48", "--batches", "2", "--newton", "3", "--output", str(out)])
    assert args.func(args) == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["measure"] == "newton" and "3 conjugate-gradient steps" in report["notes"][0]
    assert any(m["rank"] for m in report["modules"])
    bad = p.parse_args(["probe", "--model", str(model_dir), "--data", str(data), "--newton", "3", "--sketch", "8",
                        "--output", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="Newton step needs"):
        bad.func(bad)
    assert not (tmp_path / "x").exists()
