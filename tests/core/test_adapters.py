"""Several adapters on one model, against PEFT on the same weights: set_active with one and several names, per_row
against PEFT's ``adapter_names=``, the multi-adapter folder both ways, merge(names), delete, hot swap, bad input.

Tolerance: float32 logits agree to RTOL of their largest |value| (the same sums in another order), as in
test_peft_parity; the issue's 1e-5 bound is met with that margin under every ATEN_CPU_CAPABILITY.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorafit
from helpers import close_to_scale, tiny_llama
from lorafit import AdapterError, ConfigError, LoraConfig
from lorafit.peft_format import adapter_state_dict

RTOL = 1e-5
CONFIGS = {  # different ranks, targets and variants
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "c": dict(r=2, lora_alpha=2, target_modules=["k_proj", "o_proj", "down_proj"], use_dora=True),
}
LORA_ONLY = ("a", "b")  # PEFT's adapter_names= refuses DoRA
SCHEDULES = {"bmm": 0, "stacked": 10**9}  # mixed.DECODE_WORK forcing each of per_row's two schedules
pytestmark = pytest.mark.filterwarnings("ignore:Adapter name .* should not be contained in the prefix")


@torch.no_grad()
def perturb(model, seed: int = 3, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if ".adapters." in n:
            p.add_(torch.randn(p.shape, generator=g) * std)


def build(names=("a", "b", "c")):
    """(base, lorafit model, PEFT model) with identical adapters."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    for n in names:
        lorafit.attach(ours, LoraConfig(**CONFIGS[n]), name=n)
    perturb(ours)
    ours.eval()
    ref = None
    for n in names:
        cfg = peft.LoraConfig(**CONFIGS[n])
        if ref is None:
            ref = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=n)
        else:
            ref.add_adapter(n, cfg)
        result = peft.set_peft_model_state_dict(ref, adapter_state_dict(ours, n), adapter_name=n)
        assert not result.unexpected_keys
    return base, ours, ref.eval()


def ids(rows=4, length=9, seed=1):
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def test_names_and_the_first_adapter_is_the_active_one():
    _, ours, _ = build()
    assert lorafit.adapters(ours) == ["a", "b", "c"]
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"a"}  # later adapters are added inactive and frozen, as PEFT's add_adapter


@pytest.mark.parametrize("active", [["a"], ["b"], ["c"], ["a", "b"], ["b", "c"], ["c", "a", "b"]])
def test_set_active_matches_peft(active):
    base, ours, ref = build()
    x = ids()
    lorafit.set_active(ours, active if len(active) > 1 else active[0])
    ref.base_model.set_adapter(active)
    got, want = logits(ours, x), logits(ref, x)
    assert (got - logits(base, x)).abs().max() > 1e-3  # the adapters really act
    close_to_scale(got, want, rtol=RTOL)
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(active)  # only the active adapters train


