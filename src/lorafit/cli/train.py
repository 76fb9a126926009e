"""`lorafit train`: flags generated from TrainConfig's fields (and seven LoraConfig fields), merged over the
defaults and a --config YAML (``lorafit.train.settings``), then one call of ``lorafit.train.run``. probe, sweep and
tune take some of the same flags and settings (``add_run_flags``, ``run_settings``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Optional

from ..demo.task import DEFAULT_JOB
from ..errors import ConfigError
from ..lora_config import LoraConfig
from ..train.settings import resolve_settings
from ..train.train_config import SWITCH, TrainConfig, default_lora, field_help, settings, shown
from .common import (
    METAVARS,
    RUN_NEEDS,
    int_at_least,
    read_yaml,
    require,
    require_demo,
    target_modules_arg,
    target_parameters_arg,
)

# flag -> (LoraConfig field, argparse type; None: an on/off switch). Their help is the field's own.
LORA_FLAGS = {"--rank": ("r", int_at_least(1)), "--lora-alpha": ("lora_alpha", float),
              "--lora-dropout": ("lora_dropout", float), "--target-modules": ("target_modules", target_modules_arg),
              "--target-parameters": ("target_parameters", target_parameters_arg),
              "--use-dora": ("use_dora", None), "--use-rslora": ("use_rslora", None)}
RUN_FLAGS = ("model", "data", "batch_size", "max_length", "seed")  # TrainConfig settings probe, sweep and tune take


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _dest(field: str) -> str:
    return field.replace(".", "__")


def _flag_type(check):
    return int_at_least(check.low) if check.base is int else check.base


def _lora_help(name: str) -> str:
    f = next(f for f in dataclasses.fields(LoraConfig) if f.name == name)
    return f"{f.metadata['help']} (default: {shown(getattr(default_lora(), name))})"


def train_flags() -> list[tuple[str, str, dict]]:
    """(flag, "field" or "lora.field", argparse keyword arguments) for every setting of ``lorafit train``."""
    out = []
    for f in settings():
        check = f.metadata["check"]
        kw = dict(action=argparse.BooleanOptionalAction) if check is SWITCH else dict(type=_flag_type(check))
        flag = flag_name(f.name)
        kw.update({"metavar": METAVARS[flag]} if flag in METAVARS else {})  # as the other commands' (cli.common)
        out.append((flag, f.name, dict(kw, help=field_help(f, DEFAULT_JOB))))
    for flag, (name, typ) in LORA_FLAGS.items():
        kw = dict(action="store_const", const=True) if typ is None else dict(type=typ)
        out.append((flag, "lora." + name, dict(kw, help=_lora_help(name))))
    return out


def flag_table() -> str:
    """docs/cli.md's table of `lorafit train` flags, generated from the same fields as --help."""
    rows = ["| flag | setting |", "|---|---|"]
    for flag, _, kw in train_flags():
        shown = f"{flag}, --no-{flag[2:]}" if kw.get("action") is argparse.BooleanOptionalAction else flag
        rows.append(f"| `{shown}` | {kw['help'].replace('|', '/')} |")
    return "\n".join(rows)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a causal LM with LoRA (no arguments: the SmolLM2 sentiment demo)",
                       description="Fine-tune a causal LM with LoRA. Settings come from the defaults, then --config "
                                   "(YAML; LoRA fields under 'lora:'), then flags.")
    p.add_argument("--config", help="YAML file of settings (keys: the flag names with underscores)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint "
                   "(its config.yaml is used; a finished run does nothing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, log lines only (default: off)")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train, needs=RUN_NEEDS)


def _add_train_flags(p: argparse.ArgumentParser, names: Optional[tuple[str, ...]] = None) -> None:
    """`lorafit train`'s setting flags (only the ``names`` given), each unset (None) unless given (``given_flags``)."""
    for flag, field, kw in train_flags():
        if names is None or field in names:
            p.add_argument(flag, dest=_dest(field), default=None, **kw)


def add_run_flags(p: argparse.ArgumentParser, names: tuple[str, ...] = RUN_FLAGS) -> None:
    """--config and the named TrainConfig settings as flags, with `lorafit train`'s names, types and help: the
    settings of probe's, sweep's and tune's short runs (``run_settings``)."""
    p.add_argument("--config", help="YAML of training settings as for train; its 'lora:' section is ignored "
                   "(default: none)")
    _add_train_flags(p, names)


def given_flags(args: argparse.Namespace) -> dict:
    """{"field" or "lora.field": value} of the settings' flags given on the command line (of those the command
    has)."""
    given = {field: getattr(args, _dest(field), None) for _, field, _ in train_flags()}
    return {field: value for field, value in given.items() if value is not None}


def require_quant(command: str, fmt: Optional[str], strategy: str = "auto") -> None:
    """A quantized base needs torchao: refuse its absence before any work (``require``, only when ``fmt`` is set).
    Under torchrun it trains with DDP (each rank holds the whole quantized base, which is what NF4's 4 bits make
    small); FSDP2 is refused, because torchao's NF4 tensor shards only when every weight's scale blocks divide by
    the number of ranks, which small and oddly shaped layers miss."""
    if not fmt:
        return
    require(command, ("torchao",))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and strategy == "fsdp":
        raise ConfigError(f"--quantize {fmt} with --strategy fsdp under torchrun (WORLD_SIZE={world}) is not "
                          "supported: use --strategy ddp (or auto), where every rank holds the quantized base, or "
                          "drop --quantize to shard a bf16 base with FSDP2")


def train_settings(args: argparse.Namespace, *, lora: bool = True) -> tuple[dict, str]:
    """``resolve_settings`` of the --config file and the flags given: TrainConfig fields (defaults <- the demo job's
    when neither model nor data is set <- YAML <- flags) and the dtype note; ``lora=False`` ignores 'lora:'."""
    config = read_yaml(args.config) if args.config else {}
    return resolve_settings(config, given_flags(args), lora=lora)


def run_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields of probe's, sweep's and tune's runs: ``train_settings`` without the 'lora:' section (they
    choose the adapters) and without checkpoints (sweep points and tune trials are short; a finished one is the unit
    of resumption)."""
    settings_, _ = train_settings(args, lora=False)
    settings_["save_every"] = 0
    require_demo(args.command, settings_.get("model"))
    return settings_


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import run

    if args.resume:
        extra = [flag for flag, field, _ in train_flags() if getattr(args, _dest(field)) is not None]
        if extra or args.config:
            raise ConfigError(f"--resume continues the saved config.yaml; drop {(extra or ['--config'])[0]}")
        folder = Path(args.resume)
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"--resume {folder}: no config.yaml there; is it a lorafit run folder?")
        cfg = TrainConfig.from_dict(read_yaml(str(folder / "config.yaml")))
        cfg.output = str(folder)
        require_demo("train", cfg.model)
        require_quant("train", cfg.quantize, cfg.strategy)
        run(cfg, resume=True, quiet=args.quiet)
        return 0
    settings_, note = train_settings(args)
    cfg = TrainConfig.from_dict(settings_)
    require_demo("train", cfg.model)
    require_quant("train", cfg.quantize, cfg.strategy)
    run(cfg, quiet=args.quiet, notes=(note,) if note else ())
    return 0
