"""`lorafit data FILE`: check a data file the way `lorafit train` will read it, before training on it; and
`lorafit eval`: a model (and adapter) on a data file, the base model beside it with --compare."""

from __future__ import annotations

import argparse
import json
import sys

from ..devices import resolve_device
from ..hf import DTYPES
from .common import (
    EMBEDDED_MODEL,
    add_device_flag,
    add_max_length_flag,
    add_max_new_tokens_flag,
    add_model_flag,
    device_line,
    positive_int,
    require_demo,
)


def cmd_data(args: argparse.Namespace) -> int:
    from ..hf import check_model_dir, load_tokenizer, use_chat_template
    from ..train.data import read_examples
    from ..train.datacheck import marked, summary_text, token_report

    examples = read_examples(args.file)
    require_demo("data", args.model)
    if args.model is None:
        from ..demo.assets import smollm2
        model_dir = smollm2()
    else:
        model_dir = check_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    if args.chat_template:
        use_chat_template(tok, args.chat_template)
    records, summary = token_report(examples, tok, max_length=args.max_length, train_on_prompt=args.train_on_prompt,
                                name=str(args.file))
    if args.json:
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k not in ("ids", "spans")}, ensure_ascii=False))
        return 0
    print(summary_text(args.file, summary, max_length=args.max_length, model=str(model_dir)))
    for r in [r for r in records if not r.get("dropped")][:args.show]:
        print(f"\n--- example {r['example']} ({r['tokens']} tokens, {r['trained_tokens']} trained, between [[ ]])")
        print(marked(r, tok))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..generate import load_for_inference
    from ..train.data import read_examples
    from ..train.evaluate import eval_examples

    device, why = resolve_device(args.device)  # an absent device: exit 2 before any work
    examples = read_examples(args.data)
    # the first line; with --json stdout is the one JSON object, so the line goes to stderr
    print(device_line(device, DTYPES["float32"], why), file=sys.stderr if args.json else sys.stdout, flush=True)
    model, tok = load_for_inference(args.model, args.adapter, device=device)
    kw = dict(max_length=args.max_length, batch_size=args.batch_size, answers=args.generate,
              max_new_tokens=args.max_new_tokens)
    results = {"adapted" if args.adapter else "model": eval_examples(model, tok, examples, **kw)}
    if args.compare:
        results = {"base": eval_examples(model, tok, examples, base=True, **kw), **results}
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
        return 0
    metrics = [k for k in next(iter(results.values())) if k != "answers"]
    print(f"{args.data}: {len(examples)} examples" + (f", adapter {args.adapter}" if args.adapter else ""))
    print(f"  {'metric':<22}" + "".join(f"{name:>12}" for name in results))
    for k in metrics:
        print(f"  {k:<22}" + "".join(f"{r[k]:>12.4f}" for r in results.values()))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and accuracy of a model (and adapter) on a data file; greedy "
                       "answers against the references with --generate",
                       description="Evaluate on the trained tokens of a data file (the loss lorafit train takes): "
                                   "eval loss, perplexity, choice accuracy for small answer sets; with --generate "
                                   "exact match of greedy answers, and for JSON answers the valid-JSON share and "
                                   "per-field accuracy.")
    add_model_flag(p, "the base model", required=True)
    p.add_argument("--adapter", help="a PEFT-format adapter folder, e.g. a lorafit train output (default: none)")
    p.add_argument("--data", required=True, help="data file or dataset folder, as for train")
    p.add_argument("--generate", action="store_true", help="also generate greedy answers and score them against "
                   "the references (default: off)")
    p.add_argument("--compare", action="store_true", help="evaluate the base model too, side by side "
                   "(default: off)")
    add_max_length_flag(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per batch (default: 8)")
    add_max_new_tokens_flag(p, "with --generate", default=64)
    add_device_flag(p)
    p.add_argument("--json", action="store_true", help="print the metrics (and answers) as JSON (default: a table)")
    p.set_defaults(func=cmd_eval, needs=("transformers",))


def add_parsers(sub) -> None:
    add_data_parser(sub)
    add_eval_parser(sub)


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="check a data file: format, token counts, what is cut or dropped, and which "
                       "tokens are trained",
                       description="Read a data file as `lorafit train` does (JSONL, JSON list, CSV, Parquet, a "
                                   "save_to_disk folder; text, prompt/completion or conversations) and report what "
                                   "training will see.")
    p.add_argument("file", help="the data file or dataset folder")
    add_model_flag(p, "its tokenizer (and chat template) is used", default=EMBEDDED_MODEL)
    add_max_length_flag(p)
    p.add_argument("--chat-template", help="a Jinja chat template file replacing the tokenizer's (default: none)")
    p.add_argument("--train-on-prompt", action="store_true", help="count the loss on every token (default: off)")
    p.add_argument("--show", type=int, default=0, metavar="K", help="print K rendered examples with the trained "
                   "tokens marked (default: 0)")
    p.add_argument("--json", action="store_true", help="one JSON object per example: tokens, trained_tokens, cut, "
                   "and 'trained', the trained text spans decoded with special tokens kept (default: off)")
    p.set_defaults(func=cmd_data, needs=("transformers",))