def test_set_active_none_and_disabled_give_the_base():
    base, ours, _ = build()
    x = ids()
    with lorafit.disabled(ours):
        close_to_scale(logits(ours, x), logits(base, x), rtol=1e-6)
    lorafit.set_active(ours, None)
    close_to_scale(logits(ours, x), logits(base, x), rtol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("names", [["a", None, "b", "a", "b", None], ["b", None, "b", "b"]])  # all used / a subset
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("length", [1, 9])
def test_per_row_matches_peft_adapter_names(length, schedule, names, monkeypatch):
    monkeypatch.setattr(lorafit.mixed, "DECODE_WORK", SCHEDULES[schedule])
    base, ours, ref = build(LORA_ONLY)
    x = ids(len(names), length)
    with lorafit.per_row(ours, names):
        got = logits(ours, x)
    want = logits(ref, x, adapter_names=["__base__" if n is None else n for n in names])
    close_to_scale(got, want, rtol=RTOL)
    plain = logits(base, x)
    for i, n in enumerate(names):  # adapter rows really differ from the base, base rows really equal it
        assert ((got[i] - plain[i]).abs().max() > 1e-3) == (n is not None), (i, n)


# every adapter (DoRA among them); rows whose adapters leave some layers alone (c adapts k_proj, o_proj, down_proj,
# a only q and v); the base only
@pytest.mark.parametrize("names", [["c", "a", None, "b", "c"], ["a", None, "a"], [None, None]])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("length", [1, 9])
def test_per_row_rows_equal_each_adapter_alone_with_dora(length, schedule, names, monkeypatch):
    monkeypatch.setattr(lorafit.mixed, "DECODE_WORK", SCHEDULES[schedule])
    base, ours, _ = build()
    x = ids(len(names), length)
    with lorafit.per_row(ours, names):
        got = logits(ours, x)
    for i, n in enumerate(names):
        lorafit.set_active(ours, n)
        close_to_scale(got[i], logits(ours, x[i:i + 1])[0], rtol=RTOL, msg=f"row {i} ({n})")
    lorafit.set_active(ours, "a")


def test_per_row_under_generate_with_beams_matches_peft():
    _, ours, ref = build(LORA_ONLY)
    names = ["b", "a", None]
    x = ids(len(names), 5)
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0)
    with lorafit.per_row(ours, names), torch.no_grad():
        got = ours.generate(input_ids=x, **kw)
    with torch.no_grad():
        want = ref.generate(input_ids=x, adapter_names=["__base__" if n is None else n for n in names], **kw)
    assert torch.equal(got, want)
    assert "generate" not in ours.__dict__  # the context put generate back


def test_multi_adapter_folder_both_ways(tmp_path):
    base, ours, ref = build()
    lorafit.save(ours, tmp_path / "ours")  # no adapter is named "default": each one gets its subfolder
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["a", "b", "c"]
    x = ids()
    # lorafit's folder in PEFT: from_pretrained(subfolder) + load_adapter(..., adapter_name=)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "a", adapter_name="a")
    for n in ("b", "c"):
        theirs.load_adapter(tmp_path / "ours" / n, adapter_name=n)
    theirs.eval()
    for n in ("a", "b", "c"):
        lorafit.set_active(ours, n)
        theirs.set_adapter(n)
        close_to_scale(logits(ours, x), logits(theirs, x), rtol=RTOL, msg=n)
    # PEFT's folder in lorafit: save_pretrained writes "default" at the root, others in subfolders
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIGS["a"]))  # "default"
    peft_model.add_adapter("other", peft.LoraConfig(**CONFIGS["c"]))
    peft.set_peft_model_state_dict(peft_model, adapter_state_dict(ours, "a"), adapter_name="default")
    peft.set_peft_model_state_dict(peft_model, adapter_state_dict(ours, "c"), adapter_name="other")
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load(copy.deepcopy(base), tmp_path / "peft").eval()
    assert lorafit.adapters(loaded) == ["default", "other"]
    for mine, theirs_name in (("default", "a"), ("other", "c")):
        lorafit.set_active(loaded, mine)
        lorafit.set_active(ours, theirs_name)
        close_to_scale(logits(loaded, x), logits(ours, x), rtol=RTOL, msg=mine)
    # and lorafit writes the same layout back
    lorafit.save(loaded, tmp_path / "again")
    assert (tmp_path / "again" / "adapter_config.json").is_file()
    assert (tmp_path / "again" / "other" / "adapter_model.safetensors").is_file()


def test_load_one_adapter_under_a_name_and_a_subfolder_by_name(tmp_path):
    base, ours, _ = build()
    lorafit.save(ours, tmp_path / "all")
    model = lorafit.load(copy.deepcopy(base), tmp_path / "all", name="b")  # the subfolder "b"
    model = lorafit.load(model, tmp_path / "all" / "c", name="cc")  # a single-adapter folder under a new name
    assert lorafit.adapters(model) == ["b", "cc"]
    x = ids()
    lorafit.set_active(model, "cc")
    lorafit.set_active(ours, "c")
    close_to_scale(logits(model.eval(), x), logits(ours, x), rtol=RTOL)


