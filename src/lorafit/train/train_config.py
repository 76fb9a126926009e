"""TrainConfig: every setting of a training run, defined once.

Each field carries its default, its help text and its check (``setting(...)``); validation runs the checks as a
table, the CLI generates its flags from the fields, and ``flag_table()`` renders docs/cli.md's table, so the three
cannot drift. ``config.yaml`` in a run folder is this dataclass (``lorafit train --config`` takes it back).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import devices
from ..errors import ConfigError
from ..hf import BF16_MIN_SPEEDUP, DTYPES, bf16_speed, native_bf16
from ..lora_config import LoraConfig
from ..quant import FORMATS
from .trackers import TRACKERS, parse_report_to

SCHEDULES = ("cosine", "linear", "constant")
ATTENTION = ("sdpa", "flash_attention_2", "eager")  # transformers' attn_implementation names
STRATEGIES = ("auto", "ddp", "fsdp")

# The stems of the help of --model, --output, --max-length and --device: every command's flag of that name starts
# with its stem (``lorafit.cli.common`` builds the others' and adds their clause after ": "), these fields' help
# included
MODEL_HELP = "local transformers causal-LM folder"
OUTPUT_HELP = "output path"
MAX_LENGTH_HELP = "tokens per example"
DEVICE_HELP = ("where to run: auto (cuda:LOCAL_RANK under torchrun, else cuda, else mps, else cpu), cpu, cuda, "
               "cuda:N or mps")


@dataclass(frozen=True)
class Check:
    """What a setting accepts: ``ok(value)``, the words for it, and the type its flag's text is read as (ints
    have a lower bound that the flag parser enforces)."""

    ok: Callable[[Any], bool]
    expected: str
    base: type = str
    low: Optional[int] = None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Check(lambda v: _int(v) and v > 0, "a positive integer", int, 1)
COUNT = Check(lambda v: _int(v) and v >= 0, "an integer >= 0", int, 0)
NON_NEGATIVE = Check(lambda v: _number(v) and v >= 0, "a finite number >= 0", float)
SWITCH = Check(lambda v: isinstance(v, bool), "true or false", bool)
PATH = Check(lambda v: v is None or isinstance(v, str), "a path")


def _trackers_ok(value) -> bool:
    parse_report_to(value)  # its own ConfigError names the unknown tracker and the choices
    return True


def one_of(choices) -> Check:
    return Check(lambda v: v in choices, f"one of {', '.join(choices)}")


def setting(default, help: str, check: Check, *, show_default: bool = True):
    """A TrainConfig field: its default, one line of help (the flag's and docs/cli.md's), and its check."""
    return field(default=default, metadata={"help": help, "check": check, "show_default": show_default})


def default_lora() -> LoraConfig:
    """The LoRA adapter of a run that names none: q,v at r=8, alpha=16 (LoRA §7.1: W_q and W_v together)."""
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    """Everything a run needs; every value is checked at construction (``ConfigError`` names the field)."""

    model: Optional[str] = setting(None, f"{MODEL_HELP} (default: the embedded SmolLM2-135M-Instruct)", PATH,
                                   show_default=False)
    data: Optional[str] = setting(None, "JSONL or CSV with {text} or {prompt, completion} (default: the embedded "
                                  "sentiment task)", PATH, show_default=False)
    output: Optional[str] = setting(None, f"{OUTPUT_HELP}: the run folder (default: runs/<timestamp>)", PATH,
                                    show_default=False)
    steps: int = setting(100, "optimizer steps (ignored when --epochs is set)", POSITIVE_INT)
    epochs: Optional[float] = setting(None, "passes over the training split; overrides --steps",
                                      Check(lambda v: v is None or (_number(v) and v > 0), "a positive number",
                                            float))
    batch_size: int = setting(8, "examples per micro-batch, per process", POSITIVE_INT)
    grad_accum: int = setting(1, "micro-batches per optimizer step", POSITIVE_INT)
    lr: float = setting(1e-3, "AdamW peak learning rate; LoRA tolerates ~10x full fine-tuning's (LoRA §5)",
                        Check(lambda v: _number(v) and 0 < v < 1, "a number in (0, 1), e.g. 1e-3", float))
    schedule: str = setting("cosine", "learning-rate schedule after warm-up: " + ", ".join(SCHEDULES),
                            one_of(SCHEDULES))
    warmup_steps: int = setting(0, "linear warm-up steps", COUNT)
    warmup_ratio: float = setting(0.0, "linear warm-up as a share of the steps, as transformers' (a non-zero "
                                  "warmup_steps wins)",
                                  Check(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", float))
    weight_decay: float = setting(0.0, "AdamW weight decay", NON_NEGATIVE)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping", NON_NEGATIVE)
    max_length: int = setting(256, f"{MAX_LENGTH_HELP}: prompts are cut from the left", POSITIVE_INT)
    seed: int = setting(0, "seed for init, data order, split and dropout", COUNT)
    eval_split: float = setting(0.1, "share of the data held out for evaluation",
                                Check(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)", float))
    eval_max: Optional[int] = setting(500, "at most this many eval examples",
                                      Check(lambda v: v is None or (_int(v) and v >= 1),
                                            "a positive integer or null", int, 1))
    eval_every: int = setting(0, "evaluate every N steps; 0 = before and after training only", COUNT)
    save_every: int = setting(0, "checkpoint every N steps; 0 = never", COUNT)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward", SWITCH)
    dtype: str = setting("float32", "base weights dtype: " + ", ".join(DTYPES) + "; when unset, bfloat16 with "
                         "--quantize and in the default job on a CPU with bf16 instructions whose bf16 matmuls time >= "
                         f"{BF16_MIN_SPEEDUP}x float32's",
                         one_of(tuple(DTYPES)))
    quantize: Optional[str] = setting(None, "store the frozen base linears as " + " or ".join(FORMATS) + " (QLoRA, "
                                      "via torchao; the adapter stays float32)",
                                      Check(lambda v: v is None or v in FORMATS, ", ".join(FORMATS) + " or null"))
    device: str = setting("auto", DEVICE_HELP, Check(devices.is_device_name, devices.CHOICES))
    attn_implementation: Optional[str] = setting(None, "transformers' attention kernel: " + ", ".join(ATTENTION)
                                                 + " (default: transformers' choice, sdpa where it runs)",
                                                 Check(lambda v: v is None or v in ATTENTION,
                                                       ", ".join(ATTENTION) + " or null"), show_default=False)
    report_to: str = setting("none", "send the metrics, settings and files to experiment trackers: "
                             + ", ".join(TRACKERS) + " (comma-separated for several) or none",
                             Check(_trackers_ok, "none, or " + ", ".join(TRACKERS) + " (comma-separated)"))
    log_every: int = setting(10, "read the loss and gradient norm back from the device every N steps (and before "
                             "every eval and checkpoint); every step still gets its metrics line", POSITIVE_INT)
    add_eos: bool = setting(True, "append EOS to completions and texts", SWITCH)
    group_by_length: bool = setting(True, "batch examples of similar length together (less padding)", SWITCH)
    pack: bool = setting(False, "text data only: concatenate the examples and cut them into full blocks of "
                         "max_length tokens (no padding)", SWITCH)
    train_on_prompt: bool = setting(False, "take the loss on every token, not only on completions and assistant "
                                    "turns", SWITCH)
    chat_template: Optional[str] = setting(None, "a Jinja chat template file for conversations, replacing (or "
                                           "supplying) the tokenizer's", PATH, show_default=False)
    strategy: str = setting("auto", "under torchrun: ddp, fsdp or auto (DDP when a weight copy fits, else FSDP2)",
                            Check(lambda v: v in STRATEGIES, "auto, ddp or fsdp"))
    dist_timeout: float = setting(300, "seconds a collective waits for a dead peer before the job fails",
                                  Check(lambda v: _number(v) and v > 0, "a positive number of seconds", float))
    lora: LoraConfig = field(default_factory=default_lora, metadata={"help": "the adapter: LoraConfig fields "
                                                                     "under 'lora:'"})

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraConfig.from_dict(self.lora, strict=True)
        for f in settings():
            value = getattr(self, f.name)
            if f.metadata["check"] is PATH and isinstance(value, str) and value.startswith("~"):
                value = os.path.expanduser(value)  # ~/models/x in a YAML file, as the shell expands it on a flag
                setattr(self, f.name, value)
            if not f.metadata["check"].ok(value):
                raise ConfigError(f"{f.name}={value!r} is invalid: expected {f.metadata['check'].expected}")
        if self.max_length < 2:  # a positive integer, but no room for a prediction
            raise ConfigError(f"max_length={self.max_length!r} is invalid: an example needs at least 2 tokens")

    def warmup(self, total: int) -> int:
        """Warm-up steps of a ``total``-step run: ``warmup_steps``, else ``warmup_ratio`` of the steps rounded up
        (transformers' rule: a non-zero ``warmup_steps`` wins over the ratio)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * total)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in settings()}
        d["lora"] = self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError("a training config must be a mapping of setting names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(map(repr, unknown))}; allowed: "
                              f"{', '.join(sorted(known))} (LoRA settings go under 'lora:')")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(str(e)) from None


def default_dtype(*, demo: bool, quantize: Optional[str], device="cpu") -> tuple[Optional[str], str]:
    """The base dtype of a run on ``device`` whose settings name none, and one line saying why; (None, "") keeps
    TrainConfig's float32.

    With ``quantize``: bfloat16, QLoRA's recipe (NF4 storage, bf16 compute; Dettmers et al. 2023, §3). On CUDA:
    bfloat16 where the GPU has bf16 units (``torch.cuda.is_bf16_supported(including_emulation=False)``), else
    float32, whose matmuls then run in TF32 (the loop sets ``torch.set_float32_matmul_precision("high")``), as
    transformers' Trainer and Axolotl default to on Ampere and later. On MPS: float32 unless asked. On the CPU, the
    default job: bfloat16 on a CPU with bf16 instructions whose bf16 matmuls also time at least ``BF16_MIN_SPEEDUP`` x
    float32's (``hf.bf16_speed``, 5-10 ms), float32 elsewhere. Both halves matter: an EPYC with avx512_bf16 ran the
    job at the same accuracy in about half float32's time, an Intel Xeon with avx512_bf16 but no AMX took longer in
    bfloat16 (its bf16 matmuls run slower than float32's), and without bf16 instructions bf16 is emulated
    (docs/performance.md). A torchrun launch (WORLD_SIZE > 1) stays float32: every rank parses the settings, and
    timings could disagree.
    """
    if quantize:
        return "bfloat16", (f"dtype bfloat16: {quantize} base weights with bfloat16 compute, QLoRA's recipe "
                            "(--dtype float32 computes in float32)")
    device = torch.device(device)
    if device.type == "cuda":
        native, why = native_bf16("cuda")
        if native:
            return "bfloat16", f"dtype bfloat16: {why} (--dtype float32 for float32 with TF32 matmuls)"
        return "float32", f"dtype float32 with TF32 matmuls: {why}"
    if not demo or device.type != "cpu":
        return None, ""
    native, why = native_bf16("cpu")
    if not native:
        return "float32", f"dtype float32: {why}, so bfloat16 would be emulated and slower"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a timing per rank could differ between ranks
        return "float32", (f"dtype float32: {why}, but under torchrun each rank would time bf16 separately and the "
                           "ranks could pick different dtypes (--dtype bfloat16 for the bfloat16 run)")
    speed = bf16_speed()
    if speed >= BF16_MIN_SPEEDUP:
        return "bfloat16", (f"dtype bfloat16: {why} and its bf16 matmuls run {speed:.2g}x as fast as float32 "
                            "(timed now); the default job reaches float32's accuracy in bfloat16 (--dtype float32 "
                            "for the float32 run)")
    why_not = "so float32 is faster" if speed < 1 else f"under the {BF16_MIN_SPEEDUP}x that bfloat16 needs here"
    return "float32", (f"dtype float32: {why}, but its bf16 matmuls run only {speed:.2g}x as fast as float32 (timed "
                       f"now), {why_not} (--dtype bfloat16 for the bfloat16 run)")


def settings() -> list[dataclasses.Field]:
    """The plain settings of TrainConfig (every field but ``lora``), in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if f.name != "lora"]


def setting_defaults() -> dict:
    """{name: default} of the plain settings (``settings``): what an unnamed setting trains with."""
    return {f.name: f.default for f in settings()}


def shown(value) -> str:
    """A setting's value as help text and YAML spell it (true, 0.001, q_proj,v_proj, unset)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return ",".join(value) if isinstance(value, list) else str(value)


def field_help(f: dataclasses.Field, demo: Optional[dict] = None) -> str:
    """One setting's help line with its default (and the demo job's value, where it differs)."""
    text = f.metadata["help"]
    if not f.metadata["show_default"]:
        return text
    extra = f"; the demo: {shown(demo[f.name])}" if demo and f.name in demo and demo[f.name] != f.default else ""
    return f"{text} (default: {shown(f.default)}{extra})"
