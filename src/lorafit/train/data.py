"""Training data: read examples from files, tokenize them, and batch them.

Formats (TRL's field names, so users' files carry over):
    {"text": str}                                     language modelling: loss on every token
    {"prompt": str, "completion": str}                loss on the completion tokens only
    {"messages": [{"role", "content"}, ...], "tools"?: [...]}   conversational: the tokenizer's chat template,
                                                      loss on the assistant turns (train/chat.py)
    {"prompt": [messages], "completion": [messages]}  conversational prompt-completion: loss on the completion's
                                                      assistant turns
Files: JSONL, a JSON list, CSV (string fields), Parquet, or a folder written by ``datasets.Dataset.save_to_disk``
(the last two read with the ``datasets`` library). Bad files raise ``DataError`` naming the file, the line or
example and the problem.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..errors import ConfigError, DataError
from ..hf import IGNORE

ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages: object, where: str, field: str = "messages") -> list[dict]:
    """A list of {"role", "content"} messages with known roles (content may be null beside tool_calls)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"{field}\" must be a non-empty list of {{\"role\", \"content\"}} messages, "
                        f"got {type(messages).__name__}")
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {j} of \"{field}\" is a {type(m).__name__}, not an object with "
                            "\"role\" and \"content\"")
        if "role" not in m:
            raise DataError(f"{where}: message {j} of \"{field}\" has no \"role\"")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} of \"{field}\" has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and m.get("tool_calls")):
            raise DataError(f"{where}: message {j} of \"{field}\" has no \"content\" string")
    return [dict(m) for m in messages]


def _check_conversation(example: dict, where: str) -> dict:
    """{"messages", "n_prompt", "tools"?}: a conversation, or a conversational prompt-completion pair."""
    if "messages" in example:
        messages, n_prompt, trained = _check_messages(example["messages"], where), 0, "messages"
    else:
        prompt = _check_messages(example["prompt"], where, "prompt")
        messages, n_prompt, trained = prompt + _check_messages(example.get("completion"), where, "completion"), \
            len(prompt), "completion"
    if not any(m["role"] == "assistant" for m in messages[n_prompt:]):
        raise DataError(f"{where}: \"{trained}\" has no assistant turn; a training file needs one to learn from")
    out = {"messages": messages, "n_prompt": n_prompt, "source": where}
    if example.get("tools") is not None:
        if not isinstance(example["tools"], list):
            raise DataError(f"{where}: \"tools\" must be a list of tool (function) definitions")
        out["tools"] = example["tools"]
    return out


def _check(example: object, where: str) -> dict:
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object with \"text\" or \"prompt\" and \"completion\", "
                        f"got {type(example).__name__}")
    if "messages" in example or isinstance(example.get("prompt"), list):
        return _check_conversation(example, where)
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


KINDS = {"text": '"text"', "prompt/completion": '"prompt"/"completion"', "messages": '"messages"',
         "conversational prompt/completion": 'conversational "prompt"/"completion"'}


def kind_of(example: dict) -> str:
    if "messages" in example:
        return "messages" if example.get("n_prompt", 0) == 0 else "conversational prompt/completion"
    return "text" if "text" in example else "prompt/completion"


def read_examples(path: str | Path) -> list[dict]:
    """Read a data file (JSONL, JSON list, CSV, Parquet) or a ``save_to_disk`` folder into checked examples, all
    of one format."""
    path = Path(path)
    if path.is_dir():
        rows = [(_check(row, f"{path}, example {i}")) for i, row in enumerate(_dataset_rows(path, path), 1)]
    elif not path.is_file():
        raise DataError(f"data file {path} does not exist")
    elif path.suffix.lower() == ".parquet":
        rows = [_check(row, f"{path}, row {i}") for i, row in enumerate(_dataset_rows(path, path), 1)]
    else:
        rows = _read_text_file(path)
    if not rows:
        raise DataError(f"data file {path} holds no examples")
    kinds = {kind_of(e) for e in rows}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes {' and '.join(v for k, v in KINDS.items() if k in kinds)} examples; use one "
                        "format per file")
    return rows


def _read_text_file(path: Path) -> list[dict]:
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
        return [_check({k: v for k, v in row.items() if k is not None}, f"{path}, row {i + 2}")
                for i, row in enumerate(rows)]
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        items = _json(text, f"{path}", "the file must be one JSON list of objects, or one object per line")
        if isinstance(items, list):
            return [_check(obj, f"{path}, example {i}") for i, obj in enumerate(items, 1)]
    return [_check(_json(line, f"{path}, line {i}", "each line must be one JSON object"), f"{path}, line {i}")
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _json(text: str, where: str, rule: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}); {rule}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; {rule}") from None


KNOWN_COLUMNS = ("text", "prompt", "completion", "messages", "tools")


