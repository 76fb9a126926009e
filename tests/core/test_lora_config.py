"""LoraConfig: PEFT's defaults, validation errors that name the field, and JSON round trips."""

from __future__ import annotations

import json

import peft
import pytest

from lorafit import ConfigError, LoraConfig


def test_defaults_match_peft():
    ours, ref = LoraConfig(), peft.LoraConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
                  "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "modules_to_save", "fan_in_fan_out",
                  "init_lora_weights", "use_rslora", "use_dora"):
        assert getattr(ours, field) == getattr(ref, field), field


BAD = [
    ("r", dict(r=0)), ("r", dict(r=-4)), ("r", dict(r=2.5)), ("r", dict(r="8")), ("r", dict(r=True)),
    ("lora_alpha", dict(lora_alpha=0)), ("lora_alpha", dict(lora_alpha=-1)), ("lora_alpha", dict(lora_alpha="16")),
    ("lora_alpha", dict(lora_alpha=float("nan"))),
    ("lora_dropout", dict(lora_dropout=1.0)), ("lora_dropout", dict(lora_dropout=-0.1)),
    ("lora_dropout", dict(lora_dropout="0.1")),
    ("bias", dict(bias="some")), ("init_lora_weights", dict(init_lora_weights="xavier")),
    ("target_modules", dict(target_modules=3)), ("target_modules", dict(target_modules=[])),
    ("target_modules", dict(target_modules=["q_proj", 3])), ("target_modules", dict(target_modules="(unclosed")),
    ("exclude_modules", dict(exclude_modules=5)),
    ("layers_to_transform", dict(target_modules="all-linear", layers_to_transform=[0])),
    ("layers_to_transform", dict(target_modules=["q_proj"], layers_to_transform=[-1])),
    ("layers_to_transform", dict(target_modules=["q_proj"], layers_to_transform="0")),
    ("layers_pattern", dict(target_modules=["q_proj"], layers_pattern="layers")),
    ("layers_pattern", dict(target_modules=".*q_proj", layers_pattern="layers")),
    ("rank_pattern", dict(rank_pattern={"q_proj": 0})), ("rank_pattern", dict(rank_pattern={"q_proj": 2.5})),
    ("rank_pattern", dict(rank_pattern={"(": 4})), ("rank_pattern", dict(rank_pattern=["q_proj"])),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": -1})),
    ("modules_to_save", dict(modules_to_save=[1])),
    ("use_dora", dict(use_dora="yes")), ("use_rslora", dict(use_rslora=1)),
    ("fan_in_fan_out", dict(fan_in_fan_out=None)),
]


@pytest.mark.parametrize("field,kwargs", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_invalid_values_raise_one_clear_error(field, kwargs):
    with pytest.raises(ValueError) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ConfigError)
    assert f"LoraConfig.{field}=" in str(info.value)


def test_json_round_trip():
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4},
                     alpha_pattern={"v_proj": 2.0}, layers_to_transform=[0, 1], layers_pattern="layers",
                     use_dora=True, init_lora_weights="gaussian", modules_to_save=["lm_head"])
    assert LoraConfig.from_json(cfg.to_json()) == cfg


def test_reads_peft_written_config(tmp_path):
    ref = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"], use_rslora=True, lora_dropout=0.1)
    ref.save_pretrained(tmp_path)
    cfg = LoraConfig.from_json(tmp_path / "adapter_config.json")
    got = (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.use_rslora, cfg.lora_dropout)
    assert got == (4, 12, ["q_proj"], True, 0.1)


def test_unknown_keys_warn_when_reading_adapters_and_fail_in_strict_mode():
    data = {"r": 4, "peft_type": "LORA", "use_qalora": True, "task_type": "CAUSAL_LM"}
    with pytest.warns(UserWarning, match="use_qalora"):
        LoraConfig.from_dict(data, strict=False)
    with pytest.raises(ConfigError, match="unknown LoraConfig field"):
        LoraConfig.from_dict(data, strict=True)


def test_non_lora_peft_type_is_rejected():
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"}, strict=False)


def test_malformed_json(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_json(tmp_path / "c.json")
    assert json.loads(LoraConfig().to_json())["r"] == 8


def test_json_files_are_read_and_written_through_lorafit_files(tmp_path):
    """from_json reads with files.read_json (ConfigError naming the file), to_json writes with files.write_text."""
    with pytest.raises(ConfigError, match="none.json does not exist"):
        LoraConfig.from_json(tmp_path / "none.json")
    (tmp_path / "latin1.json").write_bytes('{"r": 8, "note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.json is not valid JSON .*not UTF-8 text"):
        LoraConfig.from_json(tmp_path / "latin1.json")
    LoraConfig(r=4).to_json(tmp_path / "c.json")
    assert LoraConfig.from_json(tmp_path / "c.json") == LoraConfig(r=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "latin1.json"]  # no temporary file left


def test_scaling_formula():
    from lorafit.ops import scaling  # the one scale rule (LoraConfig has none of its own)

    assert scaling(16, 32, use_rslora=False) == 2.0
    assert scaling(16, 32, use_rslora=True) == 8.0
    assert not hasattr(LoraConfig(), "scaling")
