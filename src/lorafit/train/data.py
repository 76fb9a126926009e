"""Training data: read JSONL/CSV examples, tokenize them, and batch them.

An example is either ``{"text": ...}`` (language-model loss on every token) or ``{"prompt": ..., "completion": ...}``
(loss on the completion tokens only). Bad files raise ``DataError`` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import ConfigError, DataError
from ..hf import IGNORE




def _check(example: object, where: str) -> dict:
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object with \"text\" or \"prompt\" and \"completion\", "
                        f"got {type(example).__name__}")
    for key in ("text", "prompt", "completion"):
        value = example.get(key)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON allows "\ud800"; tokenizers then fail with a TypeError
                raise DataError(f"{where}: field \"{key}\" holds an unpaired surrogate "
                                f"({value[e.start]!r}), which is not text; fix the escape") from None
    if "prompt" in example or "completion" in example:
        for key in ("prompt", "completion"):
            if not isinstance(example.get(key), str):
                raise DataError(f"{where}: field \"{key}\" is missing or not a string; prompt/completion examples "
                                "need both")
        if not example["completion"]:
            raise DataError(f"{where}: \"completion\" is empty; there is nothing to learn")
        return {"prompt": example["prompt"], "completion": example["completion"]}
    if isinstance(example.get("text"), str) and example["text"]:
        return {"text": example["text"]}
    raise DataError(f"{where}: needs a non-empty \"text\" field, or \"prompt\" and \"completion\" fields "
                    f"(found: {', '.join(map(str, example)) or 'no fields'})")


def read_examples(path: str | Path) -> list[dict]:
    """Read a .jsonl/.json-lines or .csv file into checked examples, all of one format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e}); re-save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        try:
            rows = list(reader)
        except csv.Error as e:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise DataError(f"{path}, line {reader.line_num + 1}: not readable as CSV ({e}); shorten the field or "
                            "use JSONL") from None
        examples = [_check({k: v for k, v in row.items() if k is not None}, f"{path}, row {i + 2}")
                    for i, row in enumerate(rows)]
    else:
        examples = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}); each line must be one JSON object") \
                    from None
            except RecursionError:
                raise DataError(f"{path}, line {i}: JSON nested too deeply; each line must be one flat JSON "
                                "object") from None
            examples.append(_check(obj, f"{path}, line {i}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    kinds = {"text" if "text" in e else "prompt/completion" for e in examples}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes \"text\" and \"prompt\"/\"completion\" examples; use one format per file")
    return examples


def split(examples: list, eval_fraction: float, seed: int, eval_max: int | None = None) -> tuple[list, list]:
    """A fixed seeded (train, eval) split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
    if eval_max is not None:
        n_eval = min(n_eval, eval_max)
    if n_eval >= len(examples):
        raise DataError(f"eval split {eval_fraction} leaves no training examples out of {len(examples)}")
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def tokenize(example: dict, tokenizer, max_length: int, add_eos: bool = True) -> dict:
    """input_ids and labels (IGNORE on the prompt) for one example, truncated to max_length from the left of the
    prompt so that the completion survives; ``add_eos`` appends the end-of-sequence token to the completion."""
    if max_length < 2:
        raise DataError(f"max_length={max_length!r} is too short: an example needs at least 2 tokens, one to read "
                        "and one to predict")
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"][:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    if len(completion) >= max_length:
        completion = completion[: max_length - 1]
    prompt = prompt[-(max_length - len(completion)):]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into tensors (B, T)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_indices(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Batches of example indices for steps start, start+1, ...: a fresh seeded shuffle each epoch, so the
    position in the data is just the batch number (what resume needs)."""
    per_epoch = max(1, n // batch_size)
    b = start
    while True:
        epoch, k = divmod(b, per_epoch)
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        yield order[k * batch_size:(k + 1) * batch_size] if n >= batch_size else order
        b += 1


@dataclass
class Task:
    """What to train on: tokenizable examples plus, for classification-like data, the answer choices."""

    train: list[dict]
    eval: list[dict]
    choices: Optional[list[str]] = None  # single-token completions scored by next-token log-probability
    name: str = "custom"


def file_task(path: str | Path, *, eval_split: float, seed: int, eval_max: Optional[int]) -> Task:
    """A data file split into train/eval; completions from a small set (2-10) become answer choices."""
    examples = read_examples(path)
    train, held = split(examples, eval_split, seed, eval_max)
    completions = sorted({e["completion"] for e in examples if "completion" in e})
    return Task(train, held, completions if 2 <= len(completions) <= 10 else None)


def sample_batches(examples: list[dict], tokenizer, *, n_batches: int, batch_size: int, max_length: int,
                   add_eos: bool, seed: int) -> list[dict]:
    """The first ``n_batches`` batches of a seeded shuffle of ``examples`` (repeated if too few), tokenized and
    collated as training does."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if len(order) < batch_size:
        raise ConfigError(f"the training split has {len(order)} examples, fewer than one batch of {batch_size}")
    need = n_batches * batch_size
    picked = [examples[i] for i in (order * (need // len(order) + 1))[:need]]
    return [collate([tokenize(e, tokenizer, max_length, add_eos) for e in picked[i:i + batch_size]],
                    tokenizer.pad_token_id) for i in range(0, need, batch_size)]
