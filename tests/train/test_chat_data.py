"""Conversations: assistant-only masking by prefix rendering on three chat templates (Llama-3 style, ChatML as Qwen
uses it, and one with a default system prompt and {% generation %} markers, checked against TRL's
assistant_only_loss), the file formats, truncation, length grouping, and `lorafit data`."""

from __future__ import annotations

import json

import pytest

from helpers import make_tokenizer
from lorafit import DataError
from lorafit.hf import IGNORE
from lorafit.train.data import epoch_order, padding_share, read_examples, tokenize, tokenize_all

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a movie critic.<|im_end|>\n{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
          "{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"llama3": (LLAMA3, "<|eot_id|>"), "chatml": (CHATML, "<|im_end|>"), "marked": (MARKED, "<|im_end|>")}
SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]

ONE_TURN = [{"role": "user", "content": "the movie was good"}, {"role": "assistant", "content": "positive"}]
MULTI = [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "the plot was dull"},
         {"role": "assistant", "content": "negative"}, {"role": "user", "content": "and the actor"},
         {"role": "assistant", "content": "superb acting, lovely"}]


def chat_tokenizer(template: str):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = template
    return tok


def spans(row, tok) -> list[str]:
    out, cur = [], []
    for t, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    return out + ([tok.decode(cur, skip_special_tokens=False)] if cur else [])


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("messages", [ONE_TURN, MULTI], ids=["one-turn", "multi-turn"])
def test_trained_spans_are_assistant_contents_with_their_end_of_turn_token(name, messages):
    template, eot = TEMPLATES[name]
    tok = chat_tokenizer(template)
    row = tokenize({"messages": messages}, tok, 256)
    want = [m["content"] + eot for m in messages if m["role"] == "assistant"]
    assert spans(row, tok) == want
    assert tok.decode(row["input_ids"], skip_special_tokens=False) == tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("name", TEMPLATES)
