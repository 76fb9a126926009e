"""Command-line interface: a thin layer over lorafit's public functions.

    lorafit train [--model DIR --data FILE --output DIR --config lora.yaml ...]   fine-tune (no args: the demo)
    lorafit plan --model DIR [--config lora.yaml]                                  what a config adapts and costs
    lorafit merge --model DIR --adapter DIR --output DIR                           write a merged checkpoint
    lorafit inspect ADAPTER_DIR                                                    what an adapter holds
    lorafit suggest | probe | sweep                                                how to configure LoRA

Exit codes: 0 success, 2 bad usage or input (nothing written), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import ConfigError, LoraConfig

REGEX_CHARS = set("*|()[]\\^$+?{}")


def target_modules_arg(value: str):
    """'all-linear', a regex (if it has regex characters), or a comma-separated list of names."""
    if value.lower() == "all-linear" or REGEX_CHARS & set(value):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_at_least(value: str, low: int, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = low - 1
    if n < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return n


def _positive_int(value: str) -> int:
    return _int_at_least(value, 1, "a positive integer")


def _non_negative_int(value: str) -> int:
    return _int_at_least(value, 0, "an integer >= 0")


# flag -> (TrainConfig field or "lora.<field>", type, help)
TRAIN_FLAGS = {
    "--model": ("model", str, "local transformers causal-LM folder (default: the embedded SmolLM2-135M-Instruct)"),
    "--data": ("data", str, "JSONL or CSV with {text} or {prompt, completion} (default: the embedded sentiment task)"),
    "--output": ("output", str, "output folder (default: runs/<timestamp>)"),
    "--steps": ("steps", _positive_int, "optimizer steps (default: 100; the demo: 60)"),
    "--epochs": ("epochs", float, "passes over the training split; overrides --steps (default: unset)"),
    "--batch-size": ("batch_size", _positive_int, "examples per micro-batch, per process (default: 8)"),
    "--grad-accum": ("grad_accum", _positive_int, "micro-batches per optimizer step (default: 1)"),
    "--lr": ("lr", float, "AdamW peak learning rate (default: 1e-3; the demo: 2e-3)"),
    "--schedule": ("schedule", str, "learning-rate schedule after warm-up: cosine, linear, constant (default: cosine)"),
    "--warmup-steps": ("warmup_steps", _non_negative_int, "linear warm-up steps (default: 0)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default: 0)"),
    "--max-length": ("max_length", _positive_int, "tokens per example (default: 256; the demo: 96)"),
    "--seed": ("seed", _non_negative_int, "seed for init, data order, split and dropout (default: 0)"),
    "--eval-split": ("eval_split", float, "share of the data held out for evaluation (default: 0.1)"),
    "--eval-every": ("eval_every", _non_negative_int, "evaluate every N steps; 0 = before and after only (default: 0)"),
    "--save-every": ("save_every", _non_negative_int, "checkpoint every N steps; 0 = never (default: 0; the demo: 20)"),
    "--dtype": ("dtype", str, "base weights dtype: float32, bfloat16, float16 (default: float32)"),
    "--strategy": ("strategy", str, "under torchrun: ddp, fsdp or auto (DDP when a weight copy fits) (default: auto)"),
    "--dist-timeout": ("dist_timeout", float, "seconds a collective waits for a dead peer before failing "
                       "(default: 300)"),
    "--rank": ("lora.r", _positive_int, "LoRA rank r (default: 8)"),
    "--lora-alpha": ("lora.lora_alpha", float, "LoRA alpha; scaling = alpha/r (default: 16)"),
    "--lora-dropout": ("lora.lora_dropout", float, "dropout on the LoRA input (default: 0)"),
    "--target-modules": ("lora.target_modules", target_modules_arg,
                         "comma-separated names, a regex, or all-linear (default: q_proj,v_proj)"),
}
TRAIN_SWITCHES = {
    "--use-dora": ("lora.use_dora", "DoRA: learn a magnitude per output row (default: off)"),
    "--use-rslora": ("lora.use_rslora", "RSLoRA scaling alpha/sqrt(r) (default: off)"),
    "--gradient-checkpointing": ("gradient_checkpointing", "recompute activations in backward (default: off)"),
}


def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2 floats, so that 1e-3 is a number and not the string "1e-3"."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, e.g. 'steps: 100' and 'lora:' with "
                          "LoRA fields")
    return data


def train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig fields: defaults of the demo job (when no model/data is given) <- YAML <- flags."""
    from .tasks import DEFAULT_JOB

    yaml_cfg = read_yaml(args.config) if args.config else {}
    if "lora" in yaml_cfg and not isinstance(yaml_cfg["lora"], dict):
        raise ConfigError("'lora:' in the config file must be a mapping of LoraConfig fields")
    given = {field: getattr(args, dest) for dest, field in _FLAG_DESTS.items() if getattr(args, dest) is not None}
    demo = not any(k in yaml_cfg or k in given for k in ("model", "data"))
    settings: dict = {}
    lora: dict = {}
    for layer in ([DEFAULT_JOB] if demo else []) + [yaml_cfg]:
        for k, v in layer.items():
            if k == "lora":
                lora.update(v)
            else:
                settings[k] = v
    if not demo:
        lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    for field, value in given.items():
        if field.startswith("lora."):
            lora[field[5:]] = value
        else:
            settings[field] = value
    settings["lora"] = lora
    return settings


