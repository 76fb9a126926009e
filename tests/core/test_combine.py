"""lorafit.combine against PEFT's add_weighted_adapter on the same adapters, method by method.

Each case builds the same random adapters (non-zero A and B) in lorafit and in PEFT, combines them with the same
weights, and compares the new adapter's ΔW = s·B·A per module and the logits with it active.

Tolerance: RTOL = 1e-5 of the largest |value|, tensor by tensor (``close_to_scale``). Both libraries do the same
float32 operations in the same order, so the deltas agree bit for bit on this machine (the svd methods included:
the same ``torch.linalg.svd`` call on the same matrix); the logits differ by < 1e-6 relative (matmul kernels over
differently laid-out factors). The DARE methods are compared with PEFT on the same Bernoulli draws (PEFT's global
``torch.bernoulli`` fed from a generator with our seed), and checked statistically: over N seeds the mean ΔW of
``dare_linear`` is ``linear``'s within 5 standard errors per entry.
"""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch

import lorafit
from helpers import MODELS, close_to_scale, example_input, run
from lorafit import ops
from lorafit.combine import METHODS, merge
from lorafit.model import state_of
from lorafit.peft_format import adapter_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine

RTOL = 1e-5  # float32 (eps 1.2e-7): ~80 ulps of the largest |value|

# three adapters with one rank and different scales and targets (v_proj: all three; o_proj, up_proj: one each)
SAME_RANK = {
    "math": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "code": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "chat": dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"], alpha_pattern={"v_proj": 2}),
}
WEIGHTS = {"math": 0.7, "code": -0.4, "chat": 1.3}  # a negative weight subtracts (PEFT allows it)
MIXED_RANKS = {
    "math": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "code": dict(r=6, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 3}),
}


def build(kind: str, specs: dict, seed: int = 5):
    """(base, lorafit model, PEFT model) holding the same random adapters ``specs`` (name -> LoraConfig kwargs)."""
    base = MODELS[kind]()
    torch.manual_seed(seed)
    ours, ref = copy.deepcopy(base), None
    for name, kw in specs.items():
        lorafit.attach(ours, lorafit.LoraConfig(**kw, init_lora_weights=False), name=name)  # random A and B
        if ref is None:
            ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=name)
        else:
            ref.add_adapter(name, peft.LoraConfig(**kw))
        loaded = peft.set_peft_model_state_dict(ref, adapter_state_dict(ours, name), adapter_name=name)
        assert not loaded.unexpected_keys
    return base, ours.eval(), ref.eval()


def our_deltas(model, name: str) -> dict[str, torch.Tensor]:
    """s·B·A of adapter ``name`` per module, in the layer's weight layout (PEFT's get_delta_weight layout)."""
    return {n: ops.delta_weight(layer.adapters[name].lora_A, layer.adapters[name].lora_B,
                                layer.adapters[name].scaling, layer.kind, layer.weight.shape).detach()
            for n, layer in lorafit.adapter_layers(model) if name in layer.adapters}


def peft_deltas(ref, names) -> dict[str, torch.Tensor]:
    return {n: ref.get_submodule("base_model.model." + n).get_delta_weight("mix").detach() for n in names}


def peft_combine(ref, weights, method, **kw):
    ref.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=method, **kw)


def compare(base, ours, ref, kind: str) -> None:
    """The new adapter "mix": same modules, same ΔW per module, same logits when active (RTOL)."""
    got = our_deltas(ours, "mix")
    close_to_scale(got, peft_deltas(ref, got), rtol=RTOL)  # each module at its own scale
    lorafit.set_active(ours, "mix")
    ref.set_adapter("mix")
    x = example_input(kind)
    logits = run(ours, x)
    close_to_scale(logits, run(ref, x), rtol=RTOL)
    assert (logits - run(base, x)).abs().max() > 1e-3  # the combination really changes the model


