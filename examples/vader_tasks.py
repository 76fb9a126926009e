"""Three more 2-way sentiment tasks from the VADER archive that holds the embedded task's movie reviews (Hutto &
Gilbert, ICWSM 2014; the ``vaderSentiment==3.3.2`` source distribution): tweets, Amazon product-review snippets and
New York Times editorial snippets, as prompt/completion JSONL with a held-out test set.

    python examples/vader_tasks.py --output data/           # data/{tweets,amazon,nyt}_{train,test}.jsonl

As the embedded task: snippets rated |score| >= 0.5 are kept and labelled by sign, the answer is " positive" or
" negative", the loss is on the answer token. ``--test`` examples (default 400, a shuffle seeded by ``--seed``) go to
the test file; `lorafit train --data X_train.jsonl` splits its own eval set from the rest (``--eval-split``), so
choices made on eval losses (tune, the learning-rate scans) never see the test file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafit.demo.assets import VADER_SETS, load_sentiment

PROMPTS = {"tweets": "Tweet: {text}\nSentiment (positive or negative):",
           "amazon": "Product review: {text}\nSentiment (positive or negative):",
           "nyt": "Editorial: {text}\nSentiment (positive or negative):",
           "movies": "Review: {text}\nSentiment (positive or negative):"}


def write(path: Path, rows: list[dict], prompt: str) -> None:
    path.write_text("".join(json.dumps({"prompt": prompt.format(text=r["text"]), "completion": " " + r["label"]},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("data"))
    p.add_argument("--sets", default="tweets,amazon,nyt", help=f"comma-separated, of {', '.join(VADER_SETS)}")
    p.add_argument("--test", type=int, default=400, help="held-out test examples per set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        train, test = load_sentiment(seed=args.seed, eval_size=args.test, source=name)
        write(args.output / f"{name}_train.jsonl", train, PROMPTS[name])
        write(args.output / f"{name}_test.jsonl", test, PROMPTS[name])
        positive = sum(r["label"] == "positive" for r in train) / len(train)
        print(f"{name}: {len(train)} train ({positive:.0%} positive), {len(test)} test -> "
              f"{args.output / (name + '_train.jsonl')}, {args.output / (name + '_test.jsonl')}")


if __name__ == "__main__":
    main()