_FLAG_DESTS: dict[str, str] = {}


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a causal LM with LoRA (no arguments: the SmolLM2 sentiment demo)",
                       description="Fine-tune a causal LM with LoRA. Settings come from the defaults, then --config "
                                   "(YAML; LoRA fields under 'lora:'), then flags.")
    p.add_argument("--config", help="YAML file of settings (keys: the flag names with underscores)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint "
                   "(its config.yaml is used; a finished run does nothing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, log lines only (default: off)")
    for flag, (field, typ, text) in TRAIN_FLAGS.items():
        dest = flag[2:].replace("-", "_")
        _FLAG_DESTS[dest] = field
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)
    for flag, (field, text) in TRAIN_SWITCHES.items():
        dest = flag[2:].replace("-", "_")
        _FLAG_DESTS[dest] = field
        p.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=text)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, run

    if args.resume:
        extra = [k for k in _FLAG_DESTS if getattr(args, k) is not None]
        if extra or args.config:
            raise ConfigError(f"--resume continues the saved config.yaml; drop --{(extra or ['config'])[0].replace('_', '-')}")
        folder = Path(args.resume)
        if not (folder / "config.yaml").is_file():
            raise ConfigError(f"--resume {folder}: no config.yaml there; is it a lorafit run folder?")
        cfg = TrainConfig.from_dict(read_yaml(str(folder / "config.yaml")))
        cfg.output = str(folder)
        run(cfg, resume=True, quiet=args.quiet)
        return 0
    cfg = TrainConfig.from_dict(train_settings(args))
    run(cfg, quiet=args.quiet)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import plan_report

    settings = read_yaml(args.config) if args.config else {}
    lora = dict(settings.get("lora") or {})
    for field, value in (("r", args.rank), ("target_modules", args.target_modules), ("use_dora", args.use_dora or None)):
        if value is not None:
            lora[field] = value
    lora = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora}
    pick = lambda flag, key, default: flag if flag is not None else settings.get(key, default)  # noqa: E731
    print(plan_report(args.model, LoraConfig.from_dict(lora), batch_size=pick(args.batch_size, "batch_size", 8),
                      max_length=pick(args.max_length, "max_length", 256), dtype=pick(args.dtype, "dtype", "float32"),
                      gradient_checkpointing=args.gradient_checkpointing or settings.get("gradient_checkpointing", False),
                      as_json=args.json))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge_cli import merge_checkpoint

    merge_checkpoint(args.model, args.adapter, args.output)
    print(f"merged checkpoint written to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_cli import inspect_report

    print(inspect_report(args.adapter))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning that is exact to PEFT and tells "
                                     "you how to configure it. Exit codes: 0 ok, 2 bad input, 1 runtime failure.")
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)

    p = sub.add_parser("plan", help="show what a LoRA config adapts and what training will cost, without training")
    p.add_argument("--model", required=True, help="local transformers model folder")
    p.add_argument("--config", help="YAML with a 'lora:' section (as for train)")
    p.add_argument("--rank", type=_positive_int, help="LoRA rank r (default: 8 or the config's)")
    p.add_argument("--target-modules", type=target_modules_arg, help="names, regex or all-linear "
                   "(default: q_proj,v_proj or the config's)")
    p.add_argument("--use-dora", action="store_true", help="plan a DoRA adapter (default: off)")
    p.add_argument("--batch-size", type=_positive_int, help="examples per micro-batch (default: 8 or the config's)")
    p.add_argument("--max-length", type=_positive_int, help="tokens per example (default: 256 or the config's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="base weights dtype (default: float32 or the config's)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="plan with activation recomputation "
                   "(default: off)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="fold an adapter into its base model and write a transformers checkpoint")
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="the adapter folder (lorafit or PEFT)")
    p.add_argument("--output", required=True, help="new folder for the merged checkpoint (must not exist)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show an adapter's config, ranks, sizes and which layers moved most")
    p.add_argument("adapter", help="adapter folder (lorafit or PEFT)")
    p.set_defaults(func=cmd_inspect)

    from .cli_guidance import add_guidance_parsers
    add_guidance_parsers(sub)  # suggest, probe, sweep
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .io import AdapterError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, DataError, AdapterError) as e:
        print(f"lorafit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorafit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into an exit code
        from .train import TrainingError

        if isinstance(e, (TrainingError, RuntimeError, OSError)):
            print(f"lorafit: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