DETERMINISTIC = {  # case: (method, options)
    "linear": ("linear", {}),
    "cat": ("cat", {}),
    "svd": ("svd", {}),
    "svd_rank_clamp": ("svd", dict(svd_rank=3, svd_clamp=0.9)),
    "svd_reduced": ("svd", dict(svd_rank=2, svd_full_matrices=False)),
    "ties": ("ties", dict(density=0.5)),
    "ties_frequency": ("ties", dict(density=0.4, majority_sign_method="frequency")),
    "ties_svd": ("ties_svd", dict(density=0.5)),
    "magnitude_prune": ("magnitude_prune", dict(density=0.3)),
    "magnitude_prune_svd": ("magnitude_prune_svd", dict(density=0.6, svd_rank=5)),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_same_delta_and_logits_as_peft(case):
    method, kw = DETERMINISTIC[case]
    base, ours, ref = build("llama", SAME_RANK)
    lorafit.combine(ours, WEIGHTS, method, name="mix", **kw)
    peft_combine(ref, WEIGHTS, method, **kw)
    assert sorted(n for n, _ in lorafit.adapter_layers(ours) if n) == sorted(our_deltas(ours, "mix"))  # the union
    compare(base, ours, ref, "llama")


@pytest.mark.parametrize("method,kw", [("cat", {}), ("svd", {}), ("svd", dict(svd_rank=4, svd_clamp=0.95)),
                                       ("ties_svd", dict(density=0.5)), ("dare_linear_svd", dict(density=0.7))])
def test_different_ranks_as_peft(method, kw, monkeypatch):
    base, ours, ref = build("llama", MIXED_RANKS)
    weights = {"math": 1.5, "code": 0.5}
    lorafit.combine(ours, weights, method, name="mix", seed=3, **kw)
    with_our_draws(monkeypatch, seed=3)
    peft_combine(ref, weights, method, **kw)
    compare(base, ours, ref, "llama")
    layer = dict(lorafit.adapter_layers(ours))["model.layers.0.self_attn.v_proj"]
    want = {"cat": 2 + 6, "svd": kw.get("svd_rank", 6)}.get(method, 6)  # PEFT's: Σ r_i, svd_rank or max r_i
    assert layer.adapters["mix"].r == want and layer.adapters["mix"].scaling == 1.0


@pytest.mark.parametrize("kind,targets", [("gpt2", ["c_attn", "wte"]), ("cnn", ["conv1", "conv2", "conv1d", "fc"])])
@pytest.mark.parametrize("method,kw", [("linear", {}), ("cat", {}), ("svd", dict(svd_rank=3)),
                                       ("ties", dict(density=0.5))])
def test_other_layer_kinds_as_peft(kind, targets, method, kw):
    """Conv1D (fan_in_fan_out), embeddings (lora_embedding_A/B) and convolutions (A (r, in, k, k), B (out, r, 1, 1))."""
    if method == "svd" and kind == "cnn":
        targets = ["conv1", "conv2", "fc"]  # PEFT 0.21 cannot SVD a Conv1d update (test_svd_of_a_conv1d)
    specs = {"math": dict(r=2, lora_alpha=4, target_modules=targets), "code": dict(r=2, lora_alpha=8,
                                                                                 target_modules=targets)}
    base, ours, ref = build(kind, specs)
    weights = {"math": 0.6, "code": 0.8}
    lorafit.combine(ours, weights, method, name="mix", **kw)
    peft_combine(ref, weights, method, **kw)
    compare(base, ours, ref, kind)


def test_svd_of_a_conv1d():
    """PEFT 0.21 SVDs a Conv1d's (out, in, k) update as a batch and fails; lorafit SVDs its (out, in·k) matrix.
    At full rank the result is the merged update itself."""
    specs = {"math": dict(r=2, target_modules=["conv1d"]), "code": dict(r=3, target_modules=["conv1d"])}
    _, ours, _ = build("cnn", specs)
    lorafit.combine(ours, {"math": 0.5, "code": 2.0}, "svd", name="mix", svd_rank=5)
    d = our_deltas(ours, "math")["conv1d"] * 0.5 + our_deltas(ours, "code")["conv1d"] * 2.0
    close_to_scale(our_deltas(ours, "mix")["conv1d"], d, rtol=RTOL)


@pytest.mark.parametrize("method,sign", [("linear", "total"), ("magnitude_prune", "total"), ("ties", "total"),
                                         ("ties", "frequency")])
def test_merge_is_peft_merge_utils(method, sign):
    """The pure merges against peft.utils.merge_utils on the same tensors (with ties in |t| and zeros)."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 7, generator=g).round(decimals=1) for _ in range(3)]  # (5, 7) each
    w = torch.tensor([0.5, -1.0, 2.0])
    got = merge(tensors, w, METHODS[method], density=0.4, sign_method=sign)
    want = {"linear": lambda: merge_utils.task_arithmetic(tensors, w),
            "magnitude_prune": lambda: merge_utils.magnitude_prune(tensors, w, 0.4),
            "ties": lambda: merge_utils.ties(tensors, w, 0.4, sign)}[method]()
    assert torch.equal(got, want)


# --- DARE: random ------------------------------------------------------------------------------------------------


def with_our_draws(monkeypatch, *, seed: int) -> None:
    """PEFT draws DARE's masks with the global torch.bernoulli; feed it from a generator seeded as ours."""
    g, bernoulli = torch.Generator().manual_seed(seed), torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **kw: bernoulli(p, *a, generator=kw.pop("generator", g),
                                                                            **kw))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_same_as_peft_on_the_same_draws(method, monkeypatch):
    base, ours, ref = build("llama", SAME_RANK)
    state = torch.get_rng_state()
    lorafit.combine(ours, WEIGHTS, method, name="mix", density=0.5, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    with_our_draws(monkeypatch, seed=11)
    peft_combine(ref, WEIGHTS, method, density=0.5)
    compare(base, ours, ref, "llama")


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties_svd"])
def test_dare_seed_reproduces(method):
    _, ours, _ = build("llama", SAME_RANK)
    for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)):
        lorafit.combine(ours, WEIGHTS, method, name=name, density=0.5, seed=seed)
    one, again, two = (our_deltas(ours, n) for n in ("s1", "s1b", "s2"))
    assert all(torch.equal(one[n], again[n]) for n in one)
    assert all(not torch.equal(one[n], two[n]) for n in one)


