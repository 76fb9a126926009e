"""What every command shares: argument types, YAML in and out, and the check for optional dependencies."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from ..errors import ConfigError, MissingExtraError

REGEX_CHARS = set("*|()[]\\^$+?{}")

# import name -> (pip package, lorafit extra that brings it)
EXTRAS = {"transformers": ("transformers", "cli"), "yaml": ("pyyaml", "cli"), "tqdm": ("tqdm", "cli"),
          "matplotlib": ("matplotlib", "cli"), "gguf": ("gguf", "cli"), "accelerate": ("accelerate", "cli"),
          "optuna": ("optuna", "tune"), "torchao": ("torchao", "quant")}
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
