"""save / load: PEFT files, atomic writes, and one clear error for every broken adapter folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafit
from helpers import example_input, perturb_trainable, run, tiny_gpt2, tiny_llama
from lorafit import AdapterError, LoraConfig

CFG = dict(target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)


@pytest.fixture
def adapter(tmp_path):
    model = lorafit.attach(tiny_llama(), LoraConfig(**CFG))
    perturb_trainable(model)
    path = lorafit.save(model, tmp_path / "adapter")
    return model.eval(), path


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, lorafit.LoraLayer) for m in model.modules())


def test_files_and_keys(adapter):
    _, path = adapter
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    assert cfg["target_modules"] == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                           for p in ("q_proj", "v_proj"))
    keys = load_file(path / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys


def test_round_trip_is_exact(adapter):
    model, path = adapter
    loaded = lorafit.load(tiny_llama(), path).eval()
    x = example_input("llama")
    assert torch.equal(run(loaded, x), run(model, x))


def test_load_casts_to_the_model_dtype(adapter, tmp_path):
    model, path = adapter
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(path / "adapter_model.safetensors").items()}
    save_file(sd, path / "adapter_model.safetensors")
    loaded = lorafit.load(tiny_llama(), path)
    assert loaded.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.lora_A, sd[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float())


def test_save_overwrites_atomically(adapter, tmp_path, monkeypatch):
    model, path = adapter
    old = (path / "adapter_model.safetensors").read_bytes()
    perturb_trainable(model, seed=9)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lorafit.peft_format, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        lorafit.save(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == old  # the previous adapter is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]  # no temp folder left behind
    monkeypatch.undo()
    lorafit.save(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() != old


def _break(path: Path, how: str):
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    sd = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "no_config":
        config.unlink()
    elif how == "no_weights":
        weights.unlink()
    elif how == "bin_only":
        weights.unlink()
        torch.save(sd, path / "adapter_model.bin")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif how == "empty_weights":
        weights.write_bytes(b"")
    elif how == "config_not_json":
        config.write_text("{oops")
    elif how == "config_bad_value":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": -1}))
    elif how == "not_lora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "IA3"}))
    elif how == "wrong_shape":
        sd[key] = torch.zeros(8, 31)
        save_file(sd, weights)
    elif how == "unknown_module":
        sd["base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"] = torch.zeros(8, 32)
        save_file(sd, weights)
    elif how == "missing_tensor":
        del sd[key]
        save_file(sd, weights)
    elif how == "nan":
        sd[key] = torch.full_like(sd[key], float("nan"))
        save_file(sd, weights)
    elif how == "int_dtype":
        sd[key] = sd[key].to(torch.int32)
        save_file(sd, weights)
    elif how == "rank_contradicts":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 4}))
    elif how == "dora_contradicts":
        config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False}))
    elif how == "other_targets":
        config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["c_attn"]}))
    elif how == "not_a_folder":
        import shutil
        shutil.rmtree(path)
    return how


BROKEN = {
    "no_config": "no adapter_config.json", "no_weights": "weights are missing", "bin_only": "adapter_model.bin",
    "truncated": "truncated or corrupt", "garbage": "truncated or corrupt", "empty_weights": "truncated or corrupt",
    "config_not_json": "not valid JSON", "config_bad_value": "LoraConfig.r=-1", "not_lora": "peft_type",
    "wrong_shape": r"has shape \(8, 31\) but the model expects \(8, 32\)", "unknown_module": "x_proj",
    "missing_tensor": "missing", "nan": "NaN", "int_dtype": "floating point",
    "rank_contradicts": "has shape", "dora_contradicts": "lora_magnitude_vector", "other_targets": "c_attn",
    "not_a_folder": "does not exist",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_adapter_folder_gives_one_clear_error_and_leaves_the_model_untouched(adapter, how):
    _, path = adapter
    _break(path, how)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=BROKEN[how]):
        lorafit.load(model, path)
    assert_untouched(model, before)


def test_adapter_for_another_model(adapter):
    _, path = adapter
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(AdapterError, match="does not fit this model"):
        lorafit.load(model, path)
    assert_untouched(model, before)


def test_split_key_and_factor_key_are_inverse_on_every_saved_key(tmp_path):
    """peft_format is the one module that parses PEFT's key names (export uses split_key / factor_key)."""
    from lorafit.peft_format import factor_key, split_key

    model = lorafit.attach(tiny_llama(), LoraConfig(target_modules=["embed_tokens", "q_proj"], use_dora=True,
                                                    bias="lora_only", modules_to_save=["lm_head"]))
    keys = load_file(lorafit.save(model, tmp_path / "a") / "adapter_model.safetensors").keys()
    parts = {}
    for key in keys:
        k = split_key(key)
        parts.setdefault(k.part, set()).add(k.module)
        if k.part in ("A", "B", "m"):
            assert factor_key(k.module, k.part, embedding=k.embedding) == key
    assert parts["A"] == parts["B"] == {"model.embed_tokens"} | {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    assert split_key("base_model.model.model.embed_tokens.lora_embedding_A") == ("model.embed_tokens", "A", True)
    assert split_key("base_model.model.x.q_proj.lora_magnitude_vector") == ("x.q_proj", "m", False)
    assert split_key("base_model.model.x.q_proj.base_layer.bias") == ("x.q_proj", "bias", False)
    assert split_key("base_model.model.x.q_proj.lora_B.bias") == ("x.q_proj", "bias", False)
    assert split_key("base_model.model.lm_head.weight") == ("lm_head", "weight", False)


def test_save_without_adapter_is_an_error(tmp_path):
    with pytest.raises(AdapterError, match="no lorafit adapter"):
        lorafit.save(tiny_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
