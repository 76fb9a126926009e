"""LoraConfig: the typed, validated description of a LoRA adapter.

Field names and defaults follow PEFT's ``LoraConfig`` so that users' habits and ``adapter_config.json`` files carry
over. JSON/YAML are only serializations of this dataclass.

Papers: LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685), RSLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732), DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .errors import ConfigError
from .files import read_json, write_text

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")
BIAS_CHOICES = ("none", "all", "lora_only")

# Keys PEFT writes into adapter_config.json that carry no meaning for a LoRA adapter's math, or that describe
# features lorafit does not implement. At their PEFT default (None, False, {}, [], ...) they are ignored silently;
# a non-default value is ignored with a warning, because the adapter may then behave differently than in PEFT.
_PEFT_METADATA = {"peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping", "peft_version",
                  "inference_mode", "megatron_core", "lorafit_version"}
_PEFT_DEFAULTS = {"qalora_group_size": 16}  # non-empty PEFT defaults of unsupported features




def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"LoraConfig.{name}={value!r} is invalid: {allowed}.")


@dataclass
class LoraConfig:
    """Hyperparameters of a LoRA adapter: ``h = W0·x + s·B·A·x`` with ``s = lora_alpha / r``.

    Defaults match PEFT. Every value is checked at construction; a bad one raises ``ConfigError`` (a ValueError).
    """

    r: int = field(default=8, metadata={"help": "rank of ΔW = B·A; LoRA §4.1 / §7.2: tiny ranks (1-8) already "
        "suffice for many tasks"})
    lora_alpha: float = field(default=8, metadata={"help": "numerator of the scaling s = alpha / r (LoRA §4.1); "
        "fixed so lr needn't be retuned per r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input only (QLoRA "
        "practice; 0.05-0.1 for small data)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "names (suffix match), a "
        "regex (fullmatch), 'all-linear'"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "same rules as "
        "target_modules, applied first"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "only adapt these "
        "layer indices"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "the name of the layer "
        "list, e.g. 'layers' or 'h'"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "regex on module name -> rank, "
        "first match wins"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "regex on module name -> alpha, "
        "first match wins"})
    bias: str = field(default="none", metadata={"help": "'none' | 'all' (train every bias) | 'lora_only' (train "
        "biases of adapted modules)"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "modules trained in full and saved "
        "with the adapter (e.g. heads)"})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "weight stored as (in, out); set automatically for "
        "transformers Conv1D (GPT-2)"})
    init_lora_weights: Union[bool, str] = field(default=True, metadata={"help": "True: A kaiming-uniform, B=0 | "
        "'gaussian' | False | 'pissa' | 'olora'"})
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r) (RSLoRA, Kalajdzievski 2023, Thm "
        "3.2): stable across ranks"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA: learn a magnitude per output "
        "row (DoRA, Liu et al. 2024, §4)"})
    target_parameters: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "parameters adapted "
        "directly (suffix match), e.g. MoE experts' 'mlp.experts.gate_up_proj'; 'experts': every expert weight"})

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            _fail("r", self.r, "the rank must be a positive integer, e.g. 8 or 16")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            _fail("lora_alpha", self.lora_alpha, "alpha must be a positive number, e.g. 16 (often 2*r)")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "dropout must be a number in [0, 1), e.g. 0.05")
        self.target_parameters = _check_parameters(self.target_parameters)
        self.target_modules = _check_names("target_modules", self.target_modules,
                                           allow_empty=self.target_parameters is not None)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules)
        self._check_layers()
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, integer=True)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, integer=False)
        if self.bias not in BIAS_CHOICES:
            _fail("bias", self.bias, f"allowed values are {', '.join(map(repr, BIAS_CHOICES))}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple)) or \
                    not all(isinstance(m, str) and m for m in self.modules_to_save):
                _fail("modules_to_save", self.modules_to_save, "expected a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        for flag in ("fan_in_fan_out", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "expected true or false")
        if self.target_parameters is not None:
            self._check_parameter_variant()
        init = self.init_lora_weights
        # not ``init in INIT_CHOICES`` alone: 0 == False and 1 == True would let 0 through, and 0 initialises as True
        if not (isinstance(init, bool) or (isinstance(init, str) and init in INIT_CHOICES)):
            _fail("init_lora_weights", init, "allowed values are True, False, 'gaussian', 'pissa', 'olora'")

    def _check_layers(self) -> None:
        lt, lp = self.layers_to_transform, self.layers_pattern
        if lt is not None:
            items = [lt] if isinstance(lt, int) else lt
            if isinstance(lt, bool) or not isinstance(items, (list, tuple)) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                _fail("layers_to_transform", lt, "expected a non-negative layer index or a list of them")
            self.layers_to_transform = lt if isinstance(lt, int) else list(lt)
            if isinstance(self.target_modules, str):
                _fail("layers_to_transform", lt, "it cannot be combined with a string target_modules "
                      f"({self.target_modules!r}); list the module names instead, e.g. ['q_proj', 'v_proj']")
        if lp is not None:
            items = [lp] if isinstance(lp, str) else lp
            if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) and p for p in items):
                _fail("layers_pattern", lp, "expected the name of the layer list, e.g. 'layers' or 'h'")
            if isinstance(self.target_modules, str):
                _fail("layers_pattern", lp, "it cannot be combined with a string target_modules")
            if lt is None:
                _fail("layers_pattern", lp, "it needs layers_to_transform to say which layer indices to adapt")

    def _check_parameter_variant(self) -> None:
        """What an adapter on a parameter cannot be (as in PEFT's ParamWrapper, so that every file loads there)."""
        if self.lora_dropout:
            _fail("lora_dropout", self.lora_dropout, "target_parameters take no dropout (PEFT refuses it there too, "
                  "so such an adapter would not load in PEFT); set lora_dropout: 0")
        if self.use_dora:
            _fail("use_dora", self.use_dora, "DoRA is not supported on target_parameters (nor in PEFT); train LoRA "
                  "on the expert weights, or put DoRA on target_modules in a separate adapter")
        if self.init_lora_weights in ("pissa", "olora"):
            _fail("init_lora_weights", self.init_lora_weights, "a weight-based init is not supported with "
                  "target_parameters; use True or 'gaussian'")

    # --- serialization -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> "LoraConfig":
        """Build from a mapping. ``strict``: unknown keys are an error (user configs); otherwise a PEFT
        adapter_config.json is read, ignoring its metadata and warning about unsupported non-default keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"a LoRA config must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in known]
        if strict and unknown:
            raise ConfigError(f"unknown LoraConfig field(s) {', '.join(map(repr, unknown))}; "
                              f"allowed fields: {', '.join(sorted(known))}")
        if not strict:
            peft_type = data.get("peft_type", "LORA")
            if str(peft_type).upper() != "LORA":
                raise ConfigError(f"peft_type={peft_type!r} is not a LoRA adapter; lorafit reads peft_type 'LORA' only")
            ignored = [k for k in unknown if k not in _PEFT_METADATA and data[k] not in (None, False, {}, [], "")
                       and data[k] != _PEFT_DEFAULTS.get(k)]
            if ignored:
                warnings.warn(f"ignoring adapter config keys lorafit does not support: {', '.join(ignored)}",
                              stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("rank_pattern") is None:
            kwargs.pop("rank_pattern", None)
        if kwargs.get("alpha_pattern") is None:
            kwargs.pop("alpha_pattern", None)
        return cls(**kwargs)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            write_text(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path_or_text: Union[str, Path], strict: bool = False) -> "LoraConfig":
        """Read a JSON file (e.g. a PEFT adapter_config.json) or a JSON string; ConfigError when either is broken."""
        text = str(path_or_text)
        if not text.lstrip().startswith(("{", "[")):  # "[": JSON text of the wrong type, not a file name
            return cls.from_dict(read_json(Path(path_or_text), error=ConfigError), strict=strict)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON ({e}); fix or regenerate it") from None
        return cls.from_dict(data, strict=strict)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


EXPERTS = "experts"  # target_parameters shorthand: every weight of every experts module


def _check_parameters(value: Any) -> Any:
    """target_parameters: None, the shorthand 'experts', or a non-empty list of parameter names (PEFT: a list)."""
    if value is None or value == EXPERTS:
        return value
    if isinstance(value, (list, tuple)) and not value:  # PEFT writes [] for "none"
        return None
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    _fail("target_parameters", value, f"expected a list of parameter names, e.g. ['mlp.experts.gate_up_proj', "
          f"'mlp.experts.down_proj'], or {EXPERTS!r} for every expert weight")


def _check_names(name: str, value: Any, allow_empty: bool = False) -> Any:
    if value is None:
        return None
    if allow_empty and isinstance(value, (list, tuple)) and not value:
        return []
    if isinstance(value, str):
        if not value:
            _fail(name, value, "expected module names, a regex, or 'all-linear'")
        if value.lower() != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                _fail(name, value, f"not a valid regular expression ({e})")
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        if not value:
            _fail(name, value, "the list is empty; give module names such as ['q_proj', 'v_proj']")
        return sorted(value) if isinstance(value, set) else list(value)
    _fail(name, value, "expected a list of module names, a regex string, or 'all-linear'")


def _check_pattern(name: str, value: Any, integer: bool) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(name, value, "expected a mapping of module-name regex to value, e.g. {'q_proj': 16}")
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            _fail(name, value, f"key {key!r} must be a non-empty regex string")
        try:
            re.compile(key)
        except re.error as e:
            _fail(name, value, f"key {key!r} is not a valid regular expression ({e})")
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or v <= 0 or (not integer and not math.isfinite(v)):
            kind = "a positive integer rank" if integer else "a positive alpha"
            _fail(name, value, f"the value for {key!r} must be {kind}, got {v!r}")
    return dict(value)