def test_conversational_prompt_completion_trains_the_completion(name):
    template, eot = TEMPLATES[name]
    tok = chat_tokenizer(template)
    ex = read_examples_from([{"prompt": MULTI[:4], "completion": MULTI[4:]}])[0]
    assert spans(tokenize(ex, tok, 256), tok) == [MULTI[4]["content"] + eot]
    everything = tokenize(ex, tok, 256, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def read_examples_from(rows, tmp=None):
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    path = d / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_examples(path)


def test_masks_match_trl_assistant_only_loss_on_the_marked_template(tmp_path):
    """TRL's SFTTrainer with assistant_only_loss=True (transformers' {% generation %} masks) trains exactly the
    tokens lorafit trains without using the markers."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = chat_tokenizer(MARKED)
    convs = [ONE_TURN, MULTI, MULTI[1:]]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to=[], max_length=256,
                     bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in convs]),
                         processing_class=tok)
    for conv, theirs in zip(convs, trainer.train_dataset):
        ours = tokenize({"messages": conv}, tok, 256)
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]  # TRL 1.x folds assistant_masks into labels (-100 elsewhere)
        assert any(label != IGNORE for label in ours["labels"])


def test_truncation_keeps_the_last_complete_turn_that_fits_and_drops_the_rest():
    tok = chat_tokenizer(CHATML)
    full = tokenize({"messages": MULTI}, tok, 256)
    last_end = max(i for i, label in enumerate(full["labels"]) if label != IGNORE) + 1  # after the 2nd answer's EOT
    cut = tokenize({"messages": MULTI}, tok, last_end - 1)  # the second answer no longer fits
    assert cut["cut"] and spans(cut, tok) == ["negative<|im_end|>"]
    assert cut["input_ids"] == full["input_ids"][:len(cut["input_ids"])]
    assert tokenize({"messages": MULTI}, tok, 4) is None  # not even the first answer fits: dropped
    rows, counts = tokenize_all([{"messages": MULTI}] * 3 + [{"messages": ONE_TURN}], tok, last_end - 1)
    assert counts == {"cut": 3, "dropped": 0} and len(rows) == 4
    short = len(tokenize({"messages": ONE_TURN}, tok, 256)["input_ids"])
    assert tokenize({"messages": MULTI}, tok, short) is None  # MULTI's system prompt alone is longer
    rows, counts = tokenize_all([{"messages": MULTI}, {"messages": ONE_TURN}], tok, short)
    assert counts == {"cut": 0, "dropped": 1} and len(rows) == 1


def test_a_template_that_rewrites_earlier_turns_is_refused():
    """Rendering a prefix must give a prefix of the whole; a template that renders the last turn differently
    (here: every earlier assistant turn is shortened) cannot be masked by prefixes."""
    rewriting = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{% if m['role'] == 'assistant' and not loop.last %}"
                 "...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="token boundaries do not line up at message 3"):
        tokenize({"messages": MULTI, "source": "chat.jsonl, line 7"}, chat_tokenizer(rewriting), 256)


BAD_CHAT = [  # (id, JSONL line, message)
    ("messages-not-a-list", {"messages": "hi"}, '"messages" must be a non-empty list'),
    ("message-without-role", {"messages": [{"content": "hi"}]}, 'message 1 of "messages" has no "role"'),
    ("message-without-content", {"messages": [{"role": "user"}]}, 'message 1 of "messages" has no "content"'),
    ("unknown-role", {"messages": [{"role": "robot", "content": "x"}]}, "has role 'robot'"),
    ("no-assistant-turn", {"messages": [{"role": "user", "content": "hi"}]}, '"messages" has no assistant turn'),
    ("completion-without-assistant", {"prompt": [{"role": "user", "content": "a"}],
                                      "completion": [{"role": "user", "content": "b"}]},
     '"completion" has no assistant turn'),
]


@pytest.mark.parametrize("row,message", [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_conversations_name_the_line(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": ONE_TURN}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match="chat.jsonl, line 2: ") as e:
        read_examples(path)
    assert message in str(e.value)


def test_roles_the_template_rejects_pass_its_error_through():
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}assistant: "
              "{% endif %}")
    two_users = [ONE_TURN[0], ONE_TURN[0], ONE_TURN[1]]
    with pytest.raises(DataError, match="d.jsonl, line 4: the chat template rejects this conversation: roles must "
                                        "alternate"):
        tokenize({"messages": two_users, "source": "d.jsonl, line 4"}, chat_tokenizer(strict), 256)


def test_a_tokenizer_without_a_chat_template_says_what_to_do():
    with pytest.raises(DataError, match="no chat template.*--chat-template FILE"):
        tokenize({"messages": ONE_TURN}, make_tokenizer(), 256)


# --- files -------------------------------------------------------------------------------------------------

# the first row names every column (datasets.Dataset.from_list takes the columns from it)
ROWS = [{"messages": MULTI[1:3], "tools": [{"name": "f"}]}, {"messages": ONE_TURN}, {"messages": MULTI}]


def test_every_file_format_reads_into_the_same_examples_as_its_jsonl_twin(tmp_path):
    from datasets import Dataset

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "arrow"))
    want = [{k: v for k, v in e.items() if k != "source"} for e in read_examples(tmp_path / "d.jsonl")]
    for name in ("d.json", "d.parquet", "arrow"):
        got = [{k: v for k, v in e.items() if k != "source"} for e in read_examples(tmp_path / name)]
        assert got == want, name
    pc = [{"prompt": "Review: good\nSentiment:", "completion": " positive"}] * 3
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    Dataset.from_list(pc).to_parquet(str(tmp_path / "pc.parquet"))
    assert read_examples(tmp_path / "pc.parquet") == read_examples(tmp_path / "pc.jsonl")


def test_dataset_files_without_known_columns_or_with_splits_are_refused(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"question": "a", "answer": "b"}]).to_parquet(str(tmp_path / "qa.parquet"))
    with pytest.raises(DataError, match=r"qa.parquet has none of the columns .* \(found: question, answer\)"):
        read_examples(tmp_path / "qa.parquet")
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test; pass one of them, e.g. .*dd/train"):
        read_examples(tmp_path / "dd")


# --- batching ----------------------------------------------------------------------------------------------

def test_grouping_by_length_keeps_every_example_once_and_cuts_padding():
    import random

    lengths = [random.Random(i).randint(5, 200) for i in range(400)]
    plain, grouped = epoch_order(400, 8, 0, 0), epoch_order(400, 8, 0, 0, lengths)
    assert sorted(grouped) == list(range(400)) and grouped != plain
    batches = lambda order: [order[k:k + 8] for k in range(0, 400, 8)]  # noqa: E731
    assert padding_share(batches(grouped), lengths) < 0.25 * padding_share(batches(plain), lengths)
    assert epoch_order(400, 8, 0, 1, lengths) != grouped  # a new order each epoch


def test_pack_cuts_text_into_full_blocks_with_eos_between_examples():
    from lorafit.train.data import pack

    tok = make_tokenizer()
    rows, _ = tokenize_all([{"text": "the movie was good"}, {"text": "a dull plot and a boring actor"}] * 10, tok, 64)
    blocks = pack(rows, 16, tok.eos_token_id)
    stream = [t for r in rows for t in r["input_ids"] + [tok.eos_token_id]]
    assert all(len(b["input_ids"]) == 16 and b["labels"] == b["input_ids"] for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[:16 * len(blocks)]
    assert len(stream) - 16 * len(blocks) < 16  # only the last partial block is dropped


def test_pack_refuses_data_that_is_not_text(tmp_path, capsys):
    from helpers import make_data, make_model_dir
    from lorafit.cli import main

    model, data = make_model_dir(tmp_path / "m"), make_data(tmp_path / "d.jsonl", n=16)
    code = main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "out"), "--pack",
                 "--quiet", "--steps", "1", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--pack joins text examples into blocks" in err and not (tmp_path / "out").exists()
