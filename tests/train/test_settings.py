"""resolve_settings: TrainConfig's defaults <- the demo job's <- the config file's <- the flags, and the one rule
for "is this the demo job"."""

from __future__ import annotations

import pytest

import lorafit.train.settings as settings
from lorafit.demo.task import DEFAULT_JOB
from lorafit.errors import ConfigError
from lorafit.train.settings import is_demo, resolve_settings
from lorafit.train.train_config import TrainConfig, default_lora


@pytest.fixture(autouse=True)
def no_timing(monkeypatch):
    """default_dtype times bf16 for the demo job: record its arguments instead."""
    monkeypatch.setattr(settings, "default_dtype", lambda *, demo, quantize, device: (
        "bfloat16" if demo or quantize else None, f"demo={demo} quantize={quantize}" if demo or quantize else ""))


@pytest.mark.parametrize("config, flags, demo", [
    ({}, {}, True),
    ({"model": None, "data": None, "steps": 3}, {}, True),  # a demo run's own config.yaml writes nulls
    ({}, {"model": "m"}, False),
    ({}, {"data": "d.jsonl"}, False),
    ({"model": "m"}, {}, False),
    ({"data": "d.jsonl"}, {"steps": 5}, False),
])
def test_the_demo_job_is_the_run_that_names_neither_model_nor_data(config, flags, demo):
    assert is_demo(config, flags) is demo


def test_later_sources_win():
    merged, note = resolve_settings({"steps": 9, "lr": 0.002, "max_length": 64}, {"steps": 4})
    assert merged["steps"] == 4 and merged["lr"] == 0.002 and merged["max_length"] == 64  # flag, then file
    assert merged["eval_max"] == DEFAULT_JOB["eval_max"]  # the demo job's, under both
    assert merged["dtype"] == "bfloat16" and note == "demo=True quantize=None"
    merged, note = resolve_settings({"data": "d.jsonl"}, {"quantize": "nf4"})
    assert not set(DEFAULT_JOB) & set(merged)  # not the demo: TrainConfig's own defaults stay
    assert note == "demo=False quantize=nf4"


def test_a_named_dtype_is_kept_without_a_note():
    merged, note = resolve_settings({"dtype": "float32"}, {})
    assert merged["dtype"] == "float32" and note == ""
    merged, note = resolve_settings({"model": "m"}, {})
    assert "dtype" not in merged and note == ""  # TrainConfig's float32


def test_the_adapter_is_the_default_lora_under_the_file_under_the_flags():
    merged, _ = resolve_settings({"model": "m", "lora": {"r": 4, "lora_alpha": 8}}, {"lora.r": 2})
    assert merged["lora"] == {**default_lora().to_dict(), "r": 2, "lora_alpha": 8}
    assert TrainConfig.from_dict(merged).lora.target_modules == ["q_proj", "v_proj"]


def test_without_lora_the_section_is_ignored_even_when_malformed():
    merged, _ = resolve_settings({"model": "m", "lora": "r=4"}, {}, lora=False)
    assert "lora" not in merged
    with pytest.raises(ConfigError, match="'lora:' in the config file must be a mapping"):
        resolve_settings({"model": "m", "lora": "r=4"}, {})


@pytest.mark.parametrize("config, flags, want", [
    ({}, {"warmup_ratio": 0.1}, {"warmup_ratio": 0.1}),  # the demo's warmup_steps=5 would beat the ratio
    ({"warmup_ratio": 0.1}, {}, {"warmup_ratio": 0.1}),
    ({"warmup_ratio": 0.1}, {"warmup_steps": 3}, {"warmup_steps": 3}),  # the flag's replaces the file's
    ({"warmup_steps": 2}, {}, {"warmup_steps": 2}),
    ({}, {}, {"warmup_steps": DEFAULT_JOB["warmup_steps"]}),
])
def test_a_later_source_naming_a_warm_up_replaces_the_earlier_warm_up(config, flags, want):
    merged, _ = resolve_settings(config, flags)
    assert {k: merged[k] for k in ("warmup_steps", "warmup_ratio") if k in merged} == want
    cfg = TrainConfig.from_dict({k: v for k, v in merged.items() if k != "lora"})
    assert cfg.warmup(60) == (want.get("warmup_steps") or 6)  # or 10% of the demo's 60 steps
