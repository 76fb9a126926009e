"""Turn the embedded VADER movie reviews (Hutto & Gilbert, ICWSM 2014) into chat files for `lorafit train`.

Each line is {"messages": [system, user review, assistant JSON answer]}; the answer is
{"sentiment": "positive" | "negative", "confidence": 0.0-1.0}, the confidence being the mean human rating's
magnitude (|score| / 4, one decimal). The held-out reviews are the default job's (seed 0, the first 200 of the
shuffle), so the two tasks can be compared.

    python examples/chat_sentiment.py --output data/           # data/chat_train.jsonl, data/chat_test.jsonl
    lorafit data data/chat_train.jsonl --show 1
    lorafit train --data data/chat_train.jsonl --output runs/chat ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorafit.demo.assets import sentiment_data

SYSTEM = ('You rate movie reviews. Reply with JSON only, in the form {"sentiment": "positive" or "negative", '
          '"confidence": a number from 0 to 1}.')


def conversation(text: str, score: float) -> dict:
    answer = {"sentiment": "positive" if score > 0 else "negative", "confidence": round(min(1.0, abs(score) / 4), 1)}
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps(answer)}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="data", help="folder for chat_train.jsonl and chat_test.jsonl")
    p.add_argument("--test-size", type=int, default=200, help="held-out reviews (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0, the default job's)")
    args = p.parse_args()
    with open(sentiment_data(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in sorted(rows, key=lambda r: r["id"]) if abs(r["score"]) >= 0.5]  # as the default job
    random.Random(args.seed).shuffle(rows)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("chat_test.jsonl", rows[:args.test_size]), ("chat_train.jsonl", rows[args.test_size:])):
        (out / name).write_text("".join(json.dumps(conversation(r["text"], r["score"])) + "\n" for r in part))
        print(f"wrote {out / name} ({len(part)} conversations)")


if __name__ == "__main__":
    main()