def test_dare_linear_is_linear_on_average():
    """DARE's rescaled drop is unbiased and A's and B's masks are independent, so E[B'·A'] = E[B']·E[A'] is
    linear's B'·A'. Over N = 1000 seeds every entry's mean is within 5 standard errors of it (1,536 entries: a
    Gaussian excursion past 5σ has probability ~1e-3 among them; the seeds are fixed, so the test is too)."""
    specs = {"math": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
             "code": dict(r=4, lora_alpha=16, target_modules=["fc1", "fc2"])}
    _, ours, _ = build("mlp", specs)
    weights = {"math": 0.7, "code": 0.5}
    flat = lambda name: torch.cat([d.flatten() for d in our_deltas(ours, name).values()]).double()  # noqa: E731
    lorafit.combine(ours, weights, "linear", name="lin")
    want, samples, n = flat("lin"), [], 1000
    for seed in range(n):
        lorafit.combine(ours, weights, "dare_linear", name="mix", density=0.5, seed=seed)
        samples.append(flat("mix"))
        lorafit.delete(ours, "mix")
    S = torch.stack(samples)  # (N, entries)
    z = (S.mean(0) - want) / (S.std(0) / math.sqrt(n))
    assert z.abs().max() < 5, z.abs().max()
    assert 0.7 < (z ** 2).mean() < 1.3  # the errors are the sampling noise, not a bias


def test_dare_at_density_one_is_unpruned():
    """Density 1 keeps everything: dare_linear is linear and dare_ties is ties, exactly."""
    _, ours, _ = build("llama", SAME_RANK)
    for method in ("linear", "dare_linear", "ties", "dare_ties"):
        lorafit.combine(ours, WEIGHTS, method, name=method, density=1.0, seed=0)
    for plain, dare in (("linear", "dare_linear"), ("ties", "dare_ties")):
        want, got = our_deltas(ours, plain), our_deltas(ours, dare)
        assert all(torch.equal(got[n], want[n]) for n in want)


# --- semantics ---------------------------------------------------------------------------------------------------


def test_cat_is_exact_and_the_new_adapter_is_inactive_with_scale_one():
    _, ours, _ = build("llama", SAME_RANK)
    lorafit.set_active(ours, "math")
    lorafit.combine(ours, WEIGHTS, "cat", name="mix")
    assert lorafit.adapters(ours) == ["math", "code", "chat", "mix"]
    assert state_of(ours).active == ["math"]
    config = state_of(ours).adapters["mix"].config
    assert (config.r, config.lora_alpha, config.use_rslora) == (12, 12, False)
    got, parts = our_deltas(ours, "mix"), {n: our_deltas(ours, n) for n in WEIGHTS}
    for module, delta in got.items():  # B'·A' = Σ w_i s_i B_i A_i
        want = sum(w * parts[n][module] for n, w in WEIGHTS.items() if module in parts[n])
        close_to_scale(delta, want, rtol=RTOL)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".adapters.mix." in n)


def test_one_adapter_is_combined_linearly_as_peft():
    """As PEFT: with one adapter every method is linear, so the result is w·s·B·A exactly (density not needed)."""
    base, ours, ref = build("llama", SAME_RANK)
    lorafit.combine(ours, {"code": 0.25}, "ties", name="mix")
    peft_combine(ref, {"code": 0.25}, "ties")
    compare(base, ours, ref, "llama")
    close_to_scale(our_deltas(ours, "mix"), {n: 0.25 * d for n, d in our_deltas(ours, "code").items()}, rtol=RTOL)