@pytest.mark.parametrize("names", [["a"], ["c"], ["a", "b"]])
def test_merge_names_equals_the_unmerged_active_adapters(names):
    _, ours, _ = build()
    x = ids()
    lorafit.set_active(ours, names)
    want = logits(ours, x)
    lorafit.merge(ours, names=names)
    assert lorafit.adapters(ours) == [n for n in ("a", "b", "c") if n not in names]  # the others stay attached
    close_to_scale(logits(ours, x), want, rtol=RTOL)  # nothing active now: the merged base


def test_delete_and_the_last_adapter_gives_back_the_base():
    base, ours, _ = build(("a", "b"))
    lorafit.delete(ours, "a")
    assert lorafit.adapters(ours) == ["b"]
    lorafit.delete(ours, "b")
    assert not hasattr(ours, "lorafit_state") and not list(lorafit.adapter_layers(ours))
    assert ours.state_dict().keys() == base.state_dict().keys()


def test_training_trains_the_active_adapter_only():
    _, ours, _ = build(LORA_ONLY)
    lorafit.set_active(ours, "b")
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    x = ids()
    ours(input_ids=x, labels=x).loss.backward()
    opt.step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.b." in n for n in changed)


# --- hot swap --------------------------------------------------------------------------------------------------

def test_hot_swap_pads_a_smaller_rank_and_equals_the_new_adapter(tmp_path):
    base = tiny_llama()
    small = lorafit.attach(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    lorafit.save(small.eval(), tmp_path / "small")
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.eval()
    lorafit.load(model, tmp_path / "small", name="default", replace=True)
    x = ids()
    close_to_scale(logits(model, x), logits(small, x), rtol=RTOL)
    assert model.model.layers[0].self_attn.q_proj.lora_A.shape[0] == 4  # still the allocated rank


def test_hot_swap_under_torch_compile_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    base = tiny_llama()
    cfg = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    for i, (r, alpha) in enumerate([(4, 8), (2, 3)]):
        torch.manual_seed(10 + i)
        m = lorafit.attach(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, **cfg))
        lorafit.save(m, tmp_path / f"ad{i}")
    model = lorafit.load(copy.deepcopy(base), tmp_path / "ad0").eval()
    want1 = logits(lorafit.load(copy.deepcopy(base), tmp_path / "ad1").eval(), ids())
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    first = logits(compiled, ids())
    frames = counters["stats"]["unique_graphs"]
    lorafit.load(model, tmp_path / "ad1", replace=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = logits(compiled, ids())
    assert counters["stats"]["unique_graphs"] == frames  # no new graph
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0
    close_to_scale(second, want1, rtol=RTOL)
    assert (second - first).abs().max() > 1e-4


# --- bad input ---------------------------------------------------------------------------------------------------

def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}, lorafit.adapters(model)


def _unchanged(model, snap):
    tensors, names = snap
    now = model.state_dict()
    assert lorafit.adapters(model) == names and now.keys() == tensors.keys()
    assert all(torch.equal(now[k], v) for k, v in tensors.items())


def test_unknown_names_are_refused_with_the_known_ones():
    _, ours, _ = build(LORA_ONLY)
    snap = _snapshot(ours)
    for call in (lambda: lorafit.set_active(ours, "zz"), lambda: lorafit.delete(ours, "zz"),
                 lambda: lorafit.merge(ours, names=["zz"]),
                 lambda: lorafit.per_row(ours, ["a", "zz"]).__enter__()):
        with pytest.raises(AdapterError, match=r"no adapter named 'zz'; this model has \['a', 'b'\]"):
            call()
    _unchanged(ours, snap)


