"""Trying an adapter: load a model (and an adapter) for inference, render a prompt or a conversation through the
tokenizer's chat template, and generate an answer, greedy or sampled, streaming its text as it is produced.

Generation is transformers' own ``model.generate`` on the adapted (unmerged) model: at temperature 0 it picks
argmax_v p(v | prefix) at every step, so its tokens equal those of the merged checkpoint (``lorafit merge``) up to
float rounding. Above 0 it samples from softmax(logits / T) cut to the smallest set of most probable tokens whose
probability sums to at least ``top_p`` (nucleus sampling, Holtzman et al. 2020), and nothing else (no top-k), from
torch's RNG seeded with ``seed`` inside ``torch.random.fork_rng`` (the caller's RNG state is restored after).
Other settings of the model's generation_config (repetition_penalty, ...) apply as in transformers.
An answer ends at the tokenizer's EOS, at any EOS of the model's generation_config, and at the chat template's
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), or after ``max_new_tokens``.

transformers is imported inside the functions, so ``import lorafit`` never loads it.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .devices import resolve_device
from .errors import AdapterError, ConfigError, DataError
from .hf import DTYPES, check_model_dir, load_model, use_chat_template
from .model import disabled
from .peft_format import CONFIG_NAME, load, read_adapter

_PROBE = "lorafit-end-of-turn-probe"  # an assistant turn's text, to find what the template writes after it


@dataclass(frozen=True)
class Sampling:
    """How one answer is decoded; checked at construction (ConfigError naming the field and value)."""

    max_new_tokens: int = 128  # an answer ends here at the latest
    temperature: float = 0.0  # 0: greedy (deterministic); > 0: sample from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: keep the most probable tokens up to this probability mass; 1 keeps all
    seed: int = 0  # seeds the sampler (a private RNG state: the caller's torch RNG is left as it was)

    def __post_init__(self):
        checks = {
            "max_new_tokens": (_is_int(self.max_new_tokens) and self.max_new_tokens > 0, "a positive integer"),
            "temperature": (_is_real(self.temperature) and self.temperature >= 0,
                            "a finite number >= 0 (0 = greedy)"),
            "top_p": (_is_real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            "seed": (_is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: expected {allowed}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- loading ------------------------------------------------------------------------------------------------

def load_for_inference(model_dir: str | Path, adapter_dir: str | Path | None = None, *, dtype: str = "float32",
                       chat_template: str | Path | None = None,
                       device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a local transformers folder, with the adapter at ``adapter_dir`` attached (any
    PEFT-format folder, the root of a ``lorafit train`` output included), in eval mode on ``device`` (auto, cpu,
    cuda, cuda:N or mps, as ``devices.resolve_device`` takes them; default: auto), where the weights are read
    straight to and the adapter is made. ``chat_template``: a Jinja file replacing (or supplying) the tokenizer's
    template, as ``lorafit train --chat-template`` takes it.

    An absent device is a ConfigError before anything is read; the adapter's files are checked before the (slow)
    model load. An adapter made for another model is refused with one AdapterError naming the adapter's base
    (``base_model_name_or_path``), the model folder and the first key or shape that does not fit.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    device, _ = resolve_device(None if device is None else str(device))
    model_dir = check_model_dir(model_dir)
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        read_adapter(adapter_dir)  # a broken adapter fails before the model load
    model, tok = load_model(model_dir, dtype, device=device)
    if chat_template is not None:
        use_chat_template(tok, chat_template)
    if adapter_dir is not None:
        attach_adapter(model, adapter_dir, model_dir)
    return model.eval(), tok  # the adapter's tensors are made on its base weights' device


def attach_adapter(model: nn.Module, adapter_dir: Path, model_dir: Path, name: str = "default") -> None:
    """Load the adapter folder ``adapter_dir`` (its own adapter, not its subfolders) into ``model`` as ``name``; one
    made for another model is refused with one AdapterError naming the adapter's base and ``model_dir``."""
    try:
        load(model, adapter_dir, name=name)
    except AdapterError as e:
        raise AdapterError(_mismatch(str(e), Path(adapter_dir), Path(model_dir))) from None


def _mismatch(message: str, adapter_dir: Path, model_dir: Path) -> str:
    """peft_format.load's message, rewritten to name the adapter, the base it was made for and the model folder."""
    base = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    made_for = f"made for {base}" if base else "its base model is not recorded"
    detail = message.removeprefix(f"adapter {adapter_dir}").lstrip(": ")
    return f"adapter {adapter_dir} ({made_for}) does not fit the model in {model_dir}: {detail}"


# --- prompts ------------------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def read_messages(path: str | Path) -> list[dict]:
    """A conversation from a JSON file: a list of {"role", "content"} messages, or one object with a "messages"
    key holding that list (one record of a conversational dataset, as TRL and OpenAI write them)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"messages file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"messages file {path} is not one JSON value ({e}); write a list of "
                        '{"role": ..., "content": ...} messages or one {"messages": [...]} object') from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    return check_messages(data, str(path))


def check_messages(messages, where: str = "messages") -> list[dict]:
    """The messages, or a DataError naming the first that is not a {"role": str, "content": str} mapping."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} is {json.dumps(m)[:80]}; expected "
                            '{"role": "user" | "assistant" | "system", "content": "..."}')
    return messages


