"""`lorafit data`, chat training through `lorafit train`, and `lorafit eval` on a tiny chat model."""

from __future__ import annotations

import json

import pytest

from helpers import make_chat_model_dir, make_model_dir
from lorafit.cli import main

REVIEWS = [("the movie was good", "positive"), ("awful plot and dull actor", "negative"),
           ("a lovely film, superb scene", "positive"), ("boring and terrible story", "negative")]


def conversation(text: str, label: str) -> dict:
    return {"messages": [{"role": "system", "content": "rate the review"}, {"role": "user", "content": text},
                         {"role": "assistant", "content": json.dumps({"sentiment": label})}]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatdata")
    data = d / "chat.jsonl"
    data.write_text("".join(json.dumps(conversation(*REVIEWS[i % 4])) + "\n" for i in range(40)))
    return make_chat_model_dir(d / "chat"), make_model_dir(d / "plain"), data


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_json_lists_the_trained_spans_with_the_end_of_turn_token(files, capsys):
    chat, _, data = files
    code, out, _ = cli(capsys, "data", data, "--model", chat, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(records) == 40
    assert records[0]["trained"] == ['{"sentiment": "positive"}<|im_end|>'] and not records[0]["cut"]
    assert records[1]["trained"] == ['{"sentiment": "negative"}<|im_end|>']


def test_data_summary_and_marked_examples(files, capsys):
    chat, _, data = files
    code, out, _ = cli(capsys, "data", data, "--model", chat, "--show", "1")
    assert code == 0
    assert "40 examples, format \"messages\"" in out and "trained tokens:" in out and "padding in batches" in out
    assert "[[{\"sentiment\": \"positive\"}<|im_end|>]]" in out and "cut to max_length: 0, dropped" in out
    code, out, _ = cli(capsys, "data", data, "--model", chat, "--max-length", "8")  # not even one answer fits
    assert code == 0 and "dropped (first trained turn does not fit): 40" in out


def test_data_without_a_chat_template_or_with_a_broken_one(files, tmp_path, capsys):
    chat, plain, data = files
    code, _, err = cli(capsys, "data", data, "--model", plain)
    assert code == 2 and "no chat template" in err and "--chat-template FILE" in err
    bad = tmp_path / "t.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    code, _, err = cli(capsys, "data", data, "--model", plain, "--chat-template", bad)
    assert code == 2 and f"--chat-template {bad} is not a valid Jinja template" in err
    assert err.count("lorafit: error:") == 1
    code, _, err = cli(capsys, "data", data, "--model", plain, "--chat-template", tmp_path / "missing.jinja")
    assert code == 2 and "is not a readable text file" in err


def test_chat_training_then_eval_compares_base_and_adapted(files, tmp_path, capsys):
    chat, _, data = files
    out = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--model", chat, "--data", data, "--output", out, "--steps", "30",
                       "--batch-size", "4", "--lr", "5e-3", "--rank", "8", "--target-modules", "all-linear",
                       "--max-length", "64", "--quiet")
    assert code == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learned the answers
    code, report, err = cli(capsys, "eval", "--model", chat, "--adapter", out, "--data", data, "--generate",
                            "--compare", "--json", "--max-new-tokens", "12")
    assert code == 0, err
    result = json.loads(report)
    assert set(result) == {"base", "adapted"}
    for r in result.values():
        assert {"eval_loss", "perplexity", "exact_match", "json_valid", "sentiment_accuracy"} <= set(r)
        assert len(r["answers"]) == 40
    assert result["adapted"]["eval_loss"] < result["base"]["eval_loss"]
    assert result["adapted"]["sentiment_accuracy"] >= result["base"]["sentiment_accuracy"]


def test_show_answers_prints_base_and_fine_tuned_greedy_answers(files, monkeypatch):
    """The default job's closing lines: base -> fine-tuned answers on held-out reviews (generate at temperature 0,
    with the adapter disabled for the base)."""
    import lorafit
    from helpers import perturb_trainable
    from lorafit import generate
    from lorafit.hf import load_model
    from lorafit.train.loop import show_answers

    _, plain, _ = files
    model, tok = load_model(plain)
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(model, std=0.5)
    lines = []
    examples = [{"prompt": f"Review: {t}\nSentiment:", "completion": f" {label}"} for t, label in REVIEWS[:2]]
    lengths, real = [], generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, max_new_tokens, **kw: lengths.append(max_new_tokens)
                        or real(*a, max_new_tokens=max_new_tokens, **kw))
    show_answers(model, tok, examples, lines.append)
    assert len(lines) == 3 and lines[0].startswith("greedy answers on held-out examples")
    assert lines[1].startswith("  'Review: the movie was good': ") and lines[1].endswith("expected 'positive'")
    # each answer is cut at the expected answer's length in tokens (the demo trains without EOS)
    assert lengths == [len(tok(e["completion"], add_special_tokens=False)["input_ids"]) for e in examples for _ in "bt"]
