"""`lorafit eval`: a model (and adapter) on a data file: loss and perplexity on the trained tokens, choice
accuracy when completions come from a small set, and with ``generate`` the greedy answers against the references
(exact match; for JSON references also the share of valid JSON and the accuracy of each field).

Perplexity is exp(mean next-token cross-entropy) over exactly the tokens ``lorafit train`` takes the loss on.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from typing import Optional

from ..generate import decode, generate, render
from ..model import disabled
from .data import Task, answer_choices
from .loop import evaluate
from .train_config import TrainConfig


def prompt_and_reference(example: dict) -> Optional[tuple[dict, str]]:
    """(render() keyword arguments for the prompt, the reference answer); None for plain text."""
    if "messages" in example:
        messages, first = example["messages"], example.get("n_prompt", 0)
        i = next(k for k, m in enumerate(messages) if k >= first and m["role"] == "assistant")
        return {"messages": messages[:i]}, messages[i]["content"]
    if "prompt" in example:
        return {"prompt": example["prompt"], "raw": True}, example["completion"]
    return None


def _as_json(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def answer_scores(answers: list[str], references: list[str]) -> dict:
    """Exact match (whitespace-stripped); for JSON-object references, the share of answers that are JSON objects
    and, per field of the references, the share of answers with the same value."""
    pairs = list(zip(answers, references))
    out = {"exact_match": sum(a.strip() == r.strip() for a, r in pairs) / max(len(pairs), 1)}
    refs = [_as_json(r) for r in references]
    if refs and all(refs):
        got = [_as_json(a) for a in answers]
        out["json_valid"] = sum(g is not None for g in got) / len(got)
        for key in sorted({k for r in refs for k in r}):
            out[f"{key}_accuracy"] = sum(g is not None and g.get(key) == r.get(key) for g, r in zip(got, refs)) \
                / len(got)
    return out


def greedy_answers(model, tok, examples: list[dict], *, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(greedy answers, references) for every example with a prompt."""
    answers, references = [], []
    for e in examples:
        pr = prompt_and_reference(e)
        if pr is None:
            continue
        ids = generate(model, tok, render(tok, **pr[0]), max_new_tokens=max_new_tokens)
        answers.append(decode(tok, ids).strip())
        references.append(pr[1])
    return answers, references


def eval_examples(model, tok, examples: list[dict], *, max_length: int = 256, batch_size: int = 8,
                  add_eos: bool = True, answers: bool = False, max_new_tokens: int = 64, base: bool = False) -> dict:
    """The metrics of ``model`` on ``examples`` (with ``base``: of the base model, adapters disabled)."""
    cfg = TrainConfig(batch_size=batch_size, max_length=max_length, add_eos=add_eos, eval_max=None)
    task = Task(train=[], eval=examples, choices=answer_choices(examples))
    with disabled(model) if base else nullcontext():
        out = evaluate(model, tok, task, cfg)
        out["perplexity"] = math.exp(min(out["eval_loss"], 700.0))
        if answers:
            got, refs = greedy_answers(model, tok, examples, max_new_tokens=max_new_tokens)
            out.update(answer_scores(got, refs), answers=got)
    return out
