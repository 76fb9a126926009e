"""The engine of `lorafit serve`: one base model, many adapters, and continuous batching over them.

One thread owns the model. Each request row is prefilled alone (its prompt through its adapter, into its own KV
cache), then joins the decoding batch at the next step: the rows' caches are kept side by side in one transformers
``DynamicCache``, left-padded to the longest row, with an attention mask that hides the padding and each row's own
positions. Every decoding step is one forward of the whole batch under ``lorafit.per_row``, so rows for different
adapters (and the base model) share it. A row ends at a stop token, a stop string, its ``max_tokens``, or when its
client goes away; its cache rows are dropped at the next step and the shared left padding trimmed.

Sampling is per row: greedy (temperature 0), or softmax(logits / temperature) with nucleus filtering (top_p) drawn
from the row's own ``torch.Generator`` seeded with the request's seed, so a seeded answer does not depend on what
else is in the batch. Greedy answers equal ``lorafit generate``'s (transformers' ``generate``) token for token.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from ..mixed import per_row
from ..model import adapter_layers, adapters, delete, has_adapter
from ..peft_format import load

PREFIX = 4  # prompt tokens decoded before the answer's (see Engine._text)

@dataclass
class Row:
    """One answer being generated (one choice of one request)."""

    prompt: list[int]
    adapter: Optional[str]  # None: the base model
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: frozenset = frozenset()
    stop: tuple[str, ...] = ()
    emit: Callable[[str, Optional[str]], None] = lambda text, finish: None  # (new text, finish reason or None)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # the engine's
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    prefix_text: str = ""  # the prompt's last PREFIX tokens, decoded
    cached: int = 0  # tokens in this row's cache (the next token's position)
    gen: Optional[torch.Generator] = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class Engine:
    """The decoding thread. ``submit`` a Row; its ``emit`` is called from this thread with each new piece of text
    and, last, the finish reason ("stop", "length", "cancelled" when its client left, or "error" with the error's
    text). A step that raises ends its rows with "error"; the thread goes on."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 16) -> None:
        self.model, self.tok, self.max_batch = model.eval(), tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.pending: collections.deque = collections.deque()
        self.commands: collections.deque = collections.deque()
        self.rows: list[Row] = []
        self.cache = None  # the decoding batch's DynamicCache
        self.mask: Optional[torch.Tensor] = None  # (B, T) 1 for a row's real tokens, 0 for its left padding
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0  # decoding steps run
        self.peak = 0  # the most rows one step decoded together
        self.failures = 0  # steps that raised (their rows ended with finish reason "error")
        # transformers 5 names the KV cache argument ``cache`` (``past_key_values`` before, deprecated since)
        import inspect

        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        check_cache(model)
        self.thread = threading.Thread(target=self._loop, name="lorafit-serve-engine", daemon=True)

    # --- the server's side ------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, row: Row) -> None:
        with self.wake:
            self.pending.append(row)
            self.wake.notify()

    def call(self, fn: Callable[[], object], timeout: float = 600.0):
        """Run ``fn`` on the engine thread between two steps (loading or deleting an adapter) and return its result
        or raise its exception."""
        done = threading.Event()
        box: dict = {}

        def command() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box["error"] = e
            done.set()
        with self.wake:
            self.commands.append(command)
            self.wake.notify()
        if not done.wait(timeout):
            raise TimeoutError("the engine did not run the command in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def busy(self, adapter: str) -> int:
        """Rows running or waiting for ``adapter``."""
        return sum(r.adapter == adapter for r in [*self.rows, *self.pending])

    def stop(self, timeout: float = 5.0) -> None:
        """End every row now (finish reason "length" for those cut short) and the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    # --- the engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not (self.stopping or self.pending or self.commands or self.rows):
                        self.wake.wait()
                    if self.stopping:
                        break
                    commands = list(self.commands)
                    self.commands.clear()
                for command in commands:
                    with torch.inference_mode(False):  # an adapter loaded here gets normal (trainable) tensors
                        command()
                try:
                    self._admit()
                    if self.rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - the batch's rows fail; the engine goes on
                    self.failures += 1
                    for row in self.rows:
                        row.emit(f"{type(e).__name__}: {e}", "error")
                    self.rows, self.cache, self.mask = [], None, None
        for row in [*self.rows, *self.pending]:
            row.emit("", "length")
        self.rows, self.cache, self.mask = [], None, None

    def _admit(self) -> None:
        """Prefill waiting rows, up to max_batch in all, and add them to the decoding batch."""
        while self.pending and len(self.rows) < self.max_batch:
            with self.wake:
                row = self.pending.popleft()
            if row.cancelled.is_set():
                row.emit("", "cancelled")
                continue
            try:
                cache, logits = self._prefill(row)
                row.cached = len(row.prompt)
                if row.temperature > 0:
                    row.gen = torch.Generator(device=self.device)
                    row.gen.manual_seed(row.seed if row.seed is not None else int(time.time_ns() % 2**63))
                token = self._pick(logits, [row])[0]
            except Exception as e:  # noqa: BLE001 - one bad row must not stop the server
                row.emit(f"{type(e).__name__}: {e}", "error")
                continue
            row.prefix_text = self.tok.decode(row.prompt[-PREFIX:], skip_special_tokens=True)
            if self._take(row, token):
                self._join(row, cache)

    def _prefill(self, row: Row):
        from transformers import DynamicCache

        ids = torch.tensor([row.prompt], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        with self._routed([row]):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        return _cache_of(out), out.logits[:, -1, :]

    def _routed(self, rows: list[Row]):
        import contextlib

        if not has_adapter(self.model):
            return contextlib.nullcontext()
        return per_row(self.model, [r.adapter for r in rows])

    def _step(self) -> None:
        """One decoding step of every row in the batch."""
        rows = self.rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.cached] for r in rows], dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        with self._routed(rows):
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             **{self.cache_arg: self.cache})
        self.cache = _cache_of(out)
        self.steps += 1
        self.peak = max(self.peak, len(rows))
        tokens = self._pick(out.logits[:, -1, :], rows)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.cached += 1
            if self._take(row, token):
                keep.append(i)
        if len(keep) < len(rows):
            self._drop(keep)

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """The next token of each row: argmax, or a draw from its own generator (one read of the batch's tokens)."""
        logits = logits.float()
        picked = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.temperature > 0:
                picked[i] = _sample(logits[i], row.temperature, row.top_p, row.gen)
        return picked.tolist()

    def _take(self, row: Row, token: int) -> bool:
        """Add ``token`` to ``row`` and emit its new text; False when the row has ended."""
        if row.cancelled.is_set():
            row.emit("", "cancelled")
            return False
        if token in row.stop_ids:
            self._flush(row, "stop")
            return False
        row.tokens.append(token)
        text = self._text(row)
        for s in row.stop:
            at = text.find(s)
            if at >= 0:
                self._emit(row, text[:at], "stop")
                return False
        if len(row.tokens) >= row.max_tokens:
            self._emit(row, text, "length")
            return False
        # hold back an unfinished character (byte-fallback tokenizers show one U+FFFD per byte) and what could be
        # the start of a stop string
        end = len(text.rstrip("\ufffd"))
        for s in row.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        self._emit(row, text[:max(end, len(row.sent))], None)
        return True

    def _flush(self, row: Row, finish: str) -> None:
        self._emit(row, self._text(row), finish)

    def _text(self, row: Row) -> str:
        """The answer's text, decoded after the prompt's last tokens (so that a tokenizer that drops a leading
        space at the start of a text, SentencePiece's Metaspace, keeps the answer's first space)."""
        full = self.tok.decode(row.prompt[-PREFIX:] + row.tokens, skip_special_tokens=True)
        if full.startswith(row.prefix_text):
            return full[len(row.prefix_text):]
        return self.tok.decode(row.tokens, skip_special_tokens=True)

    @staticmethod
    def _emit(row: Row, text: str, finish: Optional[str]) -> None:
        new = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent = text if text.startswith(row.sent) else row.sent
        if new or finish is not None:
            row.emit(new, finish)

    def _join(self, row: Row, cache) -> None:
        """Add a prefilled row (its cache of ``row.cached`` tokens) to the decoding batch, left-padding the shorter."""
        t = row.cached
        if not self.rows:
            self.rows, self.cache = [row], cache
            self.mask = torch.ones(1, t, dtype=torch.long, device=self.device)
            return
        T = self.mask.shape[1]
        width = max(T, t)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        row_mask = torch.ones(1, t, dtype=torch.long, device=self.device)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(row_mask, width, dim=1)])
        self.rows.append(row)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the batch, and trim the left padding every kept row has."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        start = mask.shape[1] - max(r.cached for r in self.rows)
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    # --- adapters (on the engine thread, through ``call``) ---------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> None:
        if name in adapters(self.model) if has_adapter(self.model) else False:
            raise AdapterError(f"an adapter named {name!r} is already served")
        load(self.model, path, name=name)
        self.model.eval()
        self._forget_stacks()

    def unload_adapter(self, name: str) -> None:
        if not has_adapter(self.model) or name not in adapters(self.model):
            raise ConfigError(f"no adapter named {name!r} is served")
        busy = self.busy(name)
        if busy:
            raise ConfigError(f"adapter {name!r} has {busy} requests running or waiting; unload it when they are "
                              "done")
        delete(self.model, name)
        self._forget_stacks()

    def _forget_stacks(self) -> None:
        """per_row's cached stacks are keyed by names and storage; a name loaded again may reuse freed storage."""
        if has_adapter(self.model):
            for _, layer in adapter_layers(self.model):
                layer.__dict__.pop("_mixed_stacks", None)


def check_cache(model: nn.Module) -> None:
    """The engine keeps rows side by side in full-attention cache layers; a model whose cache has sliding-window or
    shared layers (Mistral's window, Gemma 2/3) is refused, naming them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers
             if type(layer) is not DynamicLayer}
    if kinds:
        raise ConfigError(f"lorafit serve batches full-attention KV caches only; this model's cache has "
                          f"{', '.join(sorted(kinds))} layers (sliding-window or shared attention). Serve it with "
                          "vLLM or llama.cpp (lorafit export), or try its adapters with lorafit generate")


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros added before its ``dim`` to reach ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        return order[torch.multinomial(sorted_p, 1, generator=gen)][0]
    return torch.multinomial(probs, 1, generator=gen)[0]
