"""`lorafit plan`, `lorafit merge` and `lorafit inspect`: what a config costs, folding an adapter in, and what an
adapter holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import resolve_device
from ..errors import ConfigError
from ..hf import DTYPES
from ..lora_config import LoraConfig
from ..quant import FORMATS
from ..train.train_config import default_lora, setting_defaults
from .common import (
    add_device_flag,
    add_max_length_flag,
    add_model_flag,
    add_output_flag,
    device_line,
    positive_int,
    read_yaml,
    target_modules_arg,
    target_parameters_arg,
)
from .train import require_quant


def _default(name: str):
    return setting_defaults()[name]


def cmd_plan(args: argparse.Namespace) -> int:
    from ..advise.plan import plan_report
    from ..devices import resolve_device
    from ..train.train_config import default_dtype

    device, _ = resolve_device(args.device)  # the memory planned is that device's: GPU memory on CUDA
    settings = read_yaml(args.config) if args.config else {}
    lora = {**default_lora().to_dict(), **(settings.get("lora") or {})}
    flags = {"r": args.rank, "target_modules": args.target_modules, "target_parameters": args.target_parameters,
             "use_dora": args.use_dora or None}
    lora.update({field: value for field, value in flags.items() if value is not None})

    def pick(name: str):
        value = getattr(args, name)
        return value if value is not None else settings.get(name, _default(name))

    checkpointing = args.gradient_checkpointing or settings.get("gradient_checkpointing", False)
    quantize = pick("quantize")
    if quantize not in (None, *FORMATS):
        raise ConfigError(f"quantize={quantize!r} is invalid: expected {', '.join(FORMATS)} or null")
    dtype = args.dtype or settings.get("dtype") or default_dtype(demo=False, quantize=quantize, device=device)[0] \
        or _default("dtype")  # as lorafit train picks it on that device
    print(plan_report(args.model, LoraConfig.from_dict(lora), batch_size=pick("batch_size"),
                      max_length=pick("max_length"), dtype=dtype, gradient_checkpointing=checkpointing,
                      as_json=args.json, quantize=quantize, device=device))
    return 0


def merge_base(adapter: str, quantized: str | None) -> tuple[str | None, str, str]:
    """(format, dtype, why) of the base an adapter was trained over: what the run folder's config.yaml (written by
    lorafit train) records, or ``--quantized`` (dtype bfloat16, as lorafit train --quantize defaults to)."""
    run = Path(adapter) / "config.yaml"
    saved = read_yaml(str(run)) if run.is_file() else {}
    fmt, dtype = saved.get("quantize"), saved.get("dtype", "bfloat16")
    if run.is_file() and quantized and fmt != quantized:
        raise ConfigError(f"--quantized {quantized}, but {run} says the adapter trained over "
                          f"an {fmt or 'unquantized'} base (quantize: {fmt or 'null'}); drop --quantized")
    if fmt is not None and fmt not in FORMATS or dtype not in DTYPES:
        raise ConfigError(f"{run}: quantize={fmt!r} dtype={dtype!r} is not a lorafit run's; expected quantize one of "
                          f"{', '.join(FORMATS)} or null, dtype one of {', '.join(DTYPES)}")
    fmt = fmt or quantized
    why = f"{run} says quantize: {fmt}" if run.is_file() else f"--quantized {fmt}"
    return fmt, dtype, why


def cmd_merge(args: argparse.Namespace) -> int:
    from ..hf import merge_checkpoint

    device, device_why = resolve_device(args.device)  # an absent device: exit 2 before any work
    fmt, dtype, why = merge_base(args.adapter, args.quantized)
    require_quant("merge", fmt)
    print(device_line(device, why=device_why))  # the base's own dtype, unless quantized (the next line says)
    if fmt:
        print(f"merging into the dequantized {fmt} base the adapter was trained against ({why}; {fmt} made from "
              f"{dtype} weights), in float32; the checkpoint is float32")
    merge_checkpoint(args.model, args.adapter, args.output, quantized=fmt, dtype=dtype, device=device)
    print(f"merged checkpoint written to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..advise.adapter_summary import inspect_report

    print(inspect_report(args.adapter))
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show what a LoRA config adapts and what training will cost, without training")
    add_model_flag(p, "the base model to plan for", required=True)
    p.add_argument("--config", help="YAML with a 'lora:' section (as for train)")
    p.add_argument("--rank", type=positive_int, help="LoRA rank r (default: 8 or the config's)")
    p.add_argument("--target-modules", type=target_modules_arg, help="names, regex or all-linear "
                   "(default: q_proj,v_proj or the config's)")
    p.add_argument("--target-parameters", type=target_parameters_arg, help="parameters adapted directly: "
                   "'experts' (every MoE expert weight) or names (default: none or the config's)")
    p.add_argument("--use-dora", action="store_true", help="plan a DoRA adapter (default: off)")
    p.add_argument("--batch-size", type=positive_int, help="examples per micro-batch "
                   f"(default: {_default('batch_size')} or the config's)")
    add_max_length_flag(p, default=None, shown=f"{_default('max_length')} or the config's")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="base weights dtype (default: the config's, else what lorafit train picks on the device: "
                   "bfloat16 with --quantize or on a GPU with bf16 units, else float32)")
    p.add_argument("--quantize", choices=FORMATS, help="plan over an nf4/int8 base, as lorafit train --quantize "
                   "(default: the config's, else none)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="plan with activation recomputation "
                   "(default: off)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
    add_device_flag(p, "the device whose memory is planned (CUDA: GPU memory against its free memory)")
    p.set_defaults(func=cmd_plan, needs=("transformers", "yaml"))


def add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base model and write a transformers checkpoint")
    add_model_flag(p, "the base model the adapter was trained on", required=True)
    p.add_argument("--adapter", required=True, help="the adapter folder (lorafit or PEFT)")
    add_output_flag(p, "a new folder for the merged checkpoint (must not exist)", required=True)
    p.add_argument("--quantized", choices=FORMATS, help="the adapter was trained over an nf4/int8 base (QLoRA): merge "
                   "into that base, dequantized (default: what the run's config.yaml says, else no)")
    add_device_flag(p, "the base is loaded and the adapter merged there")
    p.set_defaults(func=cmd_merge, needs=("transformers", "yaml"))


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show an adapter's config, ranks, sizes and which layers moved most")
    p.add_argument("adapter", help="adapter folder (lorafit or PEFT)")
    p.set_defaults(func=cmd_inspect, needs=())


def add_parsers(sub) -> None:
    add_plan_parser(sub)
    add_merge_parser(sub)
    add_inspect_parser(sub)
