"""The transformers boundary: load a causal LM and its tokenizer, losses over labelled positions, and write a
merged checkpoint. transformers is imported inside the functions, so ``import lorafit`` never loads it.

A batch is ``{"input_ids", "attention_mask", "labels"}`` of shape (B, T) each; ``labels`` holds ``IGNORE`` where
no token is predicted (prompts, padding), as in transformers' own causal-LM loss.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .files import writing_dir

IGNORE = -100  # label value that cross-entropy skips (PyTorch's ignore_index default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(model_dir: Path, dtype: str = "float32"):
    """A transformers causal LM and its tokenizer from a local folder (no network)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
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


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only where a label is predicted: (N, V) logits, (N,) targets, and (B, K) which of the kept positions
    each row labels. The LM head runs on the K labelled positions instead of all T (transformers'
    ``logits_to_keep``), which for one-token answers saves most of the head's time and the (B, T, V) logits."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE
    cols = mask.any(0).nonzero().squeeze(1)  # (K,)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if _accepts_logits_to_keep(unwrap(model)):
        logits = model(**kwargs, logits_to_keep=cols).logits  # (B, K, V)
    else:
        logits = model(**kwargs).logits[:, :-1][:, cols]  # (B, K, V)
    sel = mask[:, cols]  # (B, K)
    return logits[sel], targets[:, cols][sel], sel


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (non-IGNORE) positions."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets)


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (the caller divides by the step's token count,
    so micro-batches and ranks with different numbers of tokens weigh each token equally)."""
    logits, targets, _ = labelled_logits(model, batch)  # (N, V), (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def merge_checkpoint(model_dir: str | Path, adapter_dir: str | Path, output: str | Path) -> Path:
    """Load the base, attach the adapter (checked first), merge in float32, and save_pretrained (safetensors)
    into a new folder, written beside the target and renamed at the end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import load, read_adapter
    from .model import merge

    output = Path(output)
    if output.exists():
        raise DataError(f"output folder {output} already exists; choose a new folder for the merged model")
    model_dir = check_model_dir(model_dir)
    read_adapter(adapter_dir)  # a broken adapter fails before the (slow) model load
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    merge(load(model, adapter_dir, name="default"))  # the folder's own adapter, not its subfolders
    with writing_dir(output, name_errors=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer still merges
    return output