def _dataset_rows(path: Path, shown: Path) -> list[dict]:
    """The rows of a Parquet file or a ``save_to_disk`` folder, read with the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {shown} needs the datasets library: pip install 'lorafit[data]'") from None
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else \
            datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{shown} is not readable as a dataset ({str(e).splitlines()[0]}); pass a Parquet file or "
                        "a folder written by datasets.Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{shown} holds a DatasetDict with splits {', '.join(ds)}; pass one of them, e.g. "
                        f"{shown / next(iter(ds))}")
    columns = [c for c in ds.column_names if c in KNOWN_COLUMNS]
    if not columns:
        raise DataError(f"{shown} has none of the columns {', '.join(KNOWN_COLUMNS[:4])} (found: "
                        f"{', '.join(ds.column_names) or 'none'})")
    return [{k: _without_nulls(v) for k, v in row.items() if k in columns and v is not None} for row in ds]


def _without_nulls(value):
    """Arrow gives every message every key of the column's struct, null where a message lacks it: drop those, so
    a Parquet or Arrow file reads into the same examples as its JSONL twin."""
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


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


def tokenize(example: dict, tokenizer, max_length: int, add_eos: bool = True, *, train_on_prompt: bool = False,
             where: str = "example") -> Optional[dict]:
    """input_ids and labels (IGNORE where no loss is taken) for one example, and ``cut`` when it was truncated;
    None when a conversation is dropped because not even its first assistant turn fits (train/chat.py).

    Text is cut to ``max_length``; a prompt is cut from the left so that the completion survives, and ``add_eos``
    appends the end-of-sequence token to the completion. ``train_on_prompt`` takes the loss on every token.
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length!r} is too short: an example needs at least 2 tokens, one to read "
                        "and one to predict")
    if "messages" in example:
        from .chat import tokenize_chat
        return tokenize_chat(example, tokenizer, max_length, train_on_prompt=train_on_prompt,
                             where=example.get("source", where))
    if "text" in example:
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": ids[:max_length], "labels": list(ids[:max_length]), "cut": len(ids) > max_length}
    prompt = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        completion = completion + [tokenizer.eos_token_id]
    cut = len(prompt) + len(completion) > max_length
    if len(completion) >= max_length:
        completion = completion[: max_length - 1]
    prompt = prompt[-(max_length - len(completion)):]
    labels = prompt + completion if train_on_prompt else [IGNORE] * len(prompt) + completion
    return {"input_ids": prompt + completion, "labels": labels, "cut": cut}


def tokenize_all(examples: list[dict], tokenizer, max_length: int, add_eos: bool = True, *,
                 train_on_prompt: bool = False, name: str = "data") -> tuple[list[dict], dict]:
    """Tokenize a split; returns (kept examples, {"cut": n, "dropped": n}) ."""
    out, counts = [], {"cut": 0, "dropped": 0}
    for i, e in enumerate(examples, 1):
        t = tokenize(e, tokenizer, max_length, add_eos, train_on_prompt=train_on_prompt, where=f"{name}, example {i}")
        if t is None:
            counts["dropped"] += 1
            continue
        counts["cut"] += t["cut"]
        out.append(t)
    return out, counts


def pack(rows: list[dict], max_length: int, eos_id: Optional[int]) -> list[dict]:
    """Tokenized text examples concatenated (EOS between them) and cut into blocks of ``max_length`` tokens, every
    token labelled: no padding at all (the last, shorter block is dropped unless it is the only one)."""
    stream: list[int] = []
    for r in rows:
        stream += r["input_ids"] + ([eos_id] if eos_id is not None and r["input_ids"][-1:] != [eos_id] else [])
    blocks = [stream[k:k + max_length] for k in range(0, len(stream), max_length)]
    if len(blocks) > 1 and len(blocks[-1]) < max_length:
        blocks.pop()
    return [{"input_ids": b, "labels": list(b), "cut": False} for b in blocks]


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


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, lengths: Optional[list[int]] = None) -> list[int]:
    """A seeded shuffle of range(n) for one epoch. With ``lengths``, examples of similar length share a batch:
    the shuffle is cut into chunks of 50 batches, each chunk is sorted by length into batches, and the batches are
    shuffled again (HF Trainer's ``group_by_length`` megabatches), so less of each batch is padding."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None or n <= batch_size:
        return order
    chunk = 50 * batch_size
    batches = []
    for c in range(0, n, chunk):
        part = sorted(order[c:c + chunk], key=lambda i: -lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    full = [b for b in batches if len(b) == batch_size]  # a short batch goes last, as in the plain order
    rng.shuffle(full)
    return [i for b in full + [b for b in batches if len(b) < batch_size] for i in b]


def batch_indices(n: int, batch_size: int, seed: int, start: int = 0,
                  lengths: Optional[list[int]] = None) -> Iterator[list[int]]:
    """Batches of example indices for steps start, start+1, ...: a fresh seeded order each epoch (``epoch_order``),
    so the position in the data is just the batch number (what resume needs)."""
    per_epoch = max(1, n // batch_size)
    b, current = start, (None, None)
    while True:
        epoch, k = divmod(b, per_epoch)
        if current[0] != epoch:
            current = (epoch, epoch_order(n, batch_size, seed, epoch, lengths))
        order = current[1]
        yield order[k * batch_size:(k + 1) * batch_size] if n >= batch_size else order
        b += 1


def padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    """The share of a padded batch's positions that are padding, over ``batches`` of example indices."""
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / max(total, 1)


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
    return Task(train, held, answer_choices(examples))


def answer_choices(examples: list[dict]) -> Optional[list[str]]:
    """The completions when they come from a small set (2-10 strings): scored as choices by next-token
    log-probability."""
    completions = sorted({e["completion"] for e in examples if isinstance(e.get("completion"), str)})
    return completions if 2 <= len(completions) <= 10 else None


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
    rows, _ = tokenize_all(picked, tokenizer, max_length, add_eos)
    return [collate(rows[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(rows), batch_size)]
