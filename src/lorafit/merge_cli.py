"""`lorafit merge`: base model + adapter -> a plain transformers checkpoint with the adapter folded in."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .data import DataError


def merge_checkpoint(model_dir: str | Path, adapter_dir: str | Path, output: str | Path) -> Path:
    """Load the base, attach the adapter (checked first), merge in float32, and save_pretrained (safetensors)
    into a new folder, written beside the target and renamed at the end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import load, read_adapter
    from .model import merge

    model_dir, output = Path(model_dir), Path(output)
    if output.exists():
        raise DataError(f"output folder {output} already exists; choose a new folder for the merged model")
    if not (model_dir / "config.json").is_file():
        raise DataError(f"model folder {model_dir} is not a transformers checkpoint (no config.json)")
    read_adapter(adapter_dir)  # a broken adapter fails before the (slow) model load
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    merge(load(model, adapter_dir))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer still merges
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
