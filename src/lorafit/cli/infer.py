"""`lorafit generate` and `lorafit chat`: trying a model and its adapter on a prompt, beside the base model, or in
a conversation."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict

from ..devices import resolve_device
from ..errors import ConfigError
from ..hf import DTYPES
from .common import add_device_flag, add_max_new_tokens_flag, add_model_flag, device_line

PROMPT = "you> "
ANSWER = "model> "
HELP = ("/reset clears the history, /help shows this, /exit, Ctrl-D or Ctrl-C at the prompt ends, Ctrl-C during an "
        "answer stops it")


def _sampling(args: argparse.Namespace):
    from ..generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generate import compare, generate, load_for_inference, read_messages, render

    device, why = resolve_device(args.device)  # every input is checked before the model loads, the device first
    sampling = _sampling(args)
    if args.compare and args.adapter is None:
        raise ConfigError("--compare needs --adapter: it prints the base model's answer beside the adapted one's")
    messages = read_messages(args.messages) if args.messages else None
    print(device_line(device, DTYPES[args.dtype], why), file=sys.stderr, flush=True)  # stdout is the answer's
    model, tok = load_for_inference(args.model, args.adapter, dtype=args.dtype,
                                    chat_template=args.chat_template, device=device)
    ids = render(tok, prompt=args.prompt, messages=messages, system=args.system, raw=args.raw)
    stream = None if args.json else _write
    if args.compare:
        headers = {"base": f"=== base model: {args.model} ===\n",
                   "adapted": f"\n=== with adapter: {args.adapter} ===\n"}
        answers = compare(model, tok, ids, sampling=sampling, on_text=stream,
                          on_start=None if args.json else lambda label: _write(headers[label]))
    else:
        answers = {"adapted": generate(model, tok, ids, **asdict(sampling), on_text=stream)}
    if args.json:
        print(json.dumps(_result(args.prompt, messages, answers, tok), ensure_ascii=False))
    else:
        _write("\n")
    return 0


def _result(prompt: str | None, messages: list[dict] | None, answers: dict[str, list[int]], tok) -> dict:
    """`generate --json`'s object: the input, the answer's text, token count and ids (and the base model's)."""
    from ..generate import decode

    out = {"prompt": prompt} if prompt is not None else {"messages": messages}
    for prefix, label in (("", "adapted"), ("base_", "base")):
        if label in answers:
            ids = answers[label]
            out.update({f"{prefix}answer": decode(tok, ids), f"{prefix}tokens": len(ids), f"{prefix}token_ids": ids})
    return out


@contextmanager
def _ctrl_c_sets(flag: threading.Event):
    """While inside, Ctrl-C (SIGINT) sets ``flag`` instead of raising KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_chat(args: argparse.Namespace) -> int:
    from ..generate import Chat, load_for_inference

    device, why = resolve_device(args.device)  # an absent device: exit 2 before any work
    sampling = _sampling(args)
    model, tok = load_for_inference(args.model, args.adapter, dtype=args.dtype,
                                    chat_template=args.chat_template, device=device)
    chat = Chat(model, tok, system=args.system, sampling=sampling)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(device_line(device, DTYPES[args.dtype], why))  # once the chat can start: nothing on stdout before a refusal
    print(f"chatting with {args.model}" + (f" + {args.adapter}" if args.adapter else "") + f" ({HELP})")
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the end of the session
            print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            chat.reset()
            print("(history cleared)")
        elif command == "/help":
            print(f"({HELP})")
        elif command:
            _answer(chat, line)


def _answer(chat, line: str) -> None:
    """Stream the answer to one user turn; Ctrl-C stops it there (the text so far stays in the history)."""
    with _ctrl_c_sets(threading.Event()) as stopped:
        _write(ANSWER)
        chat.reply(line, on_text=_write, stop=stopped.is_set)
    print("\n(answer stopped)" if stopped.is_set() else "")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_flag(p, "the base model", required=True)
    p.add_argument("--adapter", metavar="DIR", help="adapter folder (lorafit or PEFT; a `lorafit train` output "
                   "folder too) (default: none, the model alone)")
    p.add_argument("--system", metavar="TEXT", help="system message, the first turn of the chat template "
                   "(default: none)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template file replacing (or supplying) the "
                   "tokenizer's, as given to `lorafit train --chat-template` (default: the tokenizer's)")
    add_max_new_tokens_flag(p, default=128)
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy and deterministic; > 0 "
                   "samples from softmax(logits / T) (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling: keep the most probable "
                   "tokens up to this probability mass, in (0, 1] (default: 1, all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampler (default: 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights dtype (default: float32)")
    add_device_flag(p)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt with a model and its adapter, streaming the text")
    _add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="the prompt: one user turn of the chat template (when the "
                      "tokenizer has one), else the text as is")
    what.add_argument("--messages", metavar="FILE", help='JSON file of a conversation: a list of {"role", '
                      '"content"} messages or one {"messages": [...]} object')
    p.add_argument("--raw", action="store_true", help="tokenize --prompt as is, without the chat template, as "
                   "`lorafit train` reads prompt/completion data (default: off)")
    p.add_argument("--compare", action="store_true", help="print the base model's answer, then the adapted one's "
                   "(default: off)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompt or messages, answer, tokens, "
                   "token_ids; base_answer, base_tokens, base_token_ids with --compare) instead of streaming")
    p.set_defaults(func=cmd_generate, needs=("transformers",))


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="talk with a model and its adapter, turn by turn (needs a chat template)",
                       description=f"An interactive conversation; the history is kept. {HELP}. Exit code 0.")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat, needs=("transformers",))


def add_parsers(sub) -> None:
    add_generate_parser(sub)
    add_chat_parser(sub)
