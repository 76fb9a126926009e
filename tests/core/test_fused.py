"""The fused training path (lorafit.fused) against the reference path (layers.LoraLayer's plain composition).

Both paths draw dropout masks from the same seeds, so with the same RNG state they compute the same function:
outputs, gradients (x, A, B, magnitude, bias, weight) and 10-step AdamW loss curves agree to float32 rounding,
with and without dropout, for LoRA, RSLoRA and DoRA, and under gradient checkpointing: one layer's outputs and
gradients to RTOL of each tensor's largest |value| (they are sums, whose rounding follows their largest terms),
losses to RTOL of each loss, and a whole model's first-step gradients to GRAD_RTOL of each gradient's largest
|value|; under every SIMD kernel set (ATEN_CPU_CAPABILITY=default, avx2, avx512).
"""

from __future__ import annotations

import gc
import os
import socket
from collections import Counter

import pytest
import torch
from torch import nn

import lorafit
from helpers import close, close_to_scale, max_diff, perturb_trainable, tiny_gpt2, tiny_llama
from lorafit import fused, layers, ops
from lorafit.layers import LoraLayer
from lorafit.train.distributed import Dist, leave

RTOL = 1e-5  # float32 (eps 1.2e-7): ~80 ulps, for sums over tens to a few hundred terms computed in another order
# a whole model's gradients: rounding carried back through 2 blocks (attention softmax, norms), and small tensors
# (lora_B, |grad| ~0.02) carry their inputs' error: measured up to 1.9e-5 of the largest |value|, so ~400 ulps
GRAD_RTOL = 5e-5
pytestmark = pytest.mark.usefixtures("one_thread")
MODES = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.fixture
def path(monkeypatch):
    """path(fused: bool) switches layers.FUSED for the calls that follow."""
    return lambda on: monkeypatch.setattr(layers, "FUSED", on)


# --- dropout masks --------------------------------------------------------------------------------------------

def test_keep_mask_is_a_function_of_the_seed():
    cpu = torch.device("cpu")
    a = fused.keep_mask(7, (64, 96), 0.1, cpu)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, fused.keep_mask(7, (64, 96), 0.1, cpu))
    assert not torch.equal(a, fused.keep_mask(8, (64, 96), 0.1, cpu))
    assert set(a.unique().tolist()) == {0.0, 1.0}
    dropped = 1 - fused.keep_mask(1, (1000, 1000), 0.05, cpu).mean().item()
    assert abs(dropped - 0.05) < 1e-3 and abs(fused.quantised_p(0.05) - 0.05) < 2 ** -17
    assert fused.keep_mask(2, (100, 100), 0.0, cpu).min() == 1


