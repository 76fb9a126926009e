"""`lorafit export` and `lorafit check`: an adapter for llama.cpp (GGUF) or vLLM, and what an engine cannot load."""

from __future__ import annotations

import argparse

from .common import add_model_flag, add_output_flag, positive_int

FAMILY = "llama family: LlamaForCausalLM (Llama, SmolLM2), MistralForCausalLM, Qwen2ForCausalLM"


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_gguf, export_vllm

    if args.format == "gguf":
        if args.model is None:
            from ..errors import DataError
            raise DataError("lorafit export --format gguf needs --model DIR (the base model's folder, for its "
                            "architecture and head counts)")
        out = export_gguf(args.adapter, args.model, args.output, outtype=args.outtype, force=args.force)
    else:
        out = export_vllm(args.adapter, args.output, force=args.force, max_lora_rank=args.max_lora_rank)
    print(f"{args.format} adapter written to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..export import problems

    lines = problems(args.adapter, args.target, model=args.model, max_lora_rank=args.max_lora_rank)
    for line in lines:
        print(line)
    print(f"{args.adapter}: {'does not load' if lines else 'loads'} in {args.target}"
          + (f" ({len(lines)} problem{'s' if len(lines) > 1 else ''})" if lines else ""))
    return 1 if lines else 0


def add_parsers(sub) -> None:
    from ..export import OUTTYPES, TARGETS, VLLM_MAX_LORA_RANK

    p = sub.add_parser("export", help="write an adapter for llama.cpp (GGUF LoRA) or vLLM (a PEFT folder)",
                       description="Write an adapter for an inference engine, with lorafit's exact scaling (RSLoRA, "
                       f"alpha/rank patterns) folded into B. GGUF supports the {FAMILY}.")
    p.add_argument("adapter", help="adapter folder (lorafit or PEFT)")
    p.add_argument("--format", required=True, choices=["gguf", "vllm"], help="gguf: one llama.cpp LoRA file; "
                   "vllm: a PEFT folder vLLM scales correctly")
    add_model_flag(p, "the base model; gguf needs it, its config.json gives architecture, heads and shapes")
    add_output_flag(p, "the .gguf file (gguf) or a new folder (vllm)", required=True)
    p.add_argument("--outtype", choices=OUTTYPES, default="f32", help="GGUF tensor type (default: f32; q8_0 "
                   "falls back to f16 for tensors whose rows are not a multiple of 32, as llama.cpp does)")
    p.add_argument("--max-lora-rank", type=positive_int, default=VLLM_MAX_LORA_RANK,
                   help=f"vllm: the server's --max-lora-rank (default: {VLLM_MAX_LORA_RANK}, vLLM's)")
    p.add_argument("--force", action="store_true", help="replace an existing output (default: refuse)")
    p.set_defaults(func=cmd_export, needs=("gguf",))

    c = sub.add_parser("check", help="say what an engine cannot load from an adapter (exit 0 loads, 1 does not)",
                       description="One line per thing the target cannot load. Exit 0: it loads; 1: it does not; "
                       f"2: bad input. llama.cpp: the {FAMILY}.")
    c.add_argument("adapter", help="adapter folder (lorafit or PEFT)")
    c.add_argument("--for", dest="target", required=True, choices=TARGETS, help="the engine that will load it")
    add_model_flag(c, "the base model; llama.cpp checks its architecture and shapes too")
    c.add_argument("--max-lora-rank", type=positive_int, default=VLLM_MAX_LORA_RANK,
                   help=f"vllm: the server's --max-lora-rank (default: {VLLM_MAX_LORA_RANK}, vLLM's)")
    c.set_defaults(func=cmd_check, needs=())