def test_duplicate_names_are_refused(tmp_path):
    base, ours, _ = build(LORA_ONLY)
    lorafit.save(ours, tmp_path / "s", names=["a"])
    snap = _snapshot(ours)
    with pytest.raises(AdapterError, match="already has an adapter named 'a'"):
        lorafit.attach(ours, LoraConfig(target_modules=["q_proj"]), name="a")
    with pytest.raises(AdapterError, match="already has an adapter named 'a'"):
        lorafit.load(ours, tmp_path / "s")
    with pytest.raises(ConfigError, match="adapter name 'a.b'"):
        lorafit.attach(ours, LoraConfig(target_modules=["q_proj"]), name="a.b")
    _unchanged(ours, snap)


def test_per_row_bad_length_and_training_mode():
    _, ours, _ = build(LORA_ONLY)
    with pytest.raises(AdapterError, match="was given 3 names but the batch has 4 rows"):
        with lorafit.per_row(ours, ["a", "b", None]):
            logits(ours, ids(4))
    assert all(layer.routing is None for _, layer in lorafit.adapter_layers(ours))  # the context cleaned up
    ours.train()
    with pytest.raises(AdapterError, match="training mode"):
        with lorafit.per_row(ours, ["a"] * 4):
            pass


def test_deleting_the_only_adapter_while_training_is_refused():
    model = lorafit.attach(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    model.train()
    snap = _snapshot(model)
    with pytest.raises(AdapterError, match="only adapter and the model is in training mode"):
        lorafit.delete(model, "default")
    _unchanged(model, snap)


def test_hot_swap_refuses_a_larger_rank_and_other_targets(tmp_path):
    base = tiny_llama()
    for name, kw in (("big", dict(r=8, target_modules=["q_proj", "v_proj"])),
                     ("other", dict(r=2, target_modules=["q_proj", "k_proj"]))):
        lorafit.save(lorafit.attach(copy.deepcopy(base), LoraConfig(**kw)), tmp_path / name)
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    snap = _snapshot(model)
    with pytest.raises(AdapterError, match="rank 8 at .* larger than the allocated rank 4"):
        lorafit.load(model, tmp_path / "big", name="default", replace=True)
    with pytest.raises(AdapterError, match="targets other modules .*k_proj"):
        lorafit.load(model, tmp_path / "other", name="default", replace=True)
    _unchanged(model, snap)


def test_a_broken_subfolder_is_named_and_nothing_is_loaded(tmp_path):
    base, ours, _ = build()
    lorafit.save(ours, tmp_path / "all")
    (tmp_path / "all" / "b" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    model = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=r"subfolder 'b' .*nothing was loaded"):
        lorafit.load(model, tmp_path / "all")
    assert not hasattr(model, "lorafit_state")
    assert model.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_per_row_on_embeddings_and_convolutions(schedule, monkeypatch):
    from helpers import tiny_cnn

    monkeypatch.setattr(lorafit.mixed, "DECODE_WORK", SCHEDULES[schedule])
    for make, targets, x in ((tiny_llama, ["embed_tokens", "q_proj"], {"input_ids": ids(4, 6)}),
                             (tiny_cnn, ["conv1", "conv1d"], {"x": torch.randn(4, 3, 8, 8)})):
        model = make()
        for n, kw in (("p", dict(r=4)), ("q", dict(r=2, use_dora=True))):
            lorafit.attach(model, LoraConfig(target_modules=targets, init_lora_weights=False, **kw), name=n)
        perturb(model)
        model.eval()
        names = ["q", "p", None, "q"]
        with lorafit.per_row(model, names), torch.no_grad():
            got = model(**x)
        got = getattr(got, "logits", got)
        for i, n in enumerate(names):
            lorafit.set_active(model, n)
            with torch.no_grad():
                alone = model(**{k: v[i:i + 1] for k, v in x.items()})
            close_to_scale(got[i], getattr(alone, "logits", alone)[0], rtol=RTOL, msg=f"{make.__name__} row {i}")