def test_rslora_adapters_get_scale_one():
    """The new adapter of RSLoRA adapters has s = 1: its factors already hold w_i·s_i, so its ΔW is B·A. PEFT up to
    0.21 copied use_rslora to the new adapter (s = r/√r = √r = 2 here, on the same factors); PEFT 0.22 sets it to
    False, so that its s is 1 too and its ΔW is lorafit's. Either way lorafit's ΔW is PEFT's factors' B·A."""
    specs = {n: dict(kw, use_rslora=True) for n, kw in SAME_RANK.items()}
    _, ours, ref = build("llama", specs)
    lorafit.combine(ours, WEIGHTS, "linear", name="mix")
    peft_combine(ref, WEIGHTS, "linear")
    got = our_deltas(ours, "mix")
    old_peft = tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22)
    for n, delta in got.items():
        m = ref.get_submodule("base_model.model." + n)
        assert ours.get_submodule(n).adapters["mix"].scaling == 1.0
        close_to_scale(delta, m.lora_B["mix"].weight @ m.lora_A["mix"].weight, rtol=RTOL)
        assert m.scaling["mix"] == (2.0 if old_peft else 1.0), (peft.__version__, m.scaling["mix"])  # √4 or 1
    if not old_peft:
        close_to_scale(got, peft_deltas(ref, got), rtol=RTOL)  # and PEFT's own ΔW equals it


# --- bad input: a clear error, the model unchanged ---------------------------------------------------------------


@pytest.fixture
def model():
    return build("llama", dict(SAME_RANK, wide=dict(r=8, target_modules=["q_proj"])))[1]


def refused(model, error, match, weights, method="linear", **kw):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names, active = lorafit.adapters(model), list(state_of(model).active)
    with pytest.raises(error, match=match):
        lorafit.combine(model, weights, method, **{"name": "mix", **kw})
    after = model.state_dict()
    assert lorafit.adapters(model) == names and state_of(model).active == active
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_unknown_adapter_lists_the_known_ones(model):
    refused(model, lorafit.AdapterError, r"no adapter named 'maths'.*\['math', 'code', 'chat', 'wide'\]",
            {"math": 0.5, "maths": 0.5})


def test_taken_name(model):
    refused(model, lorafit.AdapterError, "already has an adapter named 'code'", WEIGHTS, name="code")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None])
def test_weight_not_a_finite_number_names_the_adapter(model, bad):
    refused(model, lorafit.ConfigError, "weight of adapter 'code'", {"math": 0.5, "code": bad})


@pytest.mark.parametrize("weights", [{}, ["math", "code"]])
def test_no_weights(model, weights):
    refused(model, lorafit.ConfigError, "weights", weights)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "magnitude_prune"])
def test_unequal_ranks_for_a_factor_method_say_the_ranks(model, method):
    refused(model, lorafit.AdapterError, r"model.layers.0.self_attn.q_proj has 'math' r=4, 'wide' r=8.*'cat'",
            {"math": 0.5, "wide": 0.5}, method, density=0.5)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, math.nan, True])
def test_density_outside_zero_one(model, density):
    refused(model, lorafit.ConfigError, r"density=.* must be in \(0, 1\]", WEIGHTS, "ties", density=density)


@pytest.mark.parametrize("method", ["ties", "ties_svd", "dare_linear", "dare_ties_svd", "magnitude_prune"])
def test_density_missing_where_the_method_prunes(model, method):
    refused(model, lorafit.ConfigError, f"method '{method}' prunes; give density", WEIGHTS, method)


def test_unknown_method_lists_the_methods(model):
    refused(model, lorafit.ConfigError, "unknown method 'mean'; methods: linear, ties, .*magnitude_prune_svd",
            WEIGHTS, "mean")


@pytest.mark.parametrize("kw,match", [(dict(svd_rank=0), "svd_rank=0"), (dict(svd_clamp=1.5), "svd_clamp=1.5"),
                                      (dict(majority_sign_method="mean"), "majority_sign_method='mean'"),
                                      (dict(seed=1.5), "seed=1.5"), (dict(svd_full_matrices=None), "full_matrices")])
def test_bad_extras(model, kw, match):
    refused(model, lorafit.ConfigError, match, WEIGHTS, "svd", **kw)


def test_dora_adapters_are_refused():
    _, ours, _ = build("llama", {"math": dict(SAME_RANK["math"]),
                                 "code": dict(SAME_RANK["code"], use_dora=True)})
    refused(ours, lorafit.AdapterError, "adapter 'code' is a DoRA adapter", {"math": 0.5, "code": 0.5})


def test_different_targets_are_combined_module_by_module_as_peft():
    """No method needs the same targets (PEFT's neither): a module merges the adapters it has, which in every
    method equals a zero update for the others. o_proj has only 'code', so there linear gives w·s·B·A exactly."""
    _, ours, _ = build("llama", SAME_RANK)
    lorafit.combine(ours, WEIGHTS, "linear", name="mix")
    got, code = our_deltas(ours, "mix"), our_deltas(ours, "code")
    o = "model.layers.1.self_attn.o_proj"
    close_to_scale(got[o], WEIGHTS["code"] * code[o], rtol=RTOL)
    assert {n for n in got if n.endswith("up_proj")} == {f"model.layers.{i}.mlp.up_proj" for i in (0, 1)}