def render(tokenizer, *, prompt: str | None = None, messages: list[dict] | None = None, system: str | None = None,
           raw: bool = False) -> list[int]:
    """The input ids of one prompt (a single user turn) or a conversation, ready for the answer.

    With a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``, ``system`` as a first
    system turn. Without one (a base model), or with ``raw=True``, a prompt is tokenized as is, special tokens
    included, as ``lorafit train`` tokenizes prompt/completion data; messages then need a template (DataError).
    """
    if (prompt is None) == (messages is None):
        raise ConfigError("pass exactly one of prompt and messages")
    if prompt is not None and (raw or not has_chat_template(tokenizer)):
        if system is not None:
            raise ConfigError("system needs a chat template to put it in (this tokenizer has none, or raw is set); "
                              "write it into the prompt instead")
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    turns = [{"role": "user", "content": prompt}] if prompt is not None else check_messages(messages)
    if system is not None:
        if turns[0]["role"] == "system":
            raise ConfigError("system is given twice: as system and as the conversation's first message")
        turns = [{"role": "system", "content": system}, *turns]
    text = _apply_template(tokenizer, turns, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself, as in training


def require_chat_template(tokenizer) -> None:
    """A DataError naming the tokenizer's folder when it has no chat template."""
    if not has_chat_template(tokenizer):
        raise DataError(f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no chat template "
                        "(tokenizer_config.json 'chat_template'), so a conversation cannot be rendered; pass a "
                        "plain prompt, or a model whose tokenizer has a chat template")


def _apply_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (DataError when it has none or refuses)."""
    from jinja2.exceptions import TemplateError

    require_chat_template(tokenizer)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"the chat template of {tokenizer.name_or_path} refuses this conversation: {e}") from None


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Tokens that end an answer: the generation_config's EOS (an id or a list), the tokenizer's EOS, and the
    token the chat template writes right after an assistant turn when it is a special token."""
    found = [getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id]
    if has_chat_template(tokenizer):
        found.append(_end_of_turn(tokenizer))
    ids: list[int] = []
    for entry in found:
        for i in entry if isinstance(entry, (list, tuple)) else [entry]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _end_of_turn(tokenizer) -> int | None:
    try:
        text = _apply_template(tokenizer, [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": _PROBE}])
    except DataError:
        return None
    _, found, after = text.rpartition(_PROBE)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if found else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return ids[0] if ids and ids[0] in special else None


# --- generating ---------------------------------------------------------------------------------------------

def generate(model: nn.Module, tokenizer, input_ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
             stop: Callable[[], bool] | None = None) -> list[int]:
    """The answer's new token ids (ending with the stop token when one was produced) after ``input_ids``.

    Args:
        max_new_tokens, temperature, top_p, seed: as in ``Sampling`` (checked there; ConfigError).
        on_text: called with each new piece of decoded text (special tokens skipped), as it is produced.
        stop: checked after every token; True ends the answer there (e.g. set by a Ctrl-C handler).
    """
    from transformers import StoppingCriteriaList

    s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if len(input_ids) == 0:
        raise ConfigError("the prompt has no tokens: there is nothing to continue")
    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)  # (1, T)
    decoding = (dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature > 0
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))  # None: no warnings
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        torch.manual_seed(s.seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                             eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=pad,
                             streamer=_streamer(tokenizer, on_text) if on_text else None,
                             stopping_criteria=StoppingCriteriaList([_Flag(stop)]) if stop else None, **decoding)
    return out[0, ids.shape[1]:].tolist()


def _streamer(tokenizer, on_text: Callable[[str], None]):
    """transformers' TextStreamer (decodes whole words as they complete), sending the text to ``on_text``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class _Flag:
    """A stopping criterion that ends generation once ``stop()`` is true (transformers' StoppingCriteria protocol:
    called after each step with the (B, T) ids, returns a (B,) bool tensor)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


def compare(model: nn.Module, tokenizer, input_ids: list[int], *, sampling: Sampling,
            on_start: Callable[[str], None] | None = None,
            on_text: Callable[[str], None] | None = None) -> dict[str, list[int]]:
    """{"base": ids, "adapted": ids}: the base model's answer (the same model under ``lorafit.disabled``, so
    nothing is loaded twice) then the adapted one's, each announced by ``on_start(label)`` before it streams."""
    answers = {}
    for label in ("base", "adapted"):
        if on_start:
            on_start(label)
        with disabled(model) if label == "base" else nullcontext():
            answers[label] = generate(model, tokenizer, input_ids, **asdict(sampling), on_text=on_text)
    return answers


def decode(tokenizer, ids: list[int]) -> str:
    """An answer's text: special tokens (EOS, end of turn) left out."""
    return tokenizer.decode(ids, skip_special_tokens=True)


class Chat:
    """A multi-turn conversation with one model: the history of system, user and assistant turns, rendered
    through the chat template for every answer. Each answer is appended to the history (a stopped answer with the
    text produced so far); ``reset`` forgets all but the system turn."""

    def __init__(self, model: nn.Module, tokenizer, *, system: str | None = None, sampling: Sampling = Sampling()):
        require_chat_template(tokenizer)
        self.model, self.tokenizer, self.system, self.sampling = model, tokenizer, system, sampling
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    def reply(self, text: str, *, on_text: Callable[[str], None] | None = None,
              stop: Callable[[], bool] | None = None) -> str:
        """The answer to the user's ``text`` given the history so far; the seed moves on with each turn, so a
        session is reproducible and two equal questions can get different samples."""
        turns = [*self.messages, {"role": "user", "content": text}]
        ids = render(self.tokenizer, messages=turns)
        seed = self.sampling.seed + sum(m["role"] == "user" for m in turns) - 1
        new = generate(self.model, self.tokenizer, ids, **{**asdict(self.sampling), "seed": seed},
                       on_text=on_text, stop=stop)
        answer = decode(self.tokenizer, new)
        self.messages = [*turns, {"role": "assistant", "content": answer}]
        return answer
