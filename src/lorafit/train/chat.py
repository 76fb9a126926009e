"""Conversations through the tokenizer's own chat template, with the loss on the assistant turns only.

No ``{% generation %}`` markers are needed: the conversation is rendered prefix by prefix, and each assistant turn
trains exactly the tokens it adds,

    trained(i) = ids(render(m[:i+1]))[len(ids(render(m[:i], add_generation_prompt=True))):]

that is its content and the end-of-turn token the template emits after it (so the model learns to stop), less
whitespace the template writes after that token. Every prefix's tokens must be a prefix of the next rendering's
tokens ("the token boundaries line up"); a template for which they are not (one that rewrites earlier turns, or a
merge across the boundary) is refused with an error naming the example, never trained on silently wrong tokens.

An example too long for ``max_length`` keeps its beginning up to the end of the last complete trained turn that
fits; if not even the first one fits, it is dropped. The callers count both.
"""

from __future__ import annotations

from typing import Optional

from ..errors import DataError
from ..hf import IGNORE


def _render(tokenizer, messages: list[dict], tools, *, prompt: bool, where: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError and the template's own raise_exception
        raise DataError(f"{where}: the chat template rejects this conversation: {str(e).splitlines()[0]}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _strip_after_end_of_turn(span: list[int], tokenizer) -> list[int]:
    """The span up to its last special token (the end of turn) when only whitespace follows it."""
    special = set(tokenizer.all_special_ids)
    last = max((k for k, t in enumerate(span) if t in special), default=None)
    if last is not None and last + 1 < len(span) and not tokenizer.decode(span[last + 1:]).strip():
        return span[:last + 1]
    return span


def _opening(tokenizer, tools) -> list[int]:
    """What the template writes before a first assistant message (a BOS, a default system prompt, the assistant
    header), if it renders an empty conversation at all."""
    try:
        return _render(tokenizer, [], tools, prompt=True, where="")
    except DataError:
        return []


def trained_turns(example: dict) -> list[int]:
    """Indices of the messages the loss is on: the assistant turns (of the completion, for prompt-completion)."""
    first = example.get("n_prompt", 0)
    return [i for i, m in enumerate(example["messages"]) if i >= first and m["role"] == "assistant"]


def tokenize_chat(example: dict, tokenizer, max_length: int, *, train_on_prompt: bool = False,
                  where: str = "example") -> Optional[dict]:
    """input_ids, labels (IGNORE outside the trained turns) and ``cut`` for one conversation; None when even its
    first trained turn does not fit in ``max_length`` tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so conversations cannot be rendered; pass "
                        "--chat-template FILE (a Jinja template) or use prompt/completion data")
    messages, tools = example["messages"], example.get("tools")
    ids = _render(tokenizer, messages, tools, prompt=False, where=where)
    spans = []  # (start, end) token positions of each trained turn, end before stripped whitespace
    for i in trained_turns(example):
        before = _render(tokenizer, messages[:i], tools, prompt=True, where=where) if i else _opening(tokenizer, tools)
        upto = _render(tokenizer, messages[:i + 1], tools, prompt=False, where=where)
        if upto[:len(before)] != before or ids[:len(upto)] != upto:
            raise DataError(f"{where}: the chat template's token boundaries do not line up at message {i + 1} "
                            "(rendering the conversation up to it does not give a prefix of the whole); this "
                            "template cannot be masked by prefixes: use --train-on-prompt or prompt/completion data")
        span = _strip_after_end_of_turn(upto[len(before):], tokenizer)
        spans.append((len(before), len(before) + len(span)))
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant turn to train on; a training file needs one")
    cut = len(ids) > max_length
    if cut:
        ends = [end for _, end in spans if end <= max_length]
        if not ends:
            return None
        ids = ids[:max(ends)]
    labels = list(ids) if train_on_prompt else [IGNORE] * len(ids)
    if not train_on_prompt:
        for start, end in spans:
            labels[start:min(end, len(ids))] = ids[start:min(end, len(ids))]
    return {"input_ids": ids, "labels": labels, "cut": cut}
