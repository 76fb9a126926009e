"""A run's settings from their four sources, merged in this one place for every command that trains (train, probe,
sweep, tune): TrainConfig's defaults <- the demo job's <- a config file's <- the command line's flags.

Pure: the caller reads the YAML and collects the flags; what comes back is ``TrainConfig.from_dict``'s input.
"""

from __future__ import annotations

from typing import Any

from ..demo.task import DEFAULT_JOB
from ..devices import resolve_device
from ..errors import ConfigError
from .train_config import default_dtype, default_lora

WARMUP_KEYS = {"warmup_steps", "warmup_ratio"}  # the two ways to give one warm-up (TrainConfig.warmup)


def is_demo(config: dict, flags: dict) -> bool:
    """The demo job is the run on the embedded model and data: neither ``model`` nor ``data`` is set, by a flag or
    by the config file. A null there sets nothing (TrainConfig's None is the embedded one), so a demo run's own
    config.yaml, which writes ``model: null``, is the demo again."""
    return all(flags.get(key) is None and config.get(key) is None for key in ("model", "data"))


def resolve_settings(config: dict, flags: dict[str, Any], *, lora: bool = True) -> tuple[dict, str]:
    """TrainConfig fields of a run, and one line on its dtype where no source names one and it was chosen
    (``default_dtype``), else "".

    Later sources win: TrainConfig's defaults <- ``DEFAULT_JOB`` (only for the demo job, ``is_demo``) <- ``config``
    (the --config file's mapping) <- ``flags`` ({"field" or "lora.field": value} of the flags given, None never).
    A source naming either warm-up key (``WARMUP_KEYS``) replaces the earlier sources' warm-up as a whole.

    Args:
        lora: the adapter is ``default_lora()`` <- the config's 'lora:' mapping <- the "lora.*" flags. False (probe,
            sweep and tune choose the adapters themselves): the 'lora:' section is ignored, and no 'lora' key comes
            back.
    """
    demo = is_demo(config, flags)
    merged: dict = dict(DEFAULT_JOB) if demo else {}
    for source in ({k: v for k, v in config.items() if k != "lora"},
                   {k: v for k, v in flags.items() if not k.startswith("lora.")}):
        if WARMUP_KEYS & source.keys():  # one warm-up: a later source's ratio is not beaten by an earlier's steps
            merged = {k: v for k, v in merged.items() if k not in WARMUP_KEYS}
        merged.update(source)
    if lora:
        merged["lora"] = _adapter(config, flags)
    note = ""
    if "dtype" not in merged:
        device, _ = resolve_device(merged.get("device", "auto"))  # an absent device fails here, before any work
        dtype, note = default_dtype(demo=demo, quantize=merged.get("quantize"), device=device)
        merged.update({"dtype": dtype} if dtype else {})
    return merged, note


def _adapter(config: dict, flags: dict) -> dict:
    """LoraConfig fields: ``default_lora()`` <- the config's 'lora:' mapping <- the "lora.*" flags."""
    if "lora" in config and not isinstance(config["lora"], dict):
        raise ConfigError("'lora:' in the config file must be a mapping of LoraConfig fields")
    adapter = {**default_lora().to_dict(), **config.get("lora", {})}
    adapter.update({k[len("lora."):]: v for k, v in flags.items() if k.startswith("lora.")})
    return adapter
