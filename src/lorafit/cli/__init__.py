"""Command-line interface: a thin layer over lorafit's public functions, one module per command group.

    lorafit train [--model DIR --data FILE --output DIR --config lora.yaml ...]   fine-tune (no args: the demo)
    lorafit plan --model DIR [--config lora.yaml]                                  what a config adapts and costs
    lorafit merge --model DIR --adapter DIR --output DIR                           write a merged checkpoint
    lorafit inspect ADAPTER_DIR                                                    what an adapter holds
    lorafit data FILE [--model DIR] [--show K] [--json]                            what training will see
    lorafit eval --model DIR [--adapter DIR] --data FILE [--generate] [--compare]  loss, accuracy, answers
    lorafit generate | chat --model DIR [--adapter DIR]                            try the result
    lorafit suggest | probe | sweep                                                how to configure LoRA
    lorafit tune --model DIR --data FILE --trials N [--storage URL]                search it with Optuna
    lorafit export ADAPTER --format gguf|vllm [--model DIR] --output PATH          for llama.cpp or vLLM
    lorafit check ADAPTER --for peft|vllm|llama.cpp|transformers                   what an engine cannot load

Exit codes: 0 success, 2 bad usage or input (nothing written), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import AdapterError, ConfigError, DataError, TrainingError
from . import adapter, advise, data, export, infer, serve, train, tune
from .common import require


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning that is exact to PEFT and tells "
                                     "you how to configure it. Exit codes: 0 ok, 2 bad input, 1 runtime failure.")
    parser.add_argument("--version", action="version", version=f"lorafit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    data.add_parsers(sub)
    adapter.add_parsers(sub)
    infer.add_parsers(sub)  # generate, chat
    advise.add_parsers(sub)  # suggest, probe, sweep
    tune.add_parser(sub)
    export.add_parsers(sub)  # export, check
    serve.add_parser(sub)
    return parser


# torchao (imported by transformers and lorafit.quant when installed) logs, at import, that its CUDA kernels cannot
# load on this machine, and torch logs its deprecated pytree registrations: noise for every command, not news
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        require(args.command, args.needs)
        return args.func(args)
    except (ConfigError, DataError, AdapterError) as e:
        return _fail(e, 2)
    except KeyboardInterrupt:
        print("lorafit: interrupted", file=sys.stderr)
        return 130
    except (TrainingError, RuntimeError, OSError) as e:  # the one place that turns failures into an exit code
        return _fail(e, 1)


def _fail(e: Exception, code: int) -> int:
    """Print the one error line. A torchrun worker then exits at once: its peers may be gone, and the destructors
    of a process group whose peers are gone can wait forever; what it wrote is complete (atomic writes)."""
    print(f"lorafit: error: {e}", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