def _splitmix64(seed: int, i: int) -> int:
    """Word i of the SplitMix64 stream of seed (Steele, Lea & Flood 2014), in Python integers: the reference."""
    mask = (1 << 64) - 1
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_keep_bits_are_splitmix64_words_compared_with_p():
    seed, p = (1 << 62) - 12345, 0.3
    n = 4 * fused._WORDS * 2 + 10  # two full chunks and a partial third
    keep = fused.keep_bits(seed, (n,), p, torch.device("cpu"))
    t = round(p * 2 ** 16) - 2 ** 15
    # element 4w + j is the j-th little-endian 16-bit lane of word w, read as a signed integer
    for e in (0, 1, 2, 3, 4, 4 * fused._WORDS - 1, 4 * fused._WORDS, 4 * fused._WORDS + 5, n - 1):
        lane = (_splitmix64(seed, e // 4) >> (16 * (e % 4))) & 0xFFFF
        r = lane - (1 << 16) if lane >> 15 else lane
        assert bool(keep[e]) == (r >= t), e
    # the stream is uniform and its neighbours uncorrelated: drop rate and 2x2 pair frequencies of adjacent elements
    assert keep.dtype == torch.bool and keep.view(torch.uint8).max() == 1  # every byte a valid bool: 0 or 1
    k = keep.double()
    assert abs(1 - k.mean().item() - fused.quantised_p(p)) < 3e-3  # sd ~5e-4 at n = 524298
    pairs = (k[:-1] * 2 + k[1:]).long().bincount(minlength=4).double() / (n - 1)
    q = 1 - fused.quantised_p(p)
    torch.testing.assert_close(pairs, torch.tensor([(1 - q) ** 2, (1 - q) * q, q * (1 - q), q * q],
                                                   dtype=torch.float64), rtol=0, atol=4e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_masks_are_the_boolean_masks_as_zeros_and_ones(dtype):
    for shape in ((1024, 2816), (7, 13), (3, 1 << 17)):  # whole chunks, a tail shorter than one word, several chunks
        keep = fused.keep_bits(9, shape, 0.05, torch.device("cpu"))
        half = fused.keep_bits(9, shape, 0.05, torch.device("cpu"), dtype=dtype)
        assert half.dtype == dtype and torch.equal(half, keep.to(dtype))
    assert fused.mask_dtype(dtype) == dtype and fused.mask_dtype(torch.float32) == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_keep_zeroes_exactly_the_dropped_entries(dtype):
    keep = fused.keep_bits(5, (37, 53), 0.3, torch.device("cpu"))
    x = torch.randn(37, 53).to(dtype)
    before = x.clone()
    want = torch.where(keep, x, torch.zeros((), dtype=dtype))
    got = fused.apply_keep(x, keep)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(fused.apply_keep(x, keep.to(dtype)), want)  # a mask of x's own dtype (mask_dtype)
    other = fused.apply_keep(x, keep.to(torch.bfloat16))  # or of another float dtype
    assert other.dtype == dtype and torch.equal(other, want)
    assert torch.equal(x, before)  # out of place: x untouched
    assert fused.apply_keep(x, keep, out=x) is x and torch.equal(x, want)  # in place
    x = torch.ones(4, 4, dtype=dtype, requires_grad=True)  # differentiable in x (the reference path's dropout)
    fused.apply_keep(x, keep[:4, :4]).sum().backward()
    assert torch.equal(x.grad, keep[:4, :4].to(dtype))


def test_dropout_keeps_the_expectation():
    x = torch.ones(200, 500)
    y = fused.dropout(x, 3, 0.3)
    assert torch.equal(y.unique(), torch.tensor([0.0, fused.keep_scale(0.3)]))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_seed_is_shared_by_the_same_tensor_only(monkeypatch):
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    monkeypatch.setattr(fused, "SHARE_DROPOUT", True)
    s = fused.dropout_seed(x, 0.1)
    assert fused.dropout_seed(x, 0.1) == s and fused.dropout_seed(y, 0.1) != s
    monkeypatch.setattr(fused, "SHARE_DROPOUT", False)
    assert fused.dropout_seed(x, 0.1) != fused.dropout_seed(x, 0.1)
    monkeypatch.setattr(fused, "SHARE_DROPOUT", True)
    s = fused.dropout_seed(x, 0.1)
    x.add_(1)  # modified in place: a new mask
    assert fused.dropout_seed(x, 0.1) != s


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_reseeded_forwards_on_new_inputs_get_their_own_dropped_input(path, mode):
    """torch.manual_seed before each forward gives two inputs of one shape the same seed: the second forward must drop
    its own input, not reuse the first one's (forward only, as in evaluation with dropout on)."""
    layer = make_layer("linear", mode, 0.3, False)
    layer.weight.requires_grad_(False)
    xs = [torch.randn(16, 40), torch.randn(16, 40)]
    outs = {}
    for fused_path in (True, False):
        path(fused_path)
        for i, x in enumerate(xs):
            torch.manual_seed(3)
            outs[fused_path, i] = layer(x.clone()).detach()
    for i in range(2):
        torch.testing.assert_close(outs[True, i], outs[False, i], rtol=1e-5, atol=1e-5)


# --- DoRA norm ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.5, 2.0])
def test_factorised_dora_norm_matches_the_full_matrix(s):
    g = torch.Generator().manual_seed(0)
    W0, A, B = torch.randn(48, 40, generator=g), torch.randn(8, 40, generator=g), torch.randn(48, 8, generator=g)
    got = fused.factored_dora_norm(W0, A, B, s, fused.row_sq_norms(W0))
    want = ops.dora_norm(W0, A, B, s)
    close_to_scale(got, want, rtol=1e-5)  # float32 row norms (40 + 8 terms), relative to the largest norm


# --- one layer ----------------------------------------------------------------------------------------------

def make_layer(kind: str, mode: str, dropout: float, bias: bool, seed: int = 0) -> LoraLayer:
    torch.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(40, 24, bias=bias)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(24, 40)  # weight (in, out)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.1)
    r, alpha = 8, 16
    s = ops.scaling(r, alpha, mode == "rslora")
    layer = LoraLayer(base, kind, r, alpha, s, dropout, use_dora=mode == "dora")
    layer.reset_adapter(False)
    perturb_trainable(layer)  # parameters are float32 Parameters requiring grad after construction
    return layer.train()


def layer_run(layer: LoraLayer, x: torch.Tensor, rng_seed: int = 5):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(rng_seed)
    out = layer(x)
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    (out * w).sum().backward()
    grads = {n.rpartition(".")[2]: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("kind,bias", [("linear", False), ("linear", True), ("linear_t", True)])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_layer_matches_reference(path, kind, bias, mode, dropout):
    layer = make_layer(kind, mode, dropout, bias)
    layer.bias is not None and layer.bias.requires_grad_(True)  # bias="lora_only": the bias trains too
    x = torch.randn(3, 7, 40)
    path(False)
    want = layer_run(layer, x)
    path(True)
    got = layer_run(layer, x)
    close_to_scale(got[0], want[0], rtol=RTOL, msg="output")  # each tensor relative to its largest |value|
    close_to_scale(got[1], want[1], rtol=RTOL, msg="x.grad")
    assert want[2].keys() == got[2].keys() >= {"lora_A", "lora_B"}
    close_to_scale(got[2], want[2], rtol=RTOL, msg="grad")  # each parameter's gradient at its own scale
    if dropout:  # the masks really matter: another RNG state gives other outputs
        assert max_diff(layer_run(layer, x, rng_seed=6)[0], got[0]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bool, torch.bfloat16, torch.float16])
def test_accelerator_masks_come_from_a_seeded_device_generator(monkeypatch, dtype):
    """Off the CPU a mask is one Bernoulli kernel of the device's own generator, seeded per mask (forced here on the
    CPU's generator): still a pure function of (seed, shape, p), 0/1 in the mask's dtype, kept at rate 1 - p."""
    monkeypatch.setattr(fused, "SPLITMIX_DEVICES", ("meta",))
    cpu = torch.device("cpu")
    a = fused.keep_bits(11, (300, 400), 0.1, cpu, dtype=dtype)
    assert a.dtype == dtype and torch.equal(a, fused.keep_bits(11, (300, 400), 0.1, cpu, dtype=dtype))
    assert not torch.equal(a, fused.keep_bits(12, (300, 400), 0.1, cpu, dtype=dtype))
    assert set(a.float().unique().tolist()) == {0.0, 1.0}
    n, kept = a.numel(), a.float().mean().item()
    assert abs(kept - 0.9) < 5 * (0.9 * 0.1 / n) ** 0.5  # within 5 standard errors of 1 - p


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_the_layer_with_accelerator_masks_matches_reference(path, monkeypatch, mode):
    """The fused layer and the reference path draw the same device-generator masks (forward, and backward's
    reuse of forward's mask)."""
    monkeypatch.setattr(fused, "SPLITMIX_DEVICES", ("meta",))
    layer = make_layer("linear", mode, 0.2, True)
    x = torch.randn(3, 7, 40)
    path(False)
    want = layer_run(layer, x)
    path(True)
    got = layer_run(layer, x)
    close_to_scale(got[0], want[0], rtol=RTOL, msg="output")
    close_to_scale(got[1], want[1], rtol=RTOL, msg="x.grad")
    close_to_scale(got[2], want[2], rtol=RTOL, msg="grad")


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_trainable_weight_gets_its_gradient(path, mode):
    layer = make_layer("linear_t", mode, 0.1, True)
    layer.weight.requires_grad_(True)
    x = torch.randn(4, 40)
    path(False)
    want = layer_run(layer, x)[2]
    path(True)
    got = layer_run(layer, x)[2]
    close_to_scale(got["weight"], want["weight"], rtol=RTOL)  # relative to the gradient's largest |value|


@pytest.mark.parametrize("lookup", [("cpu",), ()], ids=["host-lookup", "static-size"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-weight", "frozen-weight"])
def test_zero_magnitude_rows_get_their_gradient(path, frozen, lookup, monkeypatch):
    """On the CPU the zero rows are looked up; on an accelerator (``static-size``, forced here) the first
    fused.ZERO_ROWS of them are taken without reading the device."""
    monkeypatch.setattr(fused, "HOST_LOOKUP", lookup)
    layer = make_layer("linear", "dora", 0.1, True)
    layer.weight.requires_grad_(not frozen)  # frozen: x ⊙ keep would be saved in place of x, but these rows need x
    with torch.no_grad():
        layer.lora_magnitude[[1, 5]] = 0.0
    x = torch.randn(6, 40)
    path(False)
    want = layer_run(layer, x)[2]["lora_magnitude"]
    path(True)
    got = layer_run(layer, x)[2]["lora_magnitude"]
    assert want[1].abs() > 0
    close_to_scale(got, want, rtol=RTOL)  # relative to the largest magnitude gradient


def test_more_zero_magnitude_rows_than_an_accelerator_recomputes_give_a_non_finite_gradient(path, monkeypatch):
    """Beyond fused.ZERO_ROWS zero rows, the static-size path leaves 0/0 in the magnitude gradient: a non-finite
    gradient, which stops a run (train.steps), never a silently wrong one. The first ZERO_ROWS rows are right."""
    monkeypatch.setattr(fused, "HOST_LOOKUP", ())
    layer = make_layer("linear", "dora", 0.0, True)
    rows = list(range(2, 2 + fused.ZERO_ROWS + 2))
    with torch.no_grad():
        layer.lora_magnitude[rows] = 0.0
    x = torch.randn(6, 40)
    path(False)
    want = layer_run(layer, x)[2]["lora_magnitude"]
    path(True)
    got = layer_run(layer, x)[2]["lora_magnitude"]
    first = rows[:fused.ZERO_ROWS]
    close_to_scale(got[first], want[first], rtol=RTOL)
    assert not got[rows[fused.ZERO_ROWS:]].isfinite().any()


def test_eval_mode_uses_the_reference_path(path):
    layer = make_layer("linear", "dora", 0.2, True).eval()
    x = torch.randn(5, 40)
    path(True)
    got = layer(x)
    path(False)
    assert torch.equal(got, layer(x))  # inference outputs never change


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_fused_saves_one_input_and_a_boolean_mask(path, mode):
    """Saved for backward over a frozen weight: the fused path keeps the (N, r) intermediate, the boolean mask and one
    input, x ⊙ keep in place of x (or x itself, for DoRA with a zero magnitude). A single LoRA layer saves what the
    reference saves (x's dropped copy and a mask); q/k/v and gate/up share theirs (next test), where the reference
    saves one per adapter."""
    layer = make_layer("linear", mode, 0.1, False)
    layer.weight.requires_grad_(False)
    x = torch.randn(64, 40, requires_grad=True)

    def saved():
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype)] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x)
        params = {(p.data_ptr(), p.dtype) for p in layer.parameters()}
        return {k: t for k, t in seen.items() if k not in params}, out

    path(False)
    ref, _ = saved()
    path(True)
    got, out = saved()
    kinds = Counter((tuple(t.shape), str(t.dtype)) for t in got.values())
    want = Counter({((64, 8), "torch.float32"): 1, ((64, 40), "torch.bool"): 1,  # A·(x ⊙ keep), the mask
                    ((64, 40), "torch.float32"): 1})  # x ⊙ keep
    if mode == "dora":
        want.update({((24,), "torch.float32"): 1, ((64, 24), "torch.float32"): 1})  # the norm, the output
    assert kinds == want
    assert (x.data_ptr(), x.dtype) not in got  # x ⊙ keep instead of x, never both
    nbytes = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    dora_out = out.numel() * out.element_size() if mode == "dora" else 0  # the output (the next op often saves it)
    assert nbytes(got) - dora_out <= nbytes(ref)


def test_half_base_is_close_to_reference(path):
    layer = make_layer("linear", "dora", 0.1, True)
    layer.weight.data = layer.weight.data.bfloat16()
    layer.bias.data = layer.bias.data.bfloat16()
    x = torch.randn(3, 6, 40).bfloat16()
    path(False)
    want = layer_run(layer, x)
    path(True)
    got = layer_run(layer, x)
    assert got[0].dtype == torch.bfloat16
    # bfloat16: the fused path rounds the base output, the adapter's sum and DoRA's scaling, the reference path its own
    # way; over 30 seeds (weights, input, dropout mask) the largest difference was 0.45-1.47 x 2^-7 of the largest
    # |output|: 2^-6 (as tests/core/test_bf16.py), two to four ulps of it
    close_to_scale(got[0].float(), want[0].float(), rtol=2 ** -6, msg="output")
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        assert got[2][name].dtype == torch.float32
        # float32 gradients of a bfloat16 computation: a few bfloat16 ulps of the gradient's largest |value|
        close_to_scale(got[2][name], want[2][name], rtol=2e-2, msg=name)


# --- whole models: 10-step loss curves ------------------------------------------------------------------------

def train_curve(model, inputs, steps: int = 10, seed: int = 11):
    """(losses of ``steps`` AdamW steps, the gradients of the first step)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], None
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses), grads


def assert_same_training(got, want):
    """Loss curves and first-step gradients within RTOL (parameters after many AdamW steps are not compared: Adam
    divides by sqrt(v), so rounding-level differences in near-zero gradients are amplified)."""
    close(got[0], want[0], rtol=RTOL, atol=0.0, msg="losses")  # relative to each loss (~5: ulp 4.8e-7)
    assert got[1].keys() == want[1].keys()
    close_to_scale(got[1], want[1], rtol=GRAD_RTOL, msg="grad")  # each gradient relative to its largest |value|


def attached(factory, mode: str, dropout: float, **kw):
    model = lorafit.attach(factory(), lorafit.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         init_lora_weights=False, **MODES[mode], **kw))
    perturb_trainable(model, std=0.05)
    return model.train()


IDS = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_curves_match_reference(path, mode, dropout, arch):
    factory = tiny_llama if arch == "llama" else tiny_gpt2
    kw = dict(target_modules="all-linear")
    path(False)
    want = train_curve(attached(factory, mode, dropout, **kw), IDS)
    path(True)
    got = train_curve(attached(factory, mode, dropout, **kw), IDS)
    assert want[0][-1] < want[0][0]
    assert_same_training(got, want)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_gradient_checkpointing_regenerates_the_same_masks(path, reentrant, mode):
    path(False)
    want = train_curve(attached(tiny_llama, mode, 0.1, target_modules="all-linear"), IDS)
    path(True)
    model = attached(tiny_llama, mode, 0.1, target_modules="all-linear")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    assert_same_training(train_curve(model, IDS), want)


@pytest.mark.parametrize("share", [True, False])
def test_shared_masks_are_switchable_and_equal_in_both_paths(path, monkeypatch, share):
    monkeypatch.setattr(fused, "SHARE_DROPOUT", share)
    path(False)
    want = train_curve(attached(tiny_llama, "lora", 0.2, target_modules="all-linear"), IDS, 3)
    path(True)
    assert_same_training(train_curve(attached(tiny_llama, "lora", 0.2, target_modules="all-linear"), IDS, 3), want)
    model = attached(tiny_llama, "lora", 0.2, target_modules=["q_proj", "k_proj"])
    attn, seen = model.model.layers[0].self_attn, {}

    def spy(name):
        def hook(mod, args):
            seen[name] = fused.dropout_seed(args[0], mod.dropout.p)
        return hook

    attn.q_proj.register_forward_pre_hook(spy("q"))
    attn.k_proj.register_forward_pre_hook(spy("k"))
    model(**IDS)
    assert (seen["q"] == seen["k"]) == share


def test_shared_input_is_computed_once_and_released(path, monkeypatch):
    """From the second step on, one mask per distinct input (q/k/v, o, gate/up, down), drawn in forward only
    (backward uses the saved mask), and no dropped input outlives its last reader (the forward's would otherwise sit
    on the peak at the start of backward)."""
    path(True)
    calls = []
    make = fused.keep_bits
    monkeypatch.setattr(fused, "keep_bits", lambda *a, **k: calls.append(a) or make(*a, **k))
    model = attached(tiny_llama, "lora", 0.1, target_modules="all-linear")
    for _ in range(3):
        calls.clear()
        loss = model(**IDS, labels=IDS["input_ids"]).loss
        forward, released = len(calls), fused._shared["fwd"].entry is None
        loss.backward()
    assert forward == 4 * 2 and len(calls) == forward and released and fused._shared["bwd"].entry is None


# --- torch.compile and DDP ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_torch_compile(path, mode):
    path(True)
    want = train_curve(attached(tiny_llama, mode, 0.1, target_modules="all-linear"), IDS, 3)
    got = train_curve(torch.compile(attached(tiny_llama, mode, 0.1, target_modules="all-linear")), IDS, 3)
    # compiled base-model ops (fused by inductor) round differently, within the eager comparisons' bounds
    # (measured: losses 1e-7 of each loss, gradients 2.4e-6 of each gradient's largest |value|)
    close(got[0], want[0], rtol=RTOL, atol=0.0, msg="losses")
    close_to_scale({n: got[1]["_orig_mod." + n] for n in want[1]}, want[1], rtol=GRAD_RTOL, msg="grad")


def _ddp_worker(rank: int, world: int, port: int, mode: str, result_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layers.FUSED = True
    model = DistributedDataParallel(attached(tiny_llama, mode, 0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = IDS["input_ids"][rank::world]  # each rank trains on its half of the batch
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()  # equal-length halves: the mean of means is the mean
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save({n: p.detach() for n, p in model.module.named_parameters() if p.requires_grad}, result_path)
    # leave as lorafit train does (issue 18): free the DDP wrapper, whose reducer holds the group, before the group
    # goes; destroying the group first deadlocked a worker in gloo's destructor under load
    del model, opt
    gc.collect()
    leave(Dist(rank, world))


@pytest.mark.parametrize("mode", ["dora"])
def test_ddp_trains_like_one_process(path, tmp_path, mode):
    import torch.multiprocessing as mp

    path(True)
    model = attached(tiny_llama, mode, 0.0, target_modules="all-linear")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = IDS["input_ids"]
        halves = [model(input_ids=ids[i::2], labels=ids[i::2]).loss for i in range(2)]
        (sum(halves) / 2).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, mode, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    # 3 AdamW steps (lr 1e-2) on gradients that gloo averages (over 2 ranks: the same sums; measured identical):
    # float32 rounding of each parameter (|p| ~0.2), plus 1e-5 of one step (lr) for entries near 0
    close(got, want, rtol=RTOL, atol=1e-7)


# --- the trainer's optimizer ------------------------------------------------------------------------------------

def test_trainer_uses_the_fused_adamw_and_it_follows_the_default_implementation():
    from lorafit.train.loop import adamw

    torch.manual_seed(0)
    shapes = [(16, 24), (40, 16), (40,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(10)]

    def run(make):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return opt, params

    fast, got = run(lambda ps: adamw(ps, 1e-2, 0.01))
    _, want = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False))
    assert fast.defaults["fused"] is True
    # the fused kernel orders AdamW's arithmetic differently: a few float32 ulps of each parameter (|p| up to ~4),
    # and of the lr 1e-2 updates for parameters near 0
    close(dict(enumerate(got)), dict(enumerate(want)), rtol=1e-6, atol=1e-7)
    plain, _ = run(lambda ps: adamw(ps, 1e-2, 0.01, fused=False))  # what FSDP2's DTensor shards get
    assert not plain.defaults["fused"]
    ints = adamw([torch.zeros(3, dtype=torch.int64)], 1e-2, 0.0)  # not floating point: never the fused kernel
    assert not ints.defaults["fused"]
