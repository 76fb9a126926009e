"""The embedded default task: movie-review sentiment (VADER, Hutto & Gilbert, ICWSM 2014) as a one-token answer.

Prompt ``Review: <text>\\nSentiment (positive or negative):``; completion `` positive`` or `` negative``; the loss
is on the answer token only, and accuracy compares the next-token log-probabilities of the two answers.
"""

from __future__ import annotations

PROMPT = "Review: {text}\nSentiment (positive or negative):"
CHOICES = [" negative", " positive"]

# Where the no-argument run (`lorafit train`) differs from TrainConfig's defaults: SmolLM2-135M-Instruct, LoRA on
# q,v (TrainConfig's default adapter), ~2-3 minutes on 2 CPU cores. Flags and --config still override them.
DEFAULT_JOB = dict(steps=60, lr=2e-3, warmup_steps=5, max_length=96, eval_max=200, add_eos=False, save_every=20,
                   group_by_length=False)  # the measured numbers (docs/performance.md) are of the plain shuffled order


def as_example(snippet: dict) -> dict:
    return {"prompt": PROMPT.format(text=snippet["text"]), "completion": " " + snippet["label"]}


NAME = "movie-review sentiment (SmolLM2-135M-Instruct)"


def sentiment_examples(seed: int = 0, eval_max: int | None = 200) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt/completion examples of the embedded task; the answers are ``CHOICES``."""
    from .assets import load_sentiment

    train, held = load_sentiment(seed=seed, eval_size=eval_max or 200)
    return [as_example(s) for s in train], [as_example(s) for s in held]
