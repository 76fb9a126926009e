"""`lorafit data`: what a data file becomes for training: its format, token counts, what is cut or dropped at
``max_length``, the share of tokens the loss is on, and each example's trained text spans."""

from __future__ import annotations

from typing import Optional

from ..hf import IGNORE
from .data import KINDS, epoch_order, kind_of, padding_share, tokenize


def trained_spans(row: dict) -> list[tuple[int, int]]:
    """(start, end) token positions of each run of labelled tokens."""
    spans, start = [], None
    for t, label in enumerate(row["labels"] + [IGNORE]):
        if label != IGNORE and start is None:
            start = t
        elif label == IGNORE and start is not None:
            spans.append((start, t))
            start = None
    return spans


def token_report(examples: list[dict], tokenizer, *, max_length: int, add_eos: bool = True,
             train_on_prompt: bool = False, batch_size: int = 8, name: str = "data") -> tuple[list[dict], dict]:
    """(one record per example: tokens, trained token count, trained text spans, cut/dropped; a summary)."""
    records, rows = [], []
    for i, e in enumerate(examples, 1):
        row = tokenize(e, tokenizer, max_length, add_eos, train_on_prompt=train_on_prompt, where=f"{name}, example {i}")
        if row is None:
            records.append({"example": i, "dropped": True})
            continue
        spans = trained_spans(row)
        records.append({"example": i, "tokens": len(row["input_ids"]), "cut": row["cut"],
                        "trained_tokens": sum(b - a for a, b in spans),
                        "trained": [tokenizer.decode(row["input_ids"][a:b], skip_special_tokens=False)
                                    for a, b in spans], "ids": row["input_ids"], "spans": spans})
        rows.append(row)
    kept = [r for r in records if not r.get("dropped")]
    tokens = [r["tokens"] for r in kept]
    lengths = [len(r["input_ids"]) for r in rows]
    summary = {"examples": len(examples), "format": KINDS[kind_of(examples[0])], "kept": len(kept),
               "cut": sum(r["cut"] for r in kept), "dropped": len(records) - len(kept),
               "tokens_mean": sum(tokens) / max(len(tokens), 1), "tokens_max": max(tokens, default=0),
               "trained_share": sum(r["trained_tokens"] for r in kept) / max(sum(tokens), 1),
               "padding_share": _padding(lengths, batch_size, grouped=False),
               "padding_share_grouped": _padding(lengths, batch_size, grouped=True)}
    return records, summary


def _padding(lengths: list[int], batch_size: int, *, grouped: bool) -> float:
    """The padding share of one epoch's batches, shuffled or grouped by length."""
    if not lengths:
        return 0.0
    order = epoch_order(len(lengths), batch_size, 0, 0, lengths if grouped else None)
    return padding_share([order[k:k + batch_size] for k in range(0, len(order), batch_size)], lengths)


def marked(record: dict, tokenizer, *, start: str = "[[", end: str = "]]") -> str:
    """An example's rendered text with the trained spans between ``start`` and ``end``."""
    ids, out, pos = record["ids"], [], 0
    for a, b in record["spans"]:
        out += [tokenizer.decode(ids[pos:a], skip_special_tokens=False), start,
                tokenizer.decode(ids[a:b], skip_special_tokens=False), end]
        pos = b
    return "".join(out + [tokenizer.decode(ids[pos:], skip_special_tokens=False)])


def summary_text(path, summary: dict, *, max_length: int, model: Optional[str] = None) -> str:
    s = summary
    return "\n".join([
        f"{path}: {s['examples']} examples, format {s['format']}" + (f", tokenizer of {model}" if model else ""),
        f"  tokens per example: mean {s['tokens_mean']:.1f}, max {s['tokens_max']} (max_length {max_length})",
        f"  cut to max_length: {s['cut']}, dropped (first trained turn does not fit): {s['dropped']}",
        f"  trained tokens: {100 * s['trained_share']:.1f}% of all tokens",
        f"  padding in batches: {100 * s['padding_share']:.1f}% shuffled, {100 * s['padding_share_grouped']:.1f}% "
        "grouped by length (the default)"])
