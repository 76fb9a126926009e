"""The transformers boundary: load a causal LM and its tokenizer, losses over labelled positions, and write a
merged checkpoint. transformers is imported inside the functions, so ``import lorafit`` never loads it.

A batch is ``{"input_ids", "attention_mask", "labels"}`` of shape (B, T) each; ``labels`` holds ``IGNORE`` where
no token is predicted (prompts, padding), as in transformers' own causal-LM loss.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .files import writing_dir

IGNORE = -100  # label value that cross-entropy skips (PyTorch's ignore_index default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512 BF16, Arm BF16 (/proc/cpuinfo)


def _cpu_flags() -> set[str]:
    """The feature flags of /proc/cpuinfo (x86 "flags", Arm "Features"); empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
            for w in line.split(":", 1)[1].split()}


def native_bf16(device: str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` multiplies bfloat16 in hardware (not by emulation), and what says so, in words.

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)``. CPU: the avx512_bf16 / amx_bf16 (x86) or
    bf16 (Arm) flag with oneDNN's bf16 path in torch. ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it
    names the vector ISA ("AVX512" with or without BF16), and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
    true on any AVX-512 CPU, where oneDNN emulates bf16 at ~1/40 of float32's speed (measured with
    ONEDNN_MAX_CPU_ISA=AVX2, which turns the bf16 units off and so counts as none).
    """
    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, ("the GPU has bf16 units" if ok else "the GPU has no bf16 units (compute capability < 8.0)")
    found = sorted(set(BF16_CPU_FLAGS) & _cpu_flags())
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if found and isa not in ("ALL", "DEFAULT") and not any(k in isa for k in ("BF16", "AMX", "FP16", "AVX10")):
        return False, f"the CPU has {'/'.join(found)} but ONEDNN_MAX_CPU_ISA={isa} turns it off"
    if found and torch.backends.mkldnn.is_available():
        return True, f"the CPU has {'/'.join(found)}"
    return False, "the CPU has no avx512_bf16/amx_bf16 (x86) or bf16 (Arm) instructions"


BF16_MIN_SPEEDUP = 1.25  # bf16 is picked for the user only where its matmuls time at least this much faster


@torch.no_grad()
def bf16_speed(n: int = 256, *, repeats: int = 5, budget_s: float = 0.05) -> float:
    """How fast bfloat16 matmuls run against float32 on this CPU (0.5: half as fast): the best of ``repeats``
    (n, n) @ (n, n) products per dtype, each dtype stopping after ``budget_s`` (5-10 ms in all where bf16
    runs in hardware, ~80 ms where it is emulated).

    The flags alone cannot tell: an Intel Xeon with avx512_bf16 but no AMX (as a VM may expose it) runs oneDNN's
    avx512_core_bf16 kernels slower than float32, so the default job ran slower in bfloat16 there, while an AMD EPYC
    with avx512_bf16 runs them about twice as fast as float32 (measured speeds and job times: docs/performance.md).
    """
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # the first call pays for oneDNN's kernel choice
        times, start = [], time.perf_counter()
        while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


def check_model_dir(path: str | Path) -> Path:
    """A local transformers checkpoint folder, or a DataError saying what it is not."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"model folder {path} is not a transformers checkpoint (no config.json); pass a folder "
                        "saved with save_pretrained")
    return path


def load_tokenizer(model_dir: Path):
    """The tokenizer of a local model folder; pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot load a tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, dtype: str = "float32", *, device: torch.device | str | None = None,
               attn_implementation: str | None = None):
    """A transformers causal LM and its tokenizer from a local folder (no network), its weights read straight onto
    ``device`` (default: the CPU) in ``dtype``, never as a float32 CPU copy first. ``attn_implementation`` is
    transformers' (sdpa, flash_attention_2, eager; default: transformers' choice)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    device = torch.device(device or "cpu")
    kwargs = {} if device.type == "cpu" else {"device_map": str(device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot load a causal LM and tokenizer from {model_dir}: {str(e).splitlines()[0]}") from None
    return model, tok


def use_chat_template(tokenizer, path: str | Path) -> None:
    """Give ``tokenizer`` the Jinja chat template in the file ``path`` (checked to parse first)."""
    import jinja2

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--chat-template {path} is not a readable text file ({e})") from None
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"--chat-template {path} is not a valid Jinja template: line {e.lineno}: {e.message}") \
            from None
    tokenizer.chat_template = text


def meta_model(model_dir: str | Path, dtype: str = "float32") -> nn.Module:
    """The model of a local transformers folder built from its config.json on the meta device: shapes only,
    instant, no weights read (planning a 7B model must not need 28 GB). A causal LM where the folder has one, else
    the base model (an encoder such as BERT)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(check_model_dir(model_dir))
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        except ValueError:  # an encoder (BERT, ...): no causal-LM class
            return AutoModel.from_config(config, dtype=DTYPES[dtype])


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def label_positions(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where a (B, T) batch of labels is labelled, as index tensors, computed where the labels are: on the host
    before a batch moves to its device (``to_device``), so that the step reads nothing back to find them.

    ``label_cols`` (K,) the positions any row labels; ``label_sel`` (B, K) which of them each row labels;
    ``label_index`` (N,) the labelled entries of the flattened (B·K) kept positions; ``label_targets`` (N,) their
    next tokens; ``label_first`` (B',) which of the N is each labelled row's first (its answer's first token).
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE
    cols = mask.any(0).nonzero().squeeze(1)  # (K,)
    sel = mask[:, cols]  # (B, K)
    first = (sel.cumsum(1).eq(1) & sel)[sel]  # (N,): a row's first labelled position
    return {"label_cols": cols, "label_sel": sel, "label_index": sel.reshape(-1).nonzero().squeeze(1),
            "label_targets": targets[:, cols][sel], "label_first": first.nonzero().squeeze(1)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch with its label positions (``label_positions``, found on the host), on ``device``: one copy
    per tensor, from pinned memory and without waiting on CUDA; the CPU keeps the batch as it is.

    A causal LM's batch padded on the right only (``collate``'s) goes without its attention mask: each position
    attends to itself and earlier ones, which are all real tokens, so every labelled position's logits are the same
    (bit for bit on the CPU's sdpa, measured), while transformers, given a mask, reads it back every forward to see
    whether it pads.
    """
    if "labels" in batch and "label_cols" not in batch:
        batch = {**batch, **label_positions(batch["labels"])}
    mask = batch.get("attention_mask")
    if mask is not None and mask.device.type == "cpu" and bool((mask[:, 1:] <= mask[:, :-1]).all()):  # right only
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    device = torch.device(device)
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a label is predicted: (N, V) logits, (N,) targets, and (B, K) which of the kept positions
    each row labels. The LM head runs on the K labelled positions instead of all T (transformers'
    ``logits_to_keep``), which for one-token answers saves most of the head's time and the (B, T, V) logits.
    A batch from ``to_device`` brings its label positions; any other batch has them found here."""
    if "label_cols" not in batch:
        batch = {**batch, **label_positions(batch["labels"])}
    cols = batch["label_cols"]
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    if _accepts_logits_to_keep(unwrap(model)):
        logits = model(**kwargs, logits_to_keep=cols).logits  # (B, K, V)
    else:
        logits = model(**kwargs).logits[:, :-1].index_select(1, cols)  # (B, K, V)
    logits = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["label_index"])  # (N, V)
    return logits, batch["label_targets"], batch["label_sel"]


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (non-IGNORE) positions."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets)


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (the caller divides by the step's token count,
    so micro-batches and ranks with different numbers of tokens weigh each token equally)."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def merge_checkpoint(model_dir: str | Path, adapter_dir: str | Path, output: str | Path, *,
                     quantized: str | None = None, dtype: str = "bfloat16",
                     device: torch.device | str | None = None) -> Path:
    """Load the base straight onto ``device`` (``devices.resolve_device``'s names; default: auto) in its checkpoint's
    dtype, attach the adapter (checked first), merge there (float32 math, rounded once into the base's dtype), and
    save_pretrained (safetensors, which copies device tensors to the host itself) into a new folder, written beside
    the target and renamed at the end. An absent device is a ConfigError before anything is read or written.

    ``quantized`` ("nf4", "int8"): the adapter was trained over a quantized base (QLoRA), so it is folded into the
    weights it was trained against, W = dequantize(quantize(W0)) + s·B·A (PEFT issues #1080, #2105): the base is
    loaded in ``dtype`` (the run's, which the quantized weights were made from and computed in), quantized as
    ``lorafit train --quantize`` does, dequantized, and cast to float32; the checkpoint is float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import resolve_device
    from .model import merge
    from .peft_format import load, read_adapter

    device, _ = resolve_device(None if device is None else str(device))
    on_device = {} if device.type == "cpu" else {"device_map": str(device)}
    output = Path(output)
    if output.exists():
        raise DataError(f"output folder {output} already exists; choose a new folder for the merged model")
    model_dir = check_model_dir(model_dir)
    read_adapter(adapter_dir)  # a broken adapter fails before the (slow) model load
    if quantized:
        from .quant import check_format, dequantize, quantize

        check_format(quantized)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], **on_device)
        quantize(model, quantized)
        dequantize(model)
        model.float()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", **on_device)
    merge(load(model, adapter_dir, name="default"))  # the folder's own adapter, not its subfolders
    with writing_dir(output, name_errors=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer still merges
    return output
